"""Where lens keeps large artefacts (converted weights, KV caches, records): never in git."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$LENS_CACHE`` if set, else ``~/.cache/lens``."""
    return Path(os.environ.get("LENS_CACHE") or Path.home() / ".cache" / "lens").expanduser()


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; rename it into place only if the block succeeds,
    so a crash never leaves a half-written folder that looks complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def exclusive_lock(lock_path: Path, what: str, wait: bool = False):
    """Hold an exclusive lock on ``lock_path`` for the block; a second process asking for it is
    refused at once with a LensError naming ``what`` and the holder's pid (never two writers on
    one folder), or, with ``wait``, waits for it (a line on stderr says so)."""
    import fcntl

    from lens.errors import LensError
    from lens.log import log

    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise LensError(f"{lock_path}: cannot create a lock file ({err.strerror}); choose a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if wait:
                log.warning(f"{what} is in use by lens process {holder}; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                raise LensError(f"{what} is in use by another lens process (pid {holder}); wait for it to finish "
                                "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock

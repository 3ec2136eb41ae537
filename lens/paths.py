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

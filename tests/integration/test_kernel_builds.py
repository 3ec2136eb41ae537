"""Every compiled path builds, including those this CPU cannot run (compiled to an object file,
never loaded): x86 paths with the host compiler, vec-neon with the aarch64 cross compiler
(``make test`` installs Debian's g++-aarch64-linux-gnu; CI always has it)."""

import platform
import shutil

import pytest

from kernels.native import BUILDS, CROSS_COMPILERS, compile_only, runnable_paths

X86 = platform.machine() in ("x86_64", "AMD64")
NOT_HERE = [p for p in BUILDS if p not in runnable_paths()]


@pytest.mark.parametrize("path", NOT_HERE or ["vec-neon"])
def test_paths_this_cpu_cannot_run_still_compile(path, tmp_path):
    cross = CROSS_COMPILERS.get(path) if X86 else None
    if cross and shutil.which(cross) is None:
        pytest.skip(f"{cross} not installed (make test installs it)")
    obj = compile_only(path, tmp_path)
    assert obj.stat().st_size > 10_000


def test_a_compile_error_names_the_path(tmp_path, monkeypatch):
    import kernels.native as native

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setitem(native.BUILDS, "vec-default", (broken, [], ()))
    with pytest.raises(RuntimeError, match="vec-default: .* failed"):
        compile_only("vec-default", tmp_path)


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """PyTorch's extension builder waits forever on the lock file of a build that was killed;
    lens removes a lock older than any build takes, and leaves a build under way alone."""
    import os
    import time

    import kernels.native as native

    lock = tmp_path / "lock"
    lock.touch()
    assert not native.clear_stale_lock(tmp_path) and lock.exists()  # a build under way
    old = time.time() - native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="did not finish"):
        assert native.clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert not native.clear_stale_lock(tmp_path)  # nothing to remove

"""Compiled CPU kernels (C++ with AVX-512, built on first use into the lens cache).

:func:`decode_kernel` returns the compiled module, or None where it cannot be had (no AVX-512,
no compiler, ``LENS_NATIVE=0``): callers then take the PyTorch path, which computes the same
thing.  The build is keyed by the source's hash, so an edited kernel is rebuilt, never stale."""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"


def _has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"))


@lru_cache(maxsize=1)
def decode_kernel():
    if os.environ.get("LENS_NATIVE", "1") == "0" or not _has_avx512():
        return None
    try:
        return build()
    except Exception as e:  # a missing compiler or headers: the PyTorch path is used instead
        warnings.warn(f"lens: compiled decode kernel unavailable ({type(e).__name__}: {e}); using the PyTorch path")
        return None


def build_root() -> Path:
    """Where builds go: ``$LENS_CACHE/build`` (the folder lens keeps its artefacts in, read from
    the same variable so this layer imports nothing from lens), else ``~/.cache/lens/build``."""
    return Path(os.environ.get("LENS_CACHE") or Path.home() / ".cache" / "lens").expanduser() / "build"


def build(ablate: int = 0, root: Path | None = None):
    """Compile (or load the cached build of) the kernel into ``root`` (default :func:`build_root`).
    ``ablate`` != 0 builds a variant with parts of the work left out, for
    ``experiments/bench_kernels.py --part ablate`` only."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    tag = f"{digest}_ablate{ablate}" if ablate else digest
    folder = (root or build_root()) / f"decode_attention-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"lens_decode_attention_{tag}", sources=[str(SOURCE)], build_directory=str(folder),
        extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mamx-tile",
                      "-mamx-bf16", "-fopenmp", f"-DLENS_ABLATE={int(ablate)}"],
        extra_ldflags=["-fopenmp"], verbose=False,
    )

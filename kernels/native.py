"""Compiled CPU kernels for corpus attention, built on first use into the lens cache, one build
per instruction set, chosen at run time from the CPU's features.

Two sources compute the same thing (output, log-sum-exp, each document's max and log-sum-exp,
the gold documents' part) with the same interface:

* ``native-avx512`` (``csrc/decode_attention.cpp``): bf16 only, AVX-512 BF16 dot products, AMX
  tiles where Linux grants them;
* ``vec-avx512`` / ``vec-avx2`` / ``vec-neon`` / ``vec-default`` (``csrc/corpus_attention_vec.cpp``):
  written once with ATen's ``at::vec::Vectorized<float>`` and compiled for AVX-512, AVX2+FMA,
  aarch64 NEON or plain C++; fp32 or bf16 queries, keys and values, fp32 arithmetic.

:func:`decode_kernel` returns the best build for a dtype on this machine, or None where none can
be had (no compiler, ``LENS_KERNEL=pytorch``): callers then take the PyTorch path, which computes
the same thing.  ``LENS_KERNEL=<path>`` forces one path (an error names the paths this CPU runs
if it cannot).  Each build is keyed by its source's hash, so an edited kernel is rebuilt, never
stale."""

from __future__ import annotations

import hashlib
import os
import platform
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "decode_attention.cpp"
VEC_SOURCE = CSRC / "corpus_attention_vec.cpp"

# path -> (source, compiler flags, the CPU features it needs); fastest first for bf16
_X86_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
BUILDS: dict[str, tuple[Path, list[str], tuple[str, ...]]] = {
    "native-avx512": (SOURCE, [*_X86_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"], ("avx512", "avx512_bf16")),
    "vec-avx512": (VEC_SOURCE, [*_X86_AVX512, "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"], ("avx512",)),
    "vec-avx2": (VEC_SOURCE, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], ("avx2_fma",)),
    "vec-neon": (VEC_SOURCE, ["-DCPU_CAPABILITY=DEFAULT"], ("neon",)),
    "vec-default": (VEC_SOURCE, ["-DCPU_CAPABILITY=DEFAULT"], ()),
}
PATH_CHOICES = ("auto", "pytorch", *BUILDS)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel (``/proc/cpuinfo``) or macOS (``sysctl``) reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    if not flags and platform.system() == "Darwin" and platform.machine() == "arm64":
        import subprocess

        flags.add("asimd")  # every Apple silicon core has NEON
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
            if out.stdout.strip() == "1":
                flags.add("bf16")
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset(flags)


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """The features lens's choices depend on."""
    f = cpu_flags()
    arm = platform.machine() in ("aarch64", "arm64")
    return {
        "amx": "amx_bf16" in f and "amx_tile" in f,
        "avx512_bf16": "avx512_bf16" in f,
        "avx512": all(x in f for x in ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
        "avx2_fma": "avx2" in f and "fma" in f,
        "neon": "asimd" in f or arm,
        "arm_bf16": "bf16" in f and arm,
    }


def runnable_paths() -> list[str]:
    """The compiled paths this CPU can run, fastest first (``vec-default`` runs anywhere)."""
    f = cpu_features()
    x86 = platform.machine() in ("x86_64", "AMD64")
    arm = platform.machine() in ("aarch64", "arm64")
    return [p for p, (_, _, needs) in BUILDS.items()
            if all(f[n] for n in needs) and (arm if p == "vec-neon" else (x86 or p == "vec-default"))]


def _takes(path: str, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 if path == "native-avx512" else dtype in (torch.float32, torch.bfloat16)


def chosen_path(dtype: torch.dtype = torch.bfloat16) -> str:
    """The path corpus attention takes here for keys and values of ``dtype``: ``LENS_KERNEL``
    (``pytorch`` or a compiled path; ``LENS_NATIVE=0`` is ``pytorch``), else the fastest
    runnable build that takes the dtype (vec-default only when forced: the PyTorch path beats
    plain C++)."""
    want = os.environ.get("LENS_KERNEL", "auto")
    if os.environ.get("LENS_NATIVE") == "0":
        want = "pytorch"
    if want not in PATH_CHOICES:
        raise ValueError(f"LENS_KERNEL={want!r}: choose one of {', '.join(PATH_CHOICES)}")
    if want == "pytorch":
        return "pytorch"
    runnable = runnable_paths()
    if want != "auto":
        if want not in runnable:
            raise ValueError(f"LENS_KERNEL={want}: this CPU cannot run it; it runs {', '.join(runnable)} (or pytorch)")
        return want if _takes(want, dtype) else "pytorch"
    return next((p for p in runnable if p != "vec-default" and _takes(p, dtype)), "pytorch")


def decode_kernel(dtype: torch.dtype = torch.bfloat16):
    """The compiled kernel for keys and values of ``dtype`` on this machine, or None (the PyTorch path)."""
    path = chosen_path(dtype)
    return None if path == "pytorch" else _loaded(path)


@lru_cache(maxsize=None)
def _loaded(path: str):
    try:
        return build(path)
    except Exception as e:  # a missing compiler or headers: the PyTorch path is used instead
        warnings.warn(f"lens: compiled kernel {path} unavailable ({type(e).__name__}: {e}); using the PyTorch path")
        return None


CROSS_COMPILERS = {"vec-neon": "aarch64-linux-gnu-g++"}  # for a compile-only check on an x86 host


def compile_only(path: str, out: Path, compiler: str | None = None) -> Path:
    """Compile one path's kernel to an object file without loading it (a path this CPU cannot
    run is still checked to build: on x86, ``vec-neon`` with the aarch64 cross compiler)."""
    import shutil
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    source, flags, _ = BUILDS[path]
    arm_host = platform.machine() in ("aarch64", "arm64")
    cxx = compiler or (CROSS_COMPILERS.get(path) if not arm_host else None) or os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"{path}: compiler {cxx} not found")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    obj = out / f"{path}.o"
    cmd = [cxx, "-std=c++20", "-O2", "-c", "-fPIC", "-fopenmp", *flags, *includes, f"-DLENS_ISA={path.replace('-', '_')}",
           f"-DTORCH_EXTENSION_NAME=lens_{path.replace('-', '_')}", "-DTORCH_API_INCLUDE_EXTENSION_H", str(source), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path}: {' '.join(cmd[:2])} failed:\n{done.stderr[-4000:]}")
    return obj


def row_limit(kernel) -> int:
    """Up to how many query rows per KV head in a stream (and whenever its readout statistics
    are kept) the compiled kernel beats PyTorch's flash kernel (``bench_kernels.py --part
    roof``): with AMX tiles for q.k ~150 rows, with AVX-512 BF16 dot products ~16, on the
    Vectorized builds ~32 (two passes of PyTorch, output then statistics, against one).  The
    choice is made per stream, never by how many streams share a chunk: a stream's numbers do not
    depend on its companions (a resumed sweep batches differently)."""
    if kernel.uses_amx():
        return 160
    return 16 if kernel.__name__.startswith("lens_native_avx512") else 32


def build_root() -> Path:
    """Where builds go: ``$LENS_CACHE/build`` (the folder lens keeps its artefacts in, read from
    the same variable so this layer imports nothing from lens), else ``~/.cache/lens/build``."""
    return Path(os.environ.get("LENS_CACHE") or Path.home() / ".cache" / "lens").expanduser() / "build"


STALE_LOCK_SECONDS = 600  # a build takes ~15-30 s; a lock this old was left by a killed one


def clear_stale_lock(folder: Path) -> bool:
    """Removes the lock file a killed build left in ``folder`` (PyTorch's extension builder
    waits on it forever otherwise); a lock younger than :data:`STALE_LOCK_SECONDS` belongs to a
    build under way and is kept.  Returns whether one was removed."""
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    warnings.warn(f"lens: removing {lock}, left {age / 60:.0f} min ago by a kernel build that did not finish")
    lock.unlink(missing_ok=True)
    return True


def build(path: str = "native-avx512", ablate: int = 0, root: Path | None = None):
    """Compile (or load the cached build of) one path's kernel into ``root`` (default
    :func:`build_root`).  ``ablate`` != 0 builds a variant of ``native-avx512`` with parts of the
    work left out, for ``experiments/bench_kernels.py --part ablate`` only."""
    from torch.utils.cpp_extension import load

    source, flags, _ = BUILDS[path]
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # the sources include them
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]
    stem = path.replace("-", "_")
    tag = f"{stem}_{digest}_ablate{ablate}" if ablate else f"{stem}_{digest}"
    folder = (root or build_root()) / tag
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    return load(
        name=f"lens_{tag}", sources=[str(source)], build_directory=str(folder),
        extra_cflags=["-O3", *flags, "-fopenmp", f"-DLENS_ABLATE={int(ablate)}", f"-DLENS_ISA={stem}"],
        extra_ldflags=["-fopenmp"], verbose=False,
    )

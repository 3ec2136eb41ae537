"""The one place that decides how lens computes on this machine: the CPU's features, the dtype
``auto`` resolves to, and which attention kernel path runs.

bf16 is chosen only where the CPU multiplies bf16 matrices natively (x86 AMX or AVX-512 BF16,
aarch64 with the BF16 extension); elsewhere PyTorch emulates bf16 GEMMs and fp32 is several
times faster (2026-12, AMD EPYC Zen 3, AVX2 only: ``F.linear`` at SmolLM2's shapes 15 GFLOP/s in
bf16 vs 78 in fp32).  ``--dtype`` overrides the choice everywhere.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from lens.errors import LensError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _raw_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    if not flags and platform.system() == "Darwin" and platform.machine() == "arm64":
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
    f = _raw_flags()
    return {
        "amx": "amx_bf16" in f and "amx_tile" in f,
        "avx512_bf16": "avx512_bf16" in f,
        "avx512": all(x in f for x in ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
        "avx2_fma": "avx2" in f and "fma" in f,
        "neon": "asimd" in f or platform.machine() in ("aarch64", "arm64"),
        "arm_bf16": "bf16" in f and platform.machine() in ("aarch64", "arm64"),
    }


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix multiplies in hardware (else PyTorch emulates them)."""
    f = cpu_features()
    return f["amx"] or f["avx512_bf16"] or f["arm_bf16"]


def auto_dtype(device: str = "cpu") -> torch.dtype:
    if device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16() else torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """``auto`` (or None) -> this machine's choice; ``float32`` / ``bfloat16`` as given."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return auto_dtype(device)
    if name not in DTYPES:
        raise LensError(f"dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def kernel_path() -> str:
    """Which corpus-attention path decoding takes here."""
    from kernels.native import decode_kernel

    return "native-avx512" if decode_kernel() is not None else "pytorch"


def describe(dtype: str | torch.dtype | None = "auto") -> dict:
    """What was detected and chosen (``lens info``; stamped into sweeps and benchmarks)."""
    chosen = resolve_dtype(dtype)
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "features": {k: v for k, v in cpu_features().items()},
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "native_bf16_matmul": native_bf16(),
        "dtype": dtype_name(chosen),
        "kernel": kernel_path(),
    }


def stamp(dtype: torch.dtype) -> str:
    """One line naming the CPU, its features, the dtype and the kernel path (beside every speed)."""
    feats = ",".join(k for k, v in cpu_features().items() if v) or "none detected"
    return f"{cpu_model()} [{feats}] dtype={dtype_name(dtype)} kernel={kernel_path()} threads={torch.get_num_threads()}"

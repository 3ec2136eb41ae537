"""The one place that decides how lens computes on this machine: the CPU's features, the dtype
``auto`` resolves to, and which attention kernel path runs.

bf16 is chosen only where the CPU multiplies bf16 matrices natively (x86 AMX or AVX-512 BF16,
aarch64 with the BF16 extension); elsewhere PyTorch emulates bf16 GEMMs and fp32 is several
times faster (2026-12, AMD EPYC Zen 3, AVX2 only: ``F.linear`` at SmolLM2's shapes 15 GFLOP/s in
bf16 vs 78 in fp32).  ``--dtype`` overrides the choice everywhere.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from kernels import native
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


def cpu_features() -> dict[str, bool]:
    """The features lens's choices depend on (AMX, AVX-512 BF16, AVX-512, AVX2/FMA, NEON, ARM BF16)."""
    return native.cpu_features()


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


def kernel_path(dtype: str | torch.dtype | None = "auto") -> str:
    """Which corpus-attention path decoding takes here for a model of ``dtype`` (its KV is stored
    in that dtype): a compiled build (``kernels.native``: ``native-avx512``, ``vec-avx512``,
    ``vec-avx2``, ``vec-neon``) or ``pytorch``; ``LENS_KERNEL`` forces one."""
    chosen = resolve_dtype(dtype)
    try:
        path = native.chosen_path(chosen)
    except ValueError as e:
        raise LensError(str(e)) from None
    return path if path == "pytorch" or native.decode_kernel(chosen) is not None else "pytorch"


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
        "kernel": kernel_path(chosen),
        "kernel_paths_here": native.runnable_paths(),
    }


def stamp(dtype: torch.dtype) -> str:
    """One line naming the CPU, its features, the dtype and the kernel path (beside every speed)."""
    feats = ",".join(k for k, v in cpu_features().items() if v) or "none detected"
    capped = f" aten={torch.backends.cpu.get_cpu_capability()}" if os.environ.get("ATEN_CPU_CAPABILITY") else ""
    return (f"{cpu_model()} [{feats}] dtype={dtype_name(dtype)} kernel={kernel_path(dtype)} "
            f"threads={torch.get_num_threads()}{capped}")

"""One place decides the dtype: auto picks bf16 only with native bf16 matmuls."""

import json
import subprocess
import sys

import pytest
import torch

from lens import backend
from lens.errors import LensError


def test_auto_follows_the_cpu(monkeypatch):
    for native, want in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(backend, "native_bf16", lambda n=native: n)
        assert backend.resolve_dtype("auto") == want and backend.resolve_dtype(None) == want
    assert backend.resolve_dtype("float32") == torch.float32 and backend.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(LensError, match="choose one of auto, float32, bfloat16"):
        backend.resolve_dtype("fp16")


def test_features_read_from_cpuinfo(monkeypatch):
    from kernels import native

    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset("fpu avx2 fma avx512f".split()))
    f = native.cpu_features.__wrapped__()
    assert f["avx2_fma"] and not f["avx512"] and not f["amx"] and not f["avx512_bf16"]


def test_kernel_path_follows_the_cpu_and_lens_kernel(monkeypatch):
    """The fastest build for the dtype; an AVX2-only CPU takes vec-avx2 in both dtypes;
    LENS_KERNEL forces a path (or pytorch), and a path the CPU cannot run is a clear error."""
    from kernels import native

    monkeypatch.delenv("LENS_KERNEL", raising=False)
    monkeypatch.delenv("LENS_NATIVE", raising=False)
    monkeypatch.setattr(native, "platform", type("P", (), {"machine": staticmethod(lambda: "x86_64")}))
    monkeypatch.setattr(native, "cpu_features", native.cpu_features.__wrapped__)  # reads cpu_flags on each call
    for flags, bf16, fp32 in [("avx2 fma", "vec-avx2", "vec-avx2"),
                              ("avx2 fma avx512f avx512bw avx512vl avx512dq", "vec-avx512", "vec-avx512"),
                              ("avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16", "native-avx512", "vec-avx512"),
                              ("sse2", "pytorch", "pytorch")]:
        monkeypatch.setattr(native, "cpu_flags", lambda f=flags: frozenset(f.split()))
        assert (native.chosen_path(torch.bfloat16), native.chosen_path(torch.float32)) == (bf16, fp32), flags
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset("avx2 fma".split()))
    monkeypatch.setenv("LENS_KERNEL", "vec-default")
    assert native.chosen_path(torch.float32) == "vec-default"
    monkeypatch.setenv("LENS_KERNEL", "pytorch")
    assert native.chosen_path(torch.bfloat16) == "pytorch"
    monkeypatch.setenv("LENS_KERNEL", "native-avx512")
    with pytest.raises(ValueError, match="this CPU cannot run it; it runs vec-avx2, vec-default"):
        native.chosen_path(torch.bfloat16)
    monkeypatch.setenv("LENS_KERNEL", "avx9")
    with pytest.raises(ValueError, match="choose one of auto, pytorch, native-avx512"):
        native.chosen_path(torch.bfloat16)


def test_lens_info_json():
    out = subprocess.run([sys.executable, "-m", "lens.cli", "info", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["dtype"] == ("bfloat16" if backend.native_bf16() else "float32")
    from kernels.native import PATH_CHOICES

    assert facts["kernel"] in PATH_CHOICES and facts["kernel"] != "auto" and facts["cpu"]
    assert facts["kernel"] == "pytorch" or facts["kernel"] in facts["kernel_paths_here"]

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
    backend._raw_flags.cache_clear()
    backend.cpu_features.cache_clear()
    monkeypatch.setattr(backend, "_raw_flags", lambda: frozenset("fpu avx2 fma avx512f".split()))
    f = backend.cpu_features.__wrapped__()
    assert f["avx2_fma"] and not f["avx512"] and not f["amx"] and not f["avx512_bf16"]
    backend.cpu_features.cache_clear()


def test_lens_info_json():
    out = subprocess.run([sys.executable, "-m", "lens.cli", "info", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["dtype"] == ("bfloat16" if backend.native_bf16() else "float32")
    assert facts["kernel"] in ("native-avx512", "pytorch") and facts["cpu"]

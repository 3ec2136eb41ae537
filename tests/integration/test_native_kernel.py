"""Every compiled corpus-attention path this CPU runs (kernels/native.py: native-avx512, and the
Vectorized builds vec-avx512, vec-avx2, vec-neon, vec-default) against a float64 dense reference
computed from the same inputs, in each dtype the path takes, and the streams that use it against
the dense corpus attention and against PyTorch's flash path.  Paths this CPU cannot run are
compiled (tests/integration/test_kernel_builds.py)."""

import pytest
import torch

import kernels.fused as ca
from kernels.corpus_attention import CorpusAttentionStream, iter_chunks, update_shared
from kernels.reference import dense_corpus_attention
from kernels.native import _takes, build, runnable_paths
from kernels.interventions import SSMax, Sink, Temperature
from lens.runtime import BlockSearchRunner
from lens.models.registry import load_model

PATHS = runnable_paths()
CASES = [pytest.param(p, dt, id=f"{p}-{str(dt).removeprefix('torch.')}") for p in PATHS
         for dt in (torch.bfloat16, torch.float32) if _takes(p, dt)]
kernel = build(PATHS[0]) if PATHS else None  # the fastest path here (the AMX subprocess test reads it)


@pytest.fixture(scope="module")
def kernels():
    return {p: build(p) for p in PATHS}


@pytest.fixture
def forced(monkeypatch):
    """Force one path for the streams (LENS_KERNEL, read at every chunk)."""
    return lambda path: monkeypatch.setenv("LENS_KERNEL", path)


def _reference(q, k, v, scale, key_doc, n_docs, stat_rows, gold_mask, row_scale=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale  # [G, R, T]
    if row_scale is not None:
        s = s * row_scale.double()[..., None]
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v.double()
    ss = s[:, stat_rows]
    doc_max = torch.full((*ss.shape[:2], n_docs), float("-inf"), dtype=torch.double)
    doc_lse = doc_max.clone()
    for d in range(n_docs):
        keys_of_d = key_doc == d
        if keys_of_d.any():
            doc_max[..., d] = ss[..., keys_of_d].amax(-1)
            doc_lse[..., d] = torch.logsumexp(ss[..., keys_of_d], -1)
    gold_keys = gold_mask[:, key_doc.clamp(min=0)] & (key_doc >= 0)  # [S, T]
    gold = (torch.exp(ss - lse[:, stat_rows, None]) * gold_keys) @ v.double()
    return out, lse, doc_max, doc_lse, gold


def test_this_cpu_has_a_compiled_path():
    """Every x86-64 CPU has AVX2 builds or better, every aarch64 one NEON: nothing here skips."""
    assert PATHS and PATHS[-1] == "vec-default"
    assert len(PATHS) >= 2 or __import__("platform").machine() not in ("x86_64", "aarch64", "arm64")


SHAPES = [(3, 3, 5000, 64), (3, 6, 10007, 64), (8, 2, 3001, 128), (2, 5, 700, 32), (1, 1, 17, 64), (1, 1, 1, 64),
          (3, 24, 9000, 64)]


@pytest.mark.parametrize("path,dtype", CASES)
@pytest.mark.parametrize("G,R,T,D", SHAPES)
def test_kernel_equals_dense_reference(G, R, T, D, path, dtype, kernels):
    """Outputs, log-sum-exp, per-document max and log-sum-exp of the stat rows, and their gold
    part, for documents of unequal length that cross the kernel's blocks and parts, instruction
    keys (-1), documents absent from the chunk (-inf), and key counts not a multiple of 16."""
    check_against_reference(kernels[path], G, R, T, D, dtype)


def check_against_reference(kernel, G, R, T, D, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(G, R, D, generator=g).to(dtype)
    k = (torch.randn(G, T, D, generator=g) * 2).to(dtype)
    v = torch.randn(G, T, D, generator=g).to(dtype)
    key_doc = torch.sort(torch.randint(-1, 40, (T,), generator=g)).values
    n_docs = 45
    stat_rows = torch.tensor(sorted({R - 1, 0}))
    gold_mask = torch.zeros(len(stat_rows), n_docs, dtype=torch.bool)
    gold_mask[0, int(key_doc[-1])] = True
    gold_mask[-1, 7] = True
    ours = kernel.decode_attention(q, k, v, 0.125, key_doc, n_docs, stat_rows, gold_mask)
    ref = _reference(q, k, v, 0.125, key_doc, n_docs, stat_rows, gold_mask)
    for name, a, b in zip(("out", "lse", "doc_max", "doc_lse", "gold"), ours, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        finite = torch.isfinite(b)
        assert (a.double()[finite] - b[finite]).abs().max() <= 2e-5, name


@pytest.mark.parametrize("path,dtype", CASES)
def test_row_scales_and_raw_routing_scores_equal_the_dense_reference(path, dtype, kernels):
    """Rows scaled in the kernel (an intervention's per-row scale, in fp32) give the dense
    reference of the scaled scores; the routing rows' per-document max of the raw scores (the
    scale undone), reduced over each group's rows, and each row's per-document sum of raw scores
    are the reference's, over the chunk's documents from the least id present."""
    kernel = kernels[path]
    G, R, T, D, n_docs = 3, 10, 3000, 64, 45
    g = torch.Generator().manual_seed(5)
    q = torch.randn(G, R, D, generator=g).to(dtype)
    k = (torch.randn(G, T, D, generator=g) * 2).to(dtype)
    v = torch.randn(G, T, D, generator=g).to(dtype)
    key_doc = torch.sort(torch.randint(-1, 40, (T,), generator=g)).values
    row_scale = 0.5 + 1.5 * torch.rand(G, R, generator=g)
    stat_rows, gold_mask = torch.tensor([4, 9]), torch.zeros(2, n_docs, dtype=torch.bool)
    gold_mask[:, 3] = True
    route_rows, route_group = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ours = kernel.decode_attention(q, k, v, 0.125, key_doc, n_docs, stat_rows, gold_mask, row_scale, route_rows,
                                   route_group)
    ref = _reference(q, k, v, 0.125, key_doc, n_docs, stat_rows, gold_mask, row_scale)
    raw = (q.double() @ k.double().transpose(-1, -2)) * 0.125
    lo, hi = int(key_doc[key_doc >= 0].min()), int(key_doc.max())
    route = torch.full((G, 2, hi + 1 - lo), float("-inf"), dtype=torch.double)
    sums = torch.zeros(G, len(route_rows), hi + 1 - lo, dtype=torch.double)
    for d in range(lo, hi + 1):
        keys_of_d = key_doc == d
        if keys_of_d.any():
            for grp in (0, 1):
                route[:, grp, d - lo] = raw[:, route_rows[route_group == grp]][..., keys_of_d].amax((-1, -2))
            sums[..., d - lo] = raw[:, route_rows][..., keys_of_d].sum(-1)
    assert int(ours[7]) == lo
    for name, a, b in zip(("out", "lse", "doc_max", "doc_lse", "gold", "route_max", "route_sum"), ours, (*ref, route, sums)):
        assert a.shape == b.shape and torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        finite = torch.isfinite(b)
        assert (a.double()[finite] - b[finite]).abs().max() <= 2e-5, name
    with pytest.raises(RuntimeError, match="not positive and finite"):
        kernel.decode_attention(q, k, v, 0.125, key_doc, n_docs, stat_rows, gold_mask, row_scale * 0, route_rows,
                                route_group)


@pytest.mark.parametrize("path,dtype", CASES)
def test_kernel_without_statistics_and_on_strided_chunks(path, dtype, kernels):
    """No key_doc: output and lse only; a chunk sliced out of a longer corpus (rows contiguous,
    heads strided) reads the right keys."""
    kernel = kernels[path]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 64, generator=g).to(dtype)
    k, v = (torch.randn(3, 9000, 64, generator=g).to(dtype) for _ in range(2))
    empty = torch.empty(0, dtype=torch.long)
    out, lse, doc_max, *_ = kernel.decode_attention(q, k[:, 1000:6000], v[:, 1000:6000], 0.125, empty, 0, empty, empty)
    ref = _reference(q, k[:, 1000:6000], v[:, 1000:6000], 0.125, torch.zeros(5000, dtype=torch.long), 1,
                     torch.tensor([0]), torch.zeros(1, 1, dtype=torch.bool))
    assert doc_max.numel() == 0
    assert (out.double() - ref[0]).abs().max() <= 2e-5 and (lse.double() - ref[1]).abs().max() <= 2e-5


@pytest.mark.parametrize("path", PATHS)
def test_kernel_refuses_scattered_documents_and_bad_shapes(path, kernels):
    kernel = kernels[path]
    q = torch.randn(1, 1, 64).bfloat16()
    k = torch.randn(1, 40, 64).bfloat16()
    scattered = torch.tensor([0] * 10 + [1] * 10 + [0] * 20)
    no_gold = torch.empty(0, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="not one run"):
        kernel.decode_attention(q, k, k, 0.1, scattered, 2, torch.tensor([0]), no_gold)
    with pytest.raises(RuntimeError, match="head dim"):
        kernel.decode_attention(q[..., :48], k[..., :48], k[..., :48], 0.1, scattered, 2, torch.tensor([0]), no_gold)
    if path == "native-avx512":
        with pytest.raises(RuntimeError, match="bf16"):
            kernel.decode_attention(q.float(), k, k, 0.1, scattered, 2, torch.tensor([0]), no_gold)
    else:
        with pytest.raises(RuntimeError, match="fp32 or bf16"):
            kernel.decode_attention(q, k, k.float(), 0.1, scattered, 2, torch.tensor([0]), no_gold)
        with pytest.raises(RuntimeError, match="fp32 or bf16"):
            kernel.decode_attention(q.half(), k, k, 0.1, scattered, 2, torch.tensor([0]), no_gold)


def _streams_inputs(seed=0, heads=9, kv=3, d=64, doc_lens=(700, 35, 1, 260, 90, 4000, 64), dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    n_inst = 11
    t = n_inst + sum(doc_lens)
    key_doc = torch.tensor([-1] * n_inst + [j for j, n in enumerate(doc_lens) for _ in range(n)])
    return dict(corpus_k=(torch.randn(kv, t, d, generator=g) * 1.5).to(dtype),
                corpus_v=torch.randn(kv, t, d, generator=g).to(dtype), key_doc=key_doc, n_docs=len(doc_lens),
                self_k=torch.randn(kv, 3, d, generator=g).to(dtype), self_v=torch.randn(kv, 3, d, generator=g).to(dtype),
                layer=1, scale=d**-0.5), g


@pytest.mark.parametrize("path,dtype", CASES)
@pytest.mark.parametrize("chunk_size", [333, 65536])
def test_shared_streams_on_the_kernel_equal_the_dense_reference(chunk_size, path, dtype, monkeypatch, forced):
    """Streams with their own queries, interventions and document numberings, sharing chunks:
    through the compiled kernel (checked to be the path taken) each equals the dense reference
    in fp32 on the same bf16 inputs, and PyTorch's flash path within bf16 rounding."""
    forced(path)
    base, g = _streams_inputs(dtype=dtype)
    n_docs = base["n_docs"]
    perms = [list(range(n_docs)), [2, 0, 4, 1, 3, 6, 5], [6, 5, 4, 3, 2, 1, 0]]
    # temperatures that are powers of two fold into bf16 queries exactly (others round the folded
    # query to bf16 on any path), so the reference can be the fp32 dense computation
    fns = [None, Temperature(0.5), Temperature(0.25) + Sink(1.0)]
    qs = [torch.randn(9, n_q, 64, generator=g).to(dtype) for n_q in (3, 1, 2)]
    kw = dict(n_corpus_keys=base["key_doc"].shape[0], n_docs_attended=n_docs, layer=1, scale=base["scale"],
              stats_rows="last", n_self=3)

    def numbering(i, key_doc):
        table = torch.tensor(perms[i])
        return torch.where(key_doc >= 0, table[key_doc.clamp(min=0)], key_doc)

    def run():
        streams = [CorpusAttentionStream(qs[i], n_docs, score_fn=fns[i], gold_docs=[perms[i][3]], **kw) for i in range(3)]
        for keys, values, key_doc in iter_chunks(base["corpus_k"], base["corpus_v"], base["key_doc"], chunk_size):
            update_shared(streams, keys, values, [numbering(i, key_doc) for i in range(3)])
        return [s.finish(base["self_k"], base["self_v"]) for s in streams]

    calls = []
    real = ca._update_native
    monkeypatch.setattr(ca, "_update_native", lambda *a: calls.append(1) or real(*a))
    native = run()
    assert calls, "the compiled kernel was not used"
    monkeypatch.setattr(ca, "_native_for", lambda *a: None)
    flash = run()
    fp32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in base.items()}
    for i in range(3):
        dense = dense_corpus_attention(**dict(fp32, q=qs[i].float(), key_doc=numbering(i, base["key_doc"])),
                                       score_fn=fns[i], gold_docs=[perms[i][3]])
        a, b = native[i], flash[i]
        assert torch.allclose(a.lse, dense.lse, atol=1e-4)
        assert torch.allclose(a.doc_max[:, 0], dense.doc_max[:, -1], atol=1e-4)
        assert torch.allclose(a.doc_lse[:, 0], dense.doc_lse[:, -1], atol=1e-4)
        assert torch.allclose(a.output.float(), dense.output, atol=1e-2)  # the output is cast to bf16
        assert torch.allclose(a.gold_output.float(), dense.gold_output[-1:], atol=1e-2)
        # the flash path's readout scores come from a bf16 matmul: equal within that rounding
        assert torch.allclose(a.doc_lse, b.doc_lse, atol=0.1) and torch.allclose(a.output.float(), b.output.float(), atol=2e-2)


@pytest.mark.parametrize("path,dtype", CASES)
def test_engine_on_the_kernel_matches_the_flash_path(small_limit, path, dtype, monkeypatch, forced):
    """A model whose head size the kernel takes (tiny-qwen3, d=32), in each dtype the path takes:
    the same decoded code and the same per-layer gold mass with and without the compiled kernel."""
    forced(path)
    model = load_model("tiny-qwen3", dtype=dtype)
    calls = []
    real = ca._update_native
    monkeypatch.setattr(ca, "_update_native", lambda *a: calls.append(1) or real(*a))
    runs = [BlockSearchRunner(model, small_limit, progress=False).run_query("q2", 12, intervention=SSMax(0.5, n="docs"))]
    assert calls
    monkeypatch.setattr(ca, "_native_for", lambda *a: None)
    runs.append(BlockSearchRunner(model, small_limit, progress=False).run_query("q2", 12, intervention=SSMax(0.5, n="docs")))
    a, b = runs
    assert a.decoded == b.decoded
    for la, lb in zip(a.layers, b.layers):
        mass_a = torch.exp(la.doc_lse - la.lse[..., None])
        mass_b = torch.exp(lb.doc_lse - lb.lse[..., None])
        assert torch.allclose(mass_a, mass_b, atol=0.02)


@pytest.mark.parametrize("path,dtype", CASES)
def test_kernel_with_wide_score_gaps(path, dtype, kernels):
    check_wide_gaps(kernels[path], dtype)


def check_wide_gaps(kernel, dtype=torch.bfloat16):
    """Scores hundreds of nats apart (real attention has them; the kernel flushes probabilities
    below fp32's normal range to zero): still the dense reference, documents far below the max
    keep finite statistics."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 3, 64, generator=g).to(dtype)
    k = (torch.randn(3, 4000, 64, generator=g) * 50).to(dtype)
    v = torch.randn(3, 4000, 64, generator=g).to(dtype)
    key_doc = torch.arange(4000) // 100
    stat_rows, gold_mask = torch.tensor([2]), torch.zeros(1, 40, dtype=torch.bool)
    gold_mask[0, :20] = True
    ours = kernel.decode_attention(q, k, v, 0.125, key_doc, 40, stat_rows, gold_mask)
    ref = _reference(q, k, v, 0.125, key_doc, 40, stat_rows, gold_mask)
    assert (ref[3].max() - ref[3].min()) > 100  # documents' log-masses span > 100 nats
    for name, a, b in zip(("out", "lse", "doc_max", "doc_lse", "gold"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert ((a.double() - b).abs() / b.abs().clamp(min=1)).max() <= 2e-5, name


def _native_avx512_without_amx_tiles():
    """native-avx512's AVX-512 BF16 dot-product path for q.k (where Linux does not grant AMX
    tiles, or LENS_NATIVE_AMX=0) is held to the same reference, in a process of its own (the
    choice is made once per process)."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, tests.integration.test_native_kernel as t\n"
        "k = t.build('native-avx512')\n"
        "assert not k.uses_amx()\n"
        "for shape in [(3, 3, 5000, 64), (8, 2, 3001, 128), (2, 5, 700, 32), (1, 1, 17, 64), (3, 24, 9000, 64)]:\n"
        "    t.check_against_reference(k, *shape)\n"
        "t.check_wide_gaps(k)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "LENS_NATIVE_AMX": "0"}, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


if "native-avx512" in PATHS:  # a variant of that path only (where this CPU cannot run it, it is compiled instead)
    test_native_avx512_without_amx_tiles_equals_dense_reference = _native_avx512_without_amx_tiles


@pytest.mark.parametrize("path,dtype", CASES)
def test_a_streams_numbers_do_not_depend_on_its_companions(path, dtype, forced):
    """Which kernel a stream takes depends on the stream alone, and rows do not interact: a
    stream fed with companions (stacked rows past the kernel's limit, with and without
    statistics) gets bit-identical numbers to the stream fed alone (a resumed sweep batches
    streams differently and must write the same records)."""
    forced(path)
    base, g = _streams_inputs(seed=3, dtype=dtype)
    n_docs = base["n_docs"]
    kw = dict(n_corpus_keys=base["key_doc"].shape[0], n_docs_attended=n_docs, layer=1, scale=base["scale"],
              stats_rows="last", n_self=60)
    qs = [torch.randn(9, n_q, 64, generator=g).to(dtype) for n_q in (1, 60, 60, 60, 2)]
    stats = [True, False, False, True, False]

    def run(which):
        streams = [CorpusAttentionStream(qs[i], n_docs, gold_docs=[2] if stats[i] else None, stats=stats[i], **kw)
                   for i in which]
        for keys, values, key_doc in iter_chunks(base["corpus_k"], base["corpus_v"], base["key_doc"], 4096):
            update_shared(streams, keys, values, [key_doc] * len(streams))
        self_k, self_v = (torch.randn(3, 60, 64, generator=torch.Generator().manual_seed(1)).to(dtype) for _ in range(2))
        return [s.finish(self_k, self_v) for s in streams]

    together = run(range(5))
    for i in (0, 1, 4):
        alone = run([i])[0]
        for name in ("output", "lse", "doc_max", "doc_lse", "gold_output"):
            a, b = getattr(together[i], name), getattr(alone, name)
            assert (a is None and b is None) or torch.equal(a, b), (i, name)

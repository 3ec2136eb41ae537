"""The dense corpus-attention reference against a from-scratch computation."""

import pytest
import torch

from kernels.corpus_attention import corpus_attention
from kernels.interventions import SSMax, Sink, Temperature
from tests.unit.test_score_functions import _inputs


def _naive(args, fn, gold):
    """Loop over heads and queries: softmax over all allowed keys; per-document sums by hand."""
    q, ck, cv, sk, sv = args["q"], args["corpus_k"], args["corpus_v"], args["self_k"], args["self_v"]
    heads, n_q, _ = q.shape
    rep = heads // ck.shape[0]
    t, s = ck.shape[1], sk.shape[1]
    out = torch.zeros(n_q, heads, q.shape[-1])
    mass = torch.zeros(heads, n_q, args["n_docs"])
    doc_max = torch.full((heads, n_q, args["n_docs"]), float("-inf"))
    gold_out = torch.zeros(n_q, heads, q.shape[-1])
    for h in range(heads):
        for i in range(n_q):
            n_self = s - n_q + i + 1
            keys = torch.cat([ck[h // rep], sk[h // rep, :n_self]])
            vals = torch.cat([cv[h // rep], sv[h // rep, :n_self]])
            sc = keys @ q[h, i] * args["scale"]
            if fn is not None:
                from kernels.score_functions import ScoreContext
                ctx = ScoreContext(args["layer"], heads, t + n_self, args["n_docs"], None)
                sc = fn(sc.view(1, 1, -1).expand(heads, 1, -1).clone(), ctx)[h, 0]
                sink = fn.sink_logit(ctx)
            else:
                sink = None
            denom = torch.exp(sc).sum() + (torch.exp(sink[h, 0, 0]) if sink is not None else 0)
            p = torch.exp(sc) / denom
            out[i, h] = p @ vals
            for j, d in enumerate(args["key_doc"].tolist()):
                if d >= 0:
                    mass[h, i, d] += p[j]
                    doc_max[h, i, d] = max(doc_max[h, i, d], sc[j])
                    if d in gold:
                        gold_out[i, h] += p[j] * vals[j]
    return out, mass, doc_max, gold_out


@pytest.mark.parametrize("fn", [None, Temperature(0.6), SSMax(0.43, n="keys"), SSMax(0.7, n="docs"), Sink(0.5),
                                Temperature(0.8) + Sink(-1.0)])
@pytest.mark.parametrize("shape", [dict(), dict(heads=9, kv=3, doc_lens=(1,), q=1, s=1), dict(doc_lens=(30, 2, 11), q=4, s=6)])
def test_corpus_attention_matches_naive(fn, shape):
    args = _inputs(seed=1, **shape)
    gold = [0] if args["n_docs"] == 1 else [0, 2]
    res = corpus_attention(**args, score_fn=fn, gold_docs=gold)
    out, mass, doc_max, gold_out = _naive(args, fn, gold)
    assert torch.allclose(res.output, out, atol=1e-5)
    assert torch.allclose(torch.exp(res.doc_lse - res.lse[..., None]), mass, atol=1e-5)
    assert torch.allclose(res.doc_max, doc_max, atol=1e-5)
    assert torch.allclose(res.gold_output, gold_out, atol=1e-5)


from kernels.reference import dense_corpus_attention  # noqa: E402
from kernels.interventions import HeadScale  # noqa: E402


def _assert_same(a, b, atol=1e-5):
    assert torch.allclose(a.output, b.output, atol=atol)
    assert torch.allclose(a.lse, b.lse, atol=atol)
    for name in ("doc_max", "doc_lse", "route_max"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(torch.isinf(x), torch.isinf(y)), name
            finite = torch.isfinite(x)
            assert torch.allclose(x[finite], y[finite], atol=atol), name
    if a.gold_output is not None or b.gold_output is not None:
        assert torch.allclose(a.gold_output, b.gold_output, atol=atol)


FNS = [None, Temperature(0.6), SSMax(0.43, n="keys"), SSMax(0.7, n="docs"), Sink(0.5), HeadScale(2, (1, 3), 2.5),
       Temperature(0.8) + SSMax(0.5, n="docs") + Sink(-1.0)]
SHAPES = [
    dict(),  # GQA 6 over 2
    dict(heads=9, kv=3, doc_lens=(1,), q=1, s=1),  # a corpus of one document, N=1
    dict(heads=16, kv=8, doc_lens=(30, 2, 11, 1, 17), q=4, s=6),  # Qwen3-0.6B-like grouping
    dict(heads=4, kv=4, doc_lens=tuple(range(1, 40)), q=2, s=3, n_inst=0),  # many unequal documents, no instruction
]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 64, 16384])
def test_streaming_equals_dense_reference(fn, shape, chunk_size):
    """Exact within 1e-5 (fp32), documents spanning chunk boundaries included."""
    args = _inputs(seed=2, **shape)
    gold = [0] if args["n_docs"] == 1 else [1, args["n_docs"] - 1]
    streamed = corpus_attention(**args, score_fn=fn, gold_docs=gold, route_stats=True, chunk_size=chunk_size)
    dense = dense_corpus_attention(**args, score_fn=fn, gold_docs=gold, route_stats=True)
    _assert_same(streamed, dense)


@pytest.mark.parametrize("fn", [None, SSMax(0.43, n="docs"), SSMax(0.43, n="keys"), Sink(1.0)])
@pytest.mark.parametrize("chunk_size", [3, 16384])
def test_routing_keep_docs_equals_dense_reference_and_masking(fn, chunk_size):
    args = _inputs(seed=4, doc_lens=(5, 9, 2, 7, 3, 6), q=3, s=4)
    keep = torch.tensor([True, False, True, False, False, True])
    streamed = corpus_attention(**args, score_fn=fn, gold_docs=[2], keep_docs=keep, chunk_size=chunk_size)
    dense = dense_corpus_attention(**args, score_fn=fn, gold_docs=[2], keep_docs=keep)
    _assert_same(streamed, dense)
    assert torch.isinf(streamed.doc_max[..., ~keep]).all() and torch.isfinite(streamed.doc_max[..., keep]).all()
    # routing == physically removing the documents that were not kept
    kept_keys = (args["key_doc"] < 0) | keep[args["key_doc"].clamp(min=0)]
    remap = torch.cumsum(keep.long(), 0) - 1
    sub = dict(args, corpus_k=args["corpus_k"][:, kept_keys], corpus_v=args["corpus_v"][:, kept_keys],
               key_doc=torch.where(args["key_doc"][kept_keys] >= 0, remap[args["key_doc"][kept_keys].clamp(min=0)], -1),
               n_docs=int(keep.sum()))
    removed = dense_corpus_attention(**sub, score_fn=fn, gold_docs=[int(remap[2])])
    assert torch.allclose(streamed.output, removed.output, atol=1e-5)
    assert torch.allclose(streamed.doc_lse[..., keep], removed.doc_lse, atol=1e-5)


def test_bf16_streaming_close_to_fp32():
    args = _inputs(seed=5, heads=9, kv=3, doc_lens=(40, 33, 51), q=5, s=5, d=64)
    bf = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in args.items()}
    a = corpus_attention(**args, gold_docs=[1])
    b = corpus_attention(**bf, gold_docs=[1], chunk_size=16)
    assert torch.allclose(a.output, b.output.float(), atol=0.05)
    assert torch.allclose(torch.exp(a.doc_lse - a.lse[..., None]), torch.exp(b.doc_lse - b.lse[..., None]), atol=0.02)


@pytest.mark.parametrize("fn", [None, Temperature(0.6), SSMax(0.43, n="keys"), SSMax(0.7, n="docs"), Sink(0.5),
                                HeadScale(2, (1, 3), 2.5), Temperature(0.8) + SSMax(0.5, n="docs") + Sink(-1.0)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [5, 64, 16384])
def test_fused_readout_path_equals_dense_reference(fn, shape, chunk_size):
    """stats_rows='last' with a foldable score function takes the fused flash path: the output
    and lse of every row, and the readout row's statistics, equal the dense reference."""
    args = _inputs(seed=3, **shape)
    gold = [0] if args["n_docs"] == 1 else [1, args["n_docs"] - 1]
    fused = corpus_attention(**args, score_fn=fn, gold_docs=gold, stats_rows="last", chunk_size=chunk_size,
                             route_stats=True)
    dense = dense_corpus_attention(**args, score_fn=fn, gold_docs=gold, route_stats=True)
    assert torch.allclose(fused.route_max, dense.route_max, atol=1e-5)
    assert torch.allclose(fused.output, dense.output, atol=1e-5)
    assert torch.allclose(fused.lse, dense.lse, atol=1e-5)
    for name in ("doc_max", "doc_lse"):
        assert torch.allclose(getattr(fused, name)[:, 0], getattr(dense, name)[:, -1], atol=1e-5), name
    assert torch.allclose(fused.gold_output[0], dense.gold_output[-1], atol=1e-5)


def test_fused_path_is_taken_only_for_foldable_functions():
    from kernels.corpus_attention import CorpusAttentionStream
    from kernels.score_functions import ScoreFunction

    class Additive(ScoreFunction):  # not a per-row scale: must use the generic path
        def __call__(self, scores, ctx):
            return scores + (ctx.key_doc == 0).float() if ctx.key_doc is not None else scores

    args = _inputs()
    kw = dict(n_corpus_keys=10, n_docs_attended=4, n_self=5, layer=2, scale=0.3, stats_rows="last")
    assert CorpusAttentionStream(args["q"], 4, score_fn=SSMax(0.4), **kw).folded_q is not None
    assert CorpusAttentionStream(args["q"], 4, score_fn=Additive(), **kw).folded_q is None
    assert CorpusAttentionStream(args["q"], 4, score_fn=None, **{**kw, "stats_rows": "all"}).folded_q is None
    a = corpus_attention(**args, score_fn=Additive(), stats_rows="last")
    b = dense_corpus_attention(**args, score_fn=Additive())
    assert torch.allclose(a.output, b.output, atol=1e-5)


@pytest.mark.parametrize("doc_lens", [(6, 3, 9, 1, 5, 8, 2), (1,) * 40])
@pytest.mark.parametrize("stats_rows", ["all", "last"])
@pytest.mark.parametrize("chunk_size", [4, 16384])
def test_key_order_does_not_matter(stats_rows, chunk_size, doc_lens):
    """Documents' keys need not be contiguous (a scattered order takes the per-chunk unique path,
    a contiguous one the slice path): permuting the corpus keys changes nothing."""
    args = _inputs(seed=6, doc_lens=doc_lens, q=3, s=3)
    perm = torch.randperm(args["key_doc"].shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = dict(args, corpus_k=args["corpus_k"][:, perm], corpus_v=args["corpus_v"][:, perm],
                    key_doc=args["key_doc"][perm])
    fn = SSMax(0.43, n="docs")
    a = corpus_attention(**shuffled, score_fn=fn, gold_docs=[2], route_stats=True, stats_rows=stats_rows,
                         chunk_size=chunk_size)
    b = dense_corpus_attention(**args, score_fn=fn, gold_docs=[2], route_stats=True)
    rows = slice(None) if stats_rows == "all" else slice(-1, None)
    assert torch.allclose(a.output, b.output, atol=1e-5)
    assert torch.allclose(a.route_max, b.route_max, atol=1e-5)
    for name in ("doc_max", "doc_lse"):
        assert torch.allclose(getattr(a, name), getattr(b, name)[:, rows], atol=1e-5), name


def test_shared_chunks_equal_one_stream_at_a_time():
    """update_shared: streams with different queries, interventions, statistics and document
    numberings fed the same chunks in one kernel call equal each stream fed alone (and the dense
    reference); a stream that cannot take the fused path is fed on its own inside it."""
    from kernels.corpus_attention import CorpusAttentionStream, update_shared, iter_chunks

    class Additive(SSMax):  # not foldable: the generic path
        def row_scale(self, ctx):
            return None

    base = _inputs(seed=8, heads=6, kv=2, doc_lens=(5, 1, 7, 3, 4), q=3, s=3)
    n_docs = base["n_docs"]
    perms = [list(range(n_docs)), [2, 0, 4, 1, 3], [4, 3, 2, 1, 0], [1, 2, 3, 4, 0]]
    fns = [None, SSMax(0.43, n="docs"), Temperature(0.7) + Sink(1.0), Additive(0.5, n="keys")]
    g = torch.Generator().manual_seed(9)
    qs = [torch.randn(6, n_q, 8, generator=g) for n_q in (3, 1, 2, 3)]
    kw = dict(n_corpus_keys=base["key_doc"].shape[0], n_docs_attended=n_docs, layer=2, scale=base["scale"],
              stats_rows="last")

    def make(i):
        return CorpusAttentionStream(qs[i], n_docs, n_self=3, score_fn=fns[i], gold_docs=[perms[i][2]],
                                     route_stats=True, **kw)

    def numbering(i, key_doc):
        table = torch.tensor(perms[i])
        return torch.where(key_doc >= 0, table[key_doc.clamp(min=0)], key_doc)

    together = [make(i) for i in range(4)]
    assert [s.folded_q is not None for s in together] == [True, True, True, False]
    alone = [make(i) for i in range(4)]
    for keys, values, key_doc in iter_chunks(base["corpus_k"], base["corpus_v"], base["key_doc"], 6):
        update_shared(together, keys, values, [numbering(i, key_doc) for i in range(4)])
        for i, s in enumerate(alone):
            s.update(keys, values, numbering(i, key_doc))
    for i in range(4):
        a = together[i].finish(base["self_k"], base["self_v"])
        b = alone[i].finish(base["self_k"], base["self_v"])
        args = dict(base, q=qs[i], key_doc=numbering(i, base["key_doc"]))
        dense = dense_corpus_attention(**args, score_fn=fns[i], gold_docs=[perms[i][2]], route_stats=True)
        for name in ("output", "lse", "doc_max", "doc_lse", "gold_output", "route_max"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), (i, name)
        assert torch.allclose(a.output, dense.output, atol=1e-5)
        assert torch.allclose(a.doc_lse[:, 0], dense.doc_lse[:, -1], atol=1e-5)


@pytest.mark.parametrize("fn", [None, SSMax(0.43, n="keys"), Temperature(0.6), HeadScale(0, (1, 3), 0.0)])
@pytest.mark.parametrize("chunk_size", [7, 16384])
def test_fused_routing_scores_are_the_raw_scores_maxsim_and_mean_key(fn, chunk_size):
    """The routing scores a stream keeps on the fused path come from the raw scores, before the
    intervention: each document's max over the query rows and its keys (QK-MaxSim) and the max
    over the rows of its keys' mean score (mean-key), as computed densely.  A head whose scores
    the intervention zeroes cannot be undone in the kernel; its stream takes the PyTorch pass."""
    from kernels.corpus_attention import attend_chunks, iter_chunks

    args = _inputs(seed=6, heads=9, kv=3, doc_lens=(40, 33, 1, 51, 8), q=4, s=4, d=64)
    q, k, v, key_doc, n_docs = args["q"], args["corpus_k"], args["corpus_v"], args["key_doc"], args["n_docs"]
    res = attend_chunks(q, iter_chunks(k, v, key_doc, chunk_size), n_docs, args["self_k"], args["self_v"],
                        n_corpus_keys=key_doc.shape[0], n_docs_attended=n_docs, layer=args["layer"],
                        scale=args["scale"], score_fn=fn, stats_rows="last", route_stats=True, route_mean=True)
    raw = (q.float() @ k.float().repeat_interleave(3, 0).transpose(-1, -2)) * args["scale"]  # [head, Q, T]
    for d in range(n_docs):
        keys_of_d = key_doc == d
        assert torch.allclose(res.route_max[:, d], raw[..., keys_of_d].amax((-1, -2)), atol=1e-5)
        assert torch.allclose(res.route_mean[:, d], raw[..., keys_of_d].mean(-1).amax(-1), atol=1e-5)

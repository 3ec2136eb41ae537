"""The dense corpus-attention reference against a from-scratch computation."""

import pytest
import torch

from kernels.corpus_attention import corpus_attention
from kernels.score_functions import SSMax, Sink, Temperature
from tests.test_score_functions import _inputs


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

"""Adaptive temperature (arXiv 2410.01104): its beta by hand, its identity case, and the two-pass
streaming run (each row's entropy from a first pass over the corpus) against the dense
computation (tests/integration/test_metrics.py checks the records against the hooked dense model)."""

import torch

from kernels.corpus_attention import CorpusAttentionStream, iter_chunks
from kernels.interventions import ADAPTIVE_POLY, AdaptiveTemperature, Temperature, row_entropy
from kernels.reference import dense_corpus_attention
from kernels.score_functions import ScoreContext, entropy_probe


def test_beta_by_hand_and_never_above_the_rows_temperature():
    fn = AdaptiveTemperature(h=0.5)
    h = torch.tensor([0.2, 0.5, 1.0, 3.0, 5.0, 8.0])
    poly = sum(c * h ** (len(ADAPTIVE_POLY) - 1 - i) for i, c in enumerate(ADAPTIVE_POLY))
    want = torch.where(h > 0.5, poly.clamp(min=1.0), torch.ones_like(h))
    assert torch.allclose(fn.beta(h), want)
    assert float(fn.beta(torch.tensor(3.0))) > 2.0 and float(fn.beta(torch.tensor(8.0))) == 1.0  # the fit's range
    assert (fn.beta(torch.linspace(0, 20, 200)) >= 1).all()


def test_row_entropy_is_the_softmax_entropy_over_the_attended_keys():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 50, generator=g)
    mask = torch.rand(4, 50, generator=g) > 0.3
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    want = -(p * torch.log(p.clamp(min=1e-30))).sum(-1, keepdim=True)
    assert torch.allclose(row_entropy(scores, mask), want, atol=1e-5)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    doc_lens = (40, 7, 120, 33, 60)
    key_doc = torch.tensor([-1] * 5 + [j for j, n in enumerate(doc_lens) for _ in range(n)])
    t = key_doc.shape[0]
    return dict(q=torch.randn(6, 3, 16, generator=g), corpus_k=torch.randn(2, t, 16, generator=g) * 0.5,
                corpus_v=torch.randn(2, t, 16, generator=g), key_doc=key_doc, n_docs=len(doc_lens),
                self_k=torch.randn(2, 3, 16, generator=g), self_v=torch.randn(2, 3, 16, generator=g), layer=2, scale=0.25)


def _two_pass(fn, a, chunk=50):
    kw = dict(n_corpus_keys=a["key_doc"].shape[0], n_docs_attended=a["n_docs"], n_self=3, layer=a["layer"],
              scale=a["scale"], stats_rows="last", gold_docs=[2])
    first = CorpusAttentionStream(a["q"], a["n_docs"], **{**kw, "gold_docs": None}, score_fn=entropy_probe(fn, a["layer"]),
                                  stats=False, entropy=True)
    for k, v, d in iter_chunks(a["corpus_k"], a["corpus_v"], a["key_doc"], chunk):
        first.update(k, v, d)
    entropy = first.finish_entropy(a["self_k"], a["self_v"])
    stream = CorpusAttentionStream(a["q"], a["n_docs"], **kw, score_fn=fn, row_entropy=entropy)
    for k, v, d in iter_chunks(a["corpus_k"], a["corpus_v"], a["key_doc"], chunk):
        stream.update(k, v, d)
    return stream.finish(a["self_k"], a["self_v"]), entropy


def test_two_pass_streaming_equals_the_dense_computation():
    a = _inputs()
    for fn in (AdaptiveTemperature(h=0.5), Temperature(2.0) + AdaptiveTemperature(h=1.0)):
        ours, entropy = _two_pass(fn, a)
        dense = dense_corpus_attention(**a, score_fn=fn, gold_docs=[2])
        assert (entropy > 1.0).all()  # the rows are flat enough for beta > 1: the check has teeth
        assert torch.allclose(ours.lse, dense.lse, atol=1e-4) and torch.allclose(ours.output, dense.output, atol=1e-4)
        assert torch.allclose(ours.doc_lse[:, 0], dense.doc_lse[:, -1], atol=1e-4)
        plain = dense_corpus_attention(**a, score_fn=entropy_probe(fn, a["layer"]), gold_docs=[2])
        assert not torch.allclose(plain.lse, dense.lse, atol=1e-2)  # it changed the attention


def test_a_threshold_above_every_rows_entropy_is_the_identity_and_other_layers_are_untouched():
    a = _inputs()
    ours, _ = _two_pass(AdaptiveTemperature(h=1e3), a)
    plain = dense_corpus_attention(**a, gold_docs=[2])
    assert torch.allclose(ours.lse, plain.lse, atol=1e-5) and torch.allclose(ours.output, plain.output, atol=1e-5)
    assert entropy_probe(AdaptiveTemperature(layers=(5,)), 2) is None
    ctx = ScoreContext(2, 6, 10)
    assert torch.equal(AdaptiveTemperature(layers=(5,)).row_scale(ctx), torch.ones(6, 1, 1))

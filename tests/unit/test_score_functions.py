"""Each intervention changes what it should and nothing else; identities are identities."""

import dataclasses
import math

from pathlib import Path

import pytest
import torch

from kernels.corpus_attention import corpus_attention
from kernels.interventions import HeadScale, HeadSink, LogN, Sink, SSMax, Temperature
from kernels.score_functions import INTERVENTIONS, Compose, ScoreContext, ScoreFunction
from kernels.spec import InterventionSpecError, parse_intervention


def _inputs(seed=0, heads=6, kv=2, q=3, d=8, doc_lens=(4, 7, 1, 5), n_inst=3, s=5):
    g = torch.Generator().manual_seed(seed)
    t = n_inst + sum(doc_lens)
    key_doc = torch.tensor([-1] * n_inst + [j for j, n in enumerate(doc_lens) for _ in range(n)])
    return dict(
        q=torch.randn(heads, q, d, generator=g), corpus_k=torch.randn(kv, t, d, generator=g),
        corpus_v=torch.randn(kv, t, d, generator=g), key_doc=key_doc, n_docs=len(doc_lens),
        self_k=torch.randn(kv, s, d, generator=g), self_v=torch.randn(kv, s, d, generator=g),
        layer=2, scale=d**-0.5,
    )


def _run(fn, **overrides):
    args = _inputs()
    args.update(overrides)
    return corpus_attention(**args, score_fn=fn, gold_docs=[1])


def _close(a, b):
    return torch.allclose(a.output, b.output, atol=1e-6) and torch.allclose(a.lse, b.lse, atol=1e-5)


@pytest.mark.parametrize("identity", [
    Temperature(1.0), SSMax(s=1.0, n="docs"), Sink(b=float("-inf")), HeadScale(2, (0, 3), 1.0), ScoreFunction(),
])
def test_identities(identity):
    args = _inputs()
    if isinstance(identity, SSMax):  # s * log N == 1
        identity = SSMax(s=1 / math.log(args["n_docs"]), n="docs")
    assert _close(_run(identity), _run(None))


def test_ssmax_keys_identity_when_s_log_n_is_one():
    # n = keys differs per query row (causal self part), so s*log(n) == 1 needs one row's n
    args = _inputs(q=1, s=1)
    n_keys = args["corpus_k"].shape[1] + 1
    a = corpus_attention(**args, score_fn=SSMax(s=1 / math.log(n_keys), n="keys"))
    b = corpus_attention(**args, score_fn=None)
    assert torch.allclose(a.output, b.output, atol=1e-6)


def test_temperature_scales_scores_and_changes_output():
    base, hot = _run(None), _run(Temperature(0.5))
    assert torch.allclose(hot.doc_max, base.doc_max * 2, atol=1e-5)  # MaxSim is post-intervention
    assert not torch.allclose(hot.output, base.output, atol=1e-3)


def test_ssmax_multiplies_by_s_log_n():
    base, ss = _run(None), _run(SSMax(s=0.43, n="docs"))
    assert torch.allclose(ss.doc_max, base.doc_max * 0.43 * math.log(4), atol=1e-5)


def test_sink_only_adds_to_the_denominator():
    """A sink rescales every key's weight by the same factor sigma(lse - b): the mass ratios
    between documents and the per-document maxima are unchanged."""
    base, sunk = _run(None), _run(Sink(b=1.5))
    assert torch.allclose(sunk.doc_max, base.doc_max)
    assert torch.allclose(sunk.lse, torch.logaddexp(base.lse, torch.tensor(1.5)), atol=1e-6)
    gate = torch.sigmoid(base.lse - 1.5).transpose(0, 1)[..., None]  # [Q, head, 1]
    assert torch.allclose(sunk.output, base.output * gate, atol=1e-6)


def test_head_scale_touches_only_its_heads_and_layer():
    base, scaled = _run(None), _run(HeadScale(2, (1, 4), 3.0))
    other = [h for h in range(6) if h not in (1, 4)]
    assert torch.allclose(scaled.output[:, other], base.output[:, other], atol=1e-6)
    assert not torch.allclose(scaled.output[:, [1, 4]], base.output[:, [1, 4]], atol=1e-3)
    assert _close(_run(HeadScale(5, (1, 4), 3.0)), base)  # another layer: untouched


def test_layer_restriction():
    assert _close(_run(Temperature(0.3, layers=(7,))), _run(None))
    assert _close(_run(SSMax({5: 0.9})), _run(None))  # per-layer dict without layer 2


def test_composition_applies_in_order_and_combines_sinks():
    composed = Temperature(0.5) + SSMax(0.43, n="docs") + Sink(1.0) + Sink(2.0)
    assert isinstance(composed, Compose) and len(composed.parts) == 4
    ctx = ScoreContext(layer=0, n_heads=2, n_keys=10, n_docs=4)
    s = torch.ones(2, 1, 3)
    assert torch.allclose(composed(s, ctx), s / 0.5 * 0.43 * math.log(4))
    assert torch.allclose(composed.sink_logit(ctx), torch.logaddexp(torch.tensor(1.0), torch.tensor(2.0)).expand(2, 1, 1))


@pytest.mark.parametrize("spec,expected", [
    ("none", "none"),
    ("temperature:t=0.5", "temperature:t=0.5"),
    ("ssmax:s=0.43", "ssmax:s=0.43,n=keys"),
    ("ssmax:s=0.43,n=docs", "ssmax:s=0.43,n=docs"),
    ("sink:b=4", "sink:b=4"),
    ("scale-heads:layer=19,heads=3|7,factor=2", "scale-heads:layer=19,heads=3|7,factor=2"),
    ("ssmax:s=16:0.5|17:0.6+sink:b=2", "ssmax:s=16:0.5|17:0.6,n=keys+sink:b=2"),
])
def test_spec_round_trip(spec, expected):
    fn = parse_intervention(spec)
    assert fn.spec() == expected
    assert parse_intervention(fn.spec()).spec() == expected


@pytest.mark.parametrize("spec,message", [
    ("sharpen:x=1", "unknown intervention 'sharpen'"),
    ("temperature:t=abc", "t='abc' is not a number"),
    ("temperature:t=0", "must be > 0"),
    ("ssmax:s=0.4,n=tokens", "'keys' or 'docs'"),
    ("sink:c=1", "sink takes ['b', 'layers']"),
    ("scale-heads:layer=3", "scale-heads needs"),
    ("temperature:0.5", "is not key=value"),
    ("", "empty intervention spec"),
])
def test_bad_specs_give_one_line_errors(spec, message):
    with pytest.raises(InterventionSpecError) as err:
        parse_intervention(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_log_n_scaling_is_the_identity_up_to_its_training_length_then_sharpens():
    """log-n (Qwen): factor max(1, log n / log train); the rows here attend 23..25 keys."""
    base = _run(None)
    assert _close(_run(LogN(train=25.0)), base)  # every row attends <= 25 keys: identity
    assert _close(_run(LogN(train=100.0, layers=(2,))), base)
    longer = _run(LogN(train=4.0))
    args = _inputs()
    n_keys = (args["key_doc"].shape[0] + torch.arange(3, 6)).float()  # corpus + causal self keys per row
    expected = _run(Temperature(1.0))  # same inputs; check against the closed-form factor below
    factor = torch.log(n_keys) / math.log(4.0)
    scaled = corpus_attention(**{**args, "q": args["q"] * factor.view(1, -1, 1)}, gold_docs=[1])
    assert torch.allclose(longer.output, scaled.output, atol=1e-5) and not _close(longer, expected)
    assert LogN(train=4.0).first_layer() == 0 and LogN(layers=(5, 7)).first_layer() == 5


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
def test_every_registered_intervention_parses_labels_and_hashes(name):
    """The registry is the grammar: each type's example parses, its label round-trips, equal specs
    give equal, hashable objects (the app caches on them), and each field names its kind and help."""
    cls = INTERVENTIONS[name]
    made = parse_intervention(cls.example)
    again = parse_intervention(made.spec())
    assert again == made and hash(again) == hash(made) and again.spec() == made.spec()
    for f in dataclasses.fields(cls):
        assert f.metadata["help"] and f.metadata["kind"] in ("number", "per_layer", "per_head", "int", "ints", "choice",
                                                             "layers")
    assert {made: 1}[again] == 1


def test_score_functions_are_frozen_and_per_layer_values_immutable():
    fn = SSMax({16: 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        fn.s = 0.1
    with pytest.raises(TypeError):
        fn.s[16] = 0.9
    assert SSMax([0.1, 0.2]).s == (0.1, 0.2) and hash(SSMax([0.1, 0.2])) == hash(SSMax((0.1, 0.2)))


def test_the_interventions_page_lists_every_registered_intervention():
    page = (Path(__file__).resolve().parents[2] / "docs" / "interventions.md").read_text()
    assert all(f"`{name}:" in page for name in INTERVENTIONS)


def test_a_sink_per_head_is_a_sink_on_each_head_alone():
    """head-sink:b=b0|b1|..: head h's softmax gains exp(b_h) in its denominator (off-by-one: 0),
    which equals the layer-wide sink run on that head; heads without a value are untouched."""
    base, args = _run(None), _inputs()
    values = (0.0, 1.5, -2.0)
    per_head = _run(HeadSink(values))
    for h, b in enumerate(values):
        alone = _run(Sink(b))
        assert torch.allclose(per_head.output[:, h], alone.output[:, h], atol=1e-6)
        assert torch.allclose(per_head.lse[h], alone.lse[h], atol=1e-6)
    assert torch.allclose(per_head.output[:, 3:], base.output[:, 3:], atol=1e-6)  # 6 heads, 3 values
    assert torch.allclose(per_head.lse[0], torch.logaddexp(base.lse[0], torch.tensor(0.0)), atol=1e-6)
    assert args["q"].shape[0] == 6


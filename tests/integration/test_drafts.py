"""Speculative decoding: drafted codes ride along in the query pass, and the decoding is the same
as without them."""

import pytest
import torch

from kernels.spec import parse_intervention
from lens.data.layout import LayoutConfig
from lens.runtime import BlockSearchRunner
from lens.errors import LensError


def _same(a, b, atol=1e-5):
    assert a.ranked_codes == b.ranked_codes and a.decoded == b.decoded and a.routed == b.routed
    assert torch.allclose(torch.tensor(a.ranked_logprobs), torch.tensor(b.ranked_logprobs), atol=atol)
    assert torch.allclose(a.digit_logprobs, b.digit_logprobs, atol=atol)
    assert torch.allclose(a.readout_logits, b.readout_logits, atol=atol)
    for name in ("attn_out", "gold_attn_out", "resid_post", "logit_lens", "route_scores"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=atol), name
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.allclose(x.doc_lse, y.doc_lse, atol=atol) and torch.allclose(x.doc_max, y.doc_max, atol=atol)
        assert torch.allclose(x.lse, y.lse, atol=atol) and torch.allclose(x.output, y.output, atol=atol)


@pytest.mark.parametrize("name, positions", [("tiny-llama", "shared"), ("tiny-qwen3", "sequential")])
@pytest.mark.parametrize("spec", [None, "ssmax:s=0.5", "sink:b=1+temperature:t=0.7", "route:layer=1,B=3+ssmax:s=0.4,n=docs"])
@pytest.mark.parametrize("beam", [1, 3])
def test_drafted_decoding_equals_plain_decoding(models, small_limit, name, positions, spec, beam):
    """Right drafts answer every step (no step computed); wrong and half-right drafts fall back to
    computed steps; every number equals the undrafted run's (to fp32 rounding)."""
    model = models(name)
    layout = LayoutConfig.for_model(model)
    layout = type(layout)(**{**layout.__dict__, "positions": positions})
    fn = None if spec is None else parse_intervention(spec)
    runner = BlockSearchRunner(model, small_limit, layout=layout, progress=False)
    plain = runner.run_streams([runner.stream("q1", 16, fn)], beam=beam)[0]
    assert runner.draft_counts == dict(drafted=0, computed=3 * len(plain.ranked_codes) if beam > 1 else 3)
    right = plain.ranked_codes
    wrong = ["".join(str((int(c) + 5) % 10) for c in code) for code in right]
    half = [code[:2] + wrong[0][2:] for code in right]
    for drafts in (right, wrong, half, right + wrong):
        fresh = BlockSearchRunner(model, small_limit, layout=layout, progress=False)
        run = fresh.run_streams([fresh.stream("q1", 16, fn)], beam=beam, drafts=[drafts])[0]
        _same(run, plain)
        if drafts is right and beam == 1:
            assert fresh.draft_counts == dict(drafted=3, computed=0)
        if drafts is wrong:
            assert fresh.draft_counts["drafted"] == 0
        if drafts is half and beam == 1:
            assert fresh.draft_counts == dict(drafted=2, computed=1)  # the third digit was drafted wrong


def test_drafts_for_some_streams_only(models, small_limit):
    """Streams with and without drafts in one call, one at N = the pool (shared reads)."""
    model = models("tiny-qwen3")
    requests = [("q0", 24, parse_intervention("ssmax:s=0.4")), ("q2", 24, None), ("q3", 9, parse_intervention("sink:b=2"))]
    runner = BlockSearchRunner(model, small_limit, progress=False)
    plain = runner.run_streams([runner.stream(q, n, fn) for q, n, fn in requests], beam=2)
    fresh = BlockSearchRunner(model, small_limit, progress=False)
    drafted = fresh.run_streams([fresh.stream(q, n, fn) for q, n, fn in requests], beam=2,
                                drafts=[plain[0].ranked_codes, None, ["0000"]])
    for a, b in zip(drafted, plain):
        _same(a, b)


def test_bad_drafts_are_refused(models, small_limit):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    with pytest.raises(LensError, match="expected a code of 4 digits"):
        runner.run_streams([runner.stream("q0", 8)], drafts=[["12a4"]])
    with pytest.raises(LensError, match="one list of codes per stream"):
        runner.run_streams([runner.stream("q0", 8)], drafts=[["1234"], ["0000"]])

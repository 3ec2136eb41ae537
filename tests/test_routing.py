"""Top-B routing in the engine: the routed set is the QK-MaxSim top-B computed from the dense
hooked model, layers up to the route layer are untouched, later layers see only routed documents."""

import pytest
import torch

from kernels.score_functions import InterventionSpecError, parse_intervention
from lens.data.layout import dense_layout
from lens.engine import BlockSearchRunner
from lens.errors import LensError


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_routed_set_is_dense_qk_maxsim_top_b(models, small_limit, reduce):
    model = models("tiny-qwen3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n, layer, b = 12, 1, 4
    run = runner.run_query("q4", n, score_fn=parse_intervention(f"route:layer={layer},B={b},reduce={reduce}"))
    query_ids = runner.pool.query_token_ids(model.tokenizer, "q4")
    layout = dense_layout(runner.pool, run.corpus, query_ids)
    _, cache = model.run_with_cache(layout.tokens[None], attention_mask=layout.mask[None, None],
                                    position_ids=layout.positions[None],
                                    names_filter=f"blocks.{layer}.attn.hook_attn_scores")
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0][:, layout.query_slice]  # [head, Q, T]
    per_doc = torch.stack([scores[..., layout.key_doc == j].amax(-1) for j in range(n)], -1)  # [head, Q, N]
    per_head = per_doc.amax(1)
    routing = per_head.amax(0) if reduce == "max" else per_head.mean(0)
    assert sorted(run.routed) == sorted(routing.topk(b).indices.tolist())
    assert torch.allclose(run.route_scores[layer, 0 if reduce == "max" else 1], routing, atol=1e-4)

    plain = runner.run_query("q4", n)
    for l in range(model.cfg.n_layers):
        a, p = run.layers[l], plain.layers[l]
        if l <= layer:
            assert torch.allclose(a.doc_lse, p.doc_lse, atol=1e-5)
        else:
            dropped = [j for j in range(n) if j not in run.routed]
            assert torch.isinf(a.doc_lse[..., dropped]).all()
            assert torch.isfinite(a.doc_lse[..., run.routed]).all()
    assert (run.readout_logits - plain.readout_logits).abs().max() > 1e-4


def test_route_keeping_every_document_changes_nothing(models, small_limit):
    model = models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    a = runner.run_query("q0", 8, score_fn=parse_intervention("route:layer=0,B=8"))
    b = runner.run_query("q0", 8)
    assert torch.allclose(a.readout_logits, b.readout_logits, atol=1e-5) and a.decoded == b.decoded
    c = runner.run_query("q0", 8, score_fn=parse_intervention("ssmax:s=0.5,n=docs+route:layer=0,B=8"))
    d = runner.run_query("q0", 8, score_fn=parse_intervention("ssmax:s=0.5,n=docs"))
    assert torch.allclose(c.readout_logits, d.readout_logits, atol=1e-5)


def test_bad_routes(models, small_limit):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    with pytest.raises(LensError, match="route layer 2: must be 0..1"):
        runner.run_query("q0", 8, score_fn=parse_intervention("route:layer=2,B=3"))
    with pytest.raises(InterventionSpecError, match="route needs"):
        parse_intervention("route:B=3")
    with pytest.raises(InterventionSpecError, match="reduce must be"):
        parse_intervention("route:layer=1,B=3,reduce=sum")


def test_many_streams_together_equal_one_at_a_time(models, small_limit):
    """Layer-major batching of (query, N, intervention) streams changes no number."""
    model = models("tiny-qwen3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    requests = [("q0", 5, None), ("q1", 12, parse_intervention("ssmax:s=0.4")),
                ("q2", 24, parse_intervention("route:layer=0,B=3+sink:b=1")), ("q0", 12, parse_intervention("temperature:t=2"))]
    together = runner.run_streams([runner.stream(q, n, fn) for q, n, fn in requests])
    for run, (q, n, fn) in zip(together, requests):
        alone = runner.run_query(q, n, fn)
        assert run.decoded == alone.decoded and run.routed == alone.routed
        assert torch.allclose(run.readout_logits, alone.readout_logits, atol=1e-5)
        for a, b in zip(run.layers, alone.layers):
            assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5)

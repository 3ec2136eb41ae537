"""Top-B routing in the engine: the routed set is the QK-MaxSim top-B computed from the dense
hooked model, layers up to the route layer are untouched, later layers see only routed documents."""

import pytest
import torch

from kernels.spec import InterventionSpecError, parse_intervention
from lens.data.layout import dense_layout
from lens.runtime import BlockSearchRunner
from lens.errors import LensError


def _dense_doc_scores(model, runner, run, query, layer, over_keys):
    """Per head, query token and document, the dense hooked model's raw scaled q.k at ``layer``
    reduced over each document's keys by ``over_keys`` (amax or mean): [head, Q, N]."""
    query_ids = runner.pool.query_token_ids(model.tokenizer, query)
    layout = dense_layout(runner.pool, run.corpus, query_ids)
    _, cache = model.run_with_cache(layout.tokens[None], attention_mask=layout.mask[None, None],
                                    position_ids=layout.positions[None],
                                    names_filter=f"blocks.{layer}.attn.hook_attn_scores")
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0][:, layout.query_slice]  # [head, Q, T]
    return torch.stack([getattr(scores[..., layout.key_doc == j], over_keys)(-1) for j in range(run.n_docs)], -1)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_routed_set_is_dense_qk_maxsim_top_b(models, small_limit, reduce):
    model = models("tiny-qwen3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n, layer, b = 12, 1, 4
    run = runner.run_query("q4", n, intervention=parse_intervention(f"route:layer={layer},B={b},reduce={reduce}"))
    per_head = _dense_doc_scores(model, runner, run, "q4", layer, "amax").amax(1)
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



@pytest.mark.parametrize("model_name", ["tiny-qwen3", "tiny-llama"])
def test_mean_key_routing_is_dense_q_dot_mean_key_top_b(models, small_limit, model_name):
    """route by=mean-key (MoBA-style): each document scored by the mean of the raw scaled q.k over
    its keys (= q . mean(K_doc)), max over query tokens and heads; the routed set is its top B."""
    model = models(model_name)
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n, layer, b = 12, 1, 4
    run = runner.run_query("q3", n, intervention=parse_intervention(f"route:layer={layer},B={b},by=mean-key"))
    routing = _dense_doc_scores(model, runner, run, "q3", layer, "mean").amax(1).amax(0)
    assert sorted(run.routed) == sorted(routing.topk(b).indices.tolist())
    maxsim = runner.run_query("q3", n, intervention=parse_intervention(f"route:layer={layer},B={b}"))
    assert maxsim.routed is not None and run.intervention == f"route:layer={layer},B={b},by=mean-key"


def test_route_keeping_every_document_changes_nothing(models, small_limit):
    model = models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    a = runner.run_query("q0", 8, intervention=parse_intervention("route:layer=0,B=8"))
    b = runner.run_query("q0", 8)
    assert torch.allclose(a.readout_logits, b.readout_logits, atol=1e-5) and a.decoded == b.decoded
    c = runner.run_query("q0", 8, intervention=parse_intervention("ssmax:s=0.5,n=docs+route:layer=0,B=8"))
    d = runner.run_query("q0", 8, intervention=parse_intervention("ssmax:s=0.5,n=docs"))
    assert torch.allclose(c.readout_logits, d.readout_logits, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunk_mean_routing_is_the_readout_rows_best_chunk_mean_key(models, small_limit, chunk):
    """route by=chunk-mean: each document's keys cut into chunks of ``chunk``, each chunk scored by
    the readout token's mean raw scaled q.k over it (= q . mean(K_chunk)), a document by its best
    chunk, heads by max; a chunk longer than every document is the readout row's mean key."""
    model = models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n, layer, b = 12, 1, 4
    run = runner.run_query("q3", n, intervention=parse_intervention(f"route:layer={layer},B={b},by=chunk-mean,chunk={chunk}"))
    query_ids = runner.pool.query_token_ids(model.tokenizer, "q3")
    layout = dense_layout(runner.pool, run.corpus, query_ids)
    _, cache = model.run_with_cache(layout.tokens[None], attention_mask=layout.mask[None, None],
                                    position_ids=layout.positions[None], names_filter=f"blocks.{layer}.attn.hook_attn_scores")
    readout = cache[f"blocks.{layer}.attn.hook_attn_scores"][0][:, layout.query_slice.stop - 1]  # [head, T]
    per_doc = []
    for j in range(n):
        keys = readout[:, layout.key_doc == j]
        per_doc.append(torch.stack([keys[:, i : i + chunk].mean(-1) for i in range(0, keys.shape[1], chunk)], -1).amax(-1))
    routing = torch.stack(per_doc, -1).amax(0)
    assert sorted(run.routed) == sorted(routing.topk(b).indices.tolist())
    if chunk == 1000:
        means = torch.stack([readout[:, layout.key_doc == j].mean(-1) for j in range(n)], -1).amax(0)
        assert torch.allclose(routing, means)
    assert run.intervention == f"route:layer={layer},B={b},by=chunk-mean,chunk={chunk}"


def test_bad_routes(models, small_limit):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    with pytest.raises(LensError, match="route layer 2: must be 0..1"):
        runner.run_query("q0", 8, intervention=parse_intervention("route:layer=2,B=3"))
    with pytest.raises(InterventionSpecError, match="route needs"):
        parse_intervention("route:B=3")
    with pytest.raises(InterventionSpecError, match="reduce must be"):
        parse_intervention("route:layer=1,B=3,reduce=sum")
    with pytest.raises(InterventionSpecError, match="applies to by=chunk-mean only"):
        parse_intervention("route:layer=1,B=3,chunk=8")


def test_many_streams_together_equal_one_at_a_time(models, small_limit):
    """Layer-major batching of (query, N, intervention) streams changes no number beyond fp32
    summation order (documents shared by every stream are read first, the others after)."""
    model = models("tiny-qwen3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    requests = [("q0", 5, None), ("q1", 12, parse_intervention("ssmax:s=0.4")),
                ("q2", 24, parse_intervention("route:layer=0,B=3+sink:b=1")), ("q0", 12, parse_intervention("temperature:t=2"))]
    together = runner.run_streams([runner.stream(q, n, fn) for q, n, fn in requests])
    for run, (q, n, fn) in zip(together, requests):
        alone = runner.run_query(q, n, fn)
        assert run.decoded == alone.decoded and run.routed == alone.routed
        assert torch.allclose(run.readout_logits, alone.readout_logits, atol=5e-5)
        for a, b in zip(run.layers, alone.layers):
            assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5)


def test_streams_over_the_same_documents_share_one_read(models, small_limit):
    """Streams share each read of the documents they all attend (queries over overlapping
    corpora, a beam's hypotheses): at every layer each document goes to the kernel once for all
    unrouted streams that hold it; a later call over the same documents reuses their
    concatenation; and every number equals running each stream alone, to fp32 summation order."""
    model = models("tiny-llama")
    fns = [None, parse_intervention("ssmax:s=0.4,n=docs"), parse_intervention("sink:b=1"),
           parse_intervention("route:layer=0,B=5")]
    requests = [(q, 24, fn) for q, fn in zip(["q0", "q1", "q2", "q3"], fns)] + [("q4", 12, None)]
    runner = BlockSearchRunner(model, small_limit, progress=False)
    runner.source.concat_min_docs = 8
    assert runner.corpus("q0", 24)[0] != runner.corpus("q1", 24)[0]
    fed, calls = [], []
    feed, feed_docs = runner.source.feed, runner.source._feed_docs
    runner.source.feed = lambda layer, streams: (calls.append(layer), feed(layer, streams))
    runner.source._feed_docs = lambda layer, streams, docs, *rest: (
        fed.append((len(calls), [s.attends_routed(layer) for s in streams], docs)), feed_docs(layer, streams, docs, *rest))
    together = runner.run_streams([runner.stream(q, n, fn) for q, n, fn in requests], beam=3)
    for call in range(1, len(calls) + 1):  # one layer of one pass
        unrouted = [d for c, routed, docs in fed if c == call and not any(routed) for d in docs]
        assert sorted(unrouted) == sorted(set(unrouted)) and len(set(unrouted)) == 24
    assert any(len(routed) == 5 for c, routed, docs in fed if c == 1 and len(docs) == 12)  # q4's documents, in all five
    runner.source.feed = feed
    runner.source._feed_docs = feed_docs
    later = runner.run_query("q5", 24, fns[1])
    held = len(runner.source._concat)
    assert runner.run_query("q5", 24, fns[1]).decoded == later.decoded and len(runner.source._concat) == held
    fresh = BlockSearchRunner(model, small_limit, progress=False).run_query("q5", 24, fns[1])
    assert later.decoded == fresh.decoded and torch.allclose(later.readout_logits, fresh.readout_logits, atol=1e-5)
    for a, b in zip(later.layers, fresh.layers):
        assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5)
    for run, (q, n, fn) in zip(together, requests):
        alone = BlockSearchRunner(model, small_limit, progress=False).run_streams([runner.stream(q, n, fn)], beam=3)[0]
        assert run.ranked_codes == alone.ranked_codes and run.routed == alone.routed
        assert torch.allclose(torch.tensor(run.ranked_logprobs), torch.tensor(alone.ranked_logprobs), atol=1e-4)
        assert torch.allclose(run.readout_logits, alone.readout_logits, atol=1e-4)
        assert torch.allclose(run.gold_attn_out, alone.gold_attn_out, atol=1e-5)
        for a, b in zip(run.layers, alone.layers):
            assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5) and torch.allclose(a.doc_max, b.doc_max, atol=1e-5)


@pytest.mark.parametrize("spec, first", [
    ("route:layer=1,B=4", 1), ("ssmax:s=0.5,layers=1|2", 1), ("scale-heads:layer=2,heads=0|2,factor=2", 2),
    ("sink:b=1", 0), ("temperature:t=0.5,layers=2+route:layer=1,B=3", 1), ("ssmax:s=2:0.6", 2),
])
def test_rerun_after_a_plain_run_starts_at_the_first_touched_layer(models, small_limit, spec, first):
    """After a plain run of a query, an intervention that leaves the first layers alone is
    computed from its first layer on (the earlier ones restored from the plain run), and every
    number equals a from-scratch run."""
    model = models("tiny-llama")
    fn = parse_intervention(spec)
    assert fn.first_layer() == first and model.cfg.n_layers == 3
    runner = BlockSearchRunner(model, small_limit, progress=False)
    runner.run_query("q2", 16)  # the plain run
    computed = []
    layer_fn = runner._layer
    runner._layer = lambda layer, streams, record: (computed.append((layer, record)), layer_fn(layer, streams, record))
    rerun = runner.run_query("q2", 16, fn, beam=2)
    assert min(layer for layer, record in computed if record) == first
    fresh = BlockSearchRunner(model, small_limit, progress=False).run_query("q2", 16, fn, beam=2)
    assert rerun.ranked_codes == fresh.ranked_codes and rerun.routed == fresh.routed
    assert torch.allclose(rerun.readout_logits, fresh.readout_logits, atol=1e-5)
    assert torch.allclose(rerun.digit_logprobs, fresh.digit_logprobs, atol=1e-5)
    assert len(rerun.layers) == len(fresh.layers) == model.cfg.n_layers
    for a, b in zip(rerun.layers, fresh.layers):
        assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5) and torch.allclose(a.output, b.output, atol=1e-5)
    for name in ("attn_out", "resid_post", "logit_lens", "route_scores"):
        assert torch.allclose(getattr(rerun, name), getattr(fresh, name), atol=1e-5), name


def test_a_routed_rerun_after_its_score_function_alone_starts_at_the_route_layer(models, small_limit):
    """X+route after a run of X: computed from the route layer on (the earlier layers are X's),
    every number equal to a from-scratch run; a sweep unit runs its unrouted streams first for this."""
    model = models("tiny-llama")
    base, routed = parse_intervention("ssmax:s=0.5"), parse_intervention("ssmax:s=0.5+route:layer=1,B=3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    runner.run_query("q2", 16, base)
    computed = []
    layer_fn = runner._layer
    runner._layer = lambda layer, streams, record: (computed.append((layer, record)), layer_fn(layer, streams, record))
    rerun = runner.run_query("q2", 16, routed, beam=2)
    assert min(layer for layer, record in computed if record) == 1
    fresh = BlockSearchRunner(model, small_limit, progress=False).run_query("q2", 16, routed, beam=2)
    assert rerun.ranked_codes == fresh.ranked_codes and rerun.routed == fresh.routed
    assert torch.allclose(rerun.digit_logprobs, fresh.digit_logprobs, atol=1e-5)
    for a, b in zip(rerun.layers, fresh.layers):
        assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5) and torch.allclose(a.output, b.output, atol=1e-5)
    for name in ("attn_out", "resid_post", "logit_lens", "route_scores"):
        assert torch.allclose(getattr(rerun, name), getattr(fresh, name), atol=1e-5), name
    # a run of another score function leaves nothing a routed stream of this one could start from
    other = BlockSearchRunner(model, small_limit, progress=False)
    other.run_query("q2", 16, parse_intervention("ssmax:s=0.7"))
    computed.clear()
    other._layer = lambda layer, streams, record: (computed.append((layer, record)), BlockSearchRunner._layer(other, layer, streams, record))
    other.run_query("q2", 16, routed)
    assert min(layer for layer, record in computed if record) == 0

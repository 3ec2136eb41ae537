"""The dense layers of many streams as one batch (``BlockSearchRunner(batch_dense=True)``, what
sweeps use): the same codes and, to rounding, the same records as each stream running its own;
with hooks attached the runner keeps streams apart, so a hook sees one stream's tensors."""

import pytest
import torch

from kernels.interventions import SSMax
from kernels.score_functions import Route
from lens.models.registry import load_model
from lens.runtime import BlockSearchRunner


def _runs(model, data, batch_dense):
    runner = BlockSearchRunner(model, data, progress=False, batch_dense=batch_dense)
    fns = [None, SSMax(0.5, n="docs"), Route(layer=1, B=4)]
    streams = [runner.stream(q, n, fn) for fn in fns for q, n in (("q0", 9), ("q1", 12), ("q2", 24))]
    return runner.run_streams(streams, beam=2)


@pytest.mark.parametrize("name,dtype,tol", [("tiny-llama", torch.float32, 1e-4), ("tiny-qwen3", torch.float32, 1e-4),
                                            ("tiny-llama", torch.bfloat16, 0.1)])
def test_batched_dense_layers_give_each_streams_numbers(small_limit, name, dtype, tol):
    model = load_model(name, dtype=dtype)
    alone, together = _runs(model, small_limit, False), _runs(model, small_limit, True)
    for a, b in zip(alone, together):
        assert a.ranked_codes == b.ranked_codes and a.routed == b.routed
        assert torch.allclose(a.digit_logprobs, b.digit_logprobs, atol=tol)
        assert torch.allclose(a.readout_logits, b.readout_logits, atol=tol * 10)
        for la, lb in zip(a.layers, b.layers):
            assert torch.allclose(la.lse, lb.lse, atol=tol) and torch.allclose(la.doc_lse, lb.doc_lse, atol=tol)
        assert torch.allclose(a.resid_post, b.resid_post, atol=tol * 10)


def test_hooks_keep_streams_apart(models, small_limit):
    model = models("tiny-llama")
    seen = []
    runner = BlockSearchRunner(model, small_limit, progress=False, batch_dense=True)
    streams = [runner.stream("q0", 9), runner.stream("q1", 12)]
    for s in streams:  # the documents' prefill first: the hook is to see the query side only
        runner.prefill(s.corpus)
    model.blocks[0].hook_resid_pre.add_hook(lambda x, hook: seen.append(tuple(x.shape)))
    try:
        runner.run_streams(streams, beam=1)
    finally:
        model.reset_hooks()
    assert seen and all(shape[0] == 1 for shape in seen)
    query_pass = [s for s in seen if s[1] > 1]
    assert len(query_pass) == 2  # one per stream, never the two stacked

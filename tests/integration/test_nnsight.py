"""The same temperature and SSMax interventions applied through nnsight (editing the softmax
input inside transformers' eager attention, float masks) give lens's logits."""

import math

import pytest
import torch

from kernels.interventions import SSMax, Temperature
from lens.data.layout import dense_layout
from lens.runtime import BlockSearchRunner
from tests.conftest import float_mask


def _nnsight_logits(nn_model, layout, edit):
    with nn_model.trace(layout.tokens[None], attention_mask=float_mask(layout.mask),
                        position_ids=layout.positions[None]):
        for layer in nn_model.model.layers:
            softmax = layer.self_attn.source.attention_interface_1.source.nn_functional_softmax_0
            scores = softmax.input.clone()
            rows = layout.query_slice  # lens intervenes on the query side over the cached corpus
            scores[..., rows, :] = edit(scores[..., rows, :])
            softmax.input = scores
        logits = nn_model.lm_head.output.save()
    return logits[0]


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fn", [Temperature(0.5), Temperature(2.0), SSMax(0.43, n="keys"), SSMax(0.6, n="docs")])
def test_nnsight_interventions_equal_lens_score_functions(name, fn, models, hf_models, small_limit):
    from nnsight.modeling.transformers import TransformersModel

    model = models(name)
    nn_model = TransformersModel(hf_models(name), tokenizer=model.tokenizer)
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n_docs = 7
    run = runner.run_query("q3", n_docs, intervention=fn)
    layout = dense_layout(runner.pool, run.corpus, runner.pool.query_token_ids(model.tokenizer, "q3"))
    n_keys = layout.mask.sum(-1)[layout.query_slice].float().view(1, 1, -1, 1)

    if isinstance(fn, Temperature):
        def edit(s):
            return s / fn.t
    else:
        log_n = torch.log(n_keys) if fn.n == "keys" else math.log(n_docs)

        def edit(s):
            return s * fn.s * log_n

    logits = _nnsight_logits(nn_model, layout, edit)
    readout = layout.query_slice.stop - 1
    plain = runner.run_query("q3", n_docs).readout_logits
    assert (logits[readout] - plain).abs().max() > 1e-3  # the intervention does something
    # fp32 summation-order noise: SSMax sharpens scores ~2.4x at this N, so SmolLM2's 30 layers
    # reach ~1.0e-4 on logits of magnitude ~30 (the un-intervened parity is ~8e-5).
    assert (logits[readout] - run.readout_logits).abs().max().item() <= 2e-4

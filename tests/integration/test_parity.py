"""lens vs transformers' own Llama/Qwen3 models: causal logits and the block-sparse layout."""

import pytest
import torch

from lens.data.layout import LayoutConfig, dense_layout
from lens.runtime import BlockSearchRunner
from tests.conftest import float_mask

MODELS = ["tiny-llama", "tiny-qwen3", pytest.param("smollm2-135m", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", MODELS)
def test_causal_logits_match_transformers(name, models, hf_models):
    model, hf = models(name), hf_models(name)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))
    ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == (2, 48, model.cfg.vocab_size)
    assert theirs.abs().max() > 1.0  # a real signal, not a near-zero model
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("positions", ["shared", "restart", "sequential"])
@pytest.mark.parametrize("name", MODELS)
def test_block_sparse_layout_matches_transformers_with_block_mask(name, positions, models, hf_models, small_limit):
    """Prefill + query pass + digit decoding == transformers on the whole layout with an
    explicit float 4D block mask and the same position ids."""
    model, hf = models(name), hf_models(name)
    runner = BlockSearchRunner(model, small_limit, LayoutConfig(positions=positions, query_offset=1024),
                               batch_tokens=64, progress=False)  # small batches: several, padded
    run = runner.run_query("q2", 9)
    query_ids = runner.pool.query_token_ids(model.tokenizer, "q2")
    digits = [runner.digit_ids[int(c)].item() for c in run.decoded[:-1]]
    layout = dense_layout(runner.pool, run.corpus, query_ids + digits)
    logits = hf(
        layout.tokens[None], attention_mask=float_mask(layout.mask), position_ids=layout.positions[None]
    ).logits[0]
    readout = layout.query_slice.start + len(query_ids) - 1
    assert (logits[readout] - run.readout_logits).abs().max().item() <= 1e-4
    # the greedy digits the engine decoded step by step are the dense model's greedy digits
    dense_digits = logits[readout : readout + 4][:, runner.digit_ids].argmax(-1).tolist()
    assert "".join(map(str, dense_digits)) == run.decoded
    # and the engine's per-step digit log-probs equal the dense ones
    dense_logp = torch.log_softmax(logits[readout : readout + 4][:, runner.digit_ids], -1)
    assert (dense_logp - run.digit_logprobs).abs().max().item() <= 1e-4


def test_dense_hooked_forward_matches_transformers_block_mask(models, hf_models, small_limit):
    """The hooked dense path with a boolean block mask equals transformers with the float mask."""
    model, hf = models("tiny-qwen3"), hf_models("tiny-qwen3")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    corpus, _ = runner.corpus("q0", 5)
    layout = dense_layout(runner.pool, corpus, runner.pool.query_token_ids(model.tokenizer, "q0"))
    ours = model(layout.tokens[None], attention_mask=layout.mask[None, None], position_ids=layout.positions[None])
    theirs = hf(layout.tokens[None], attention_mask=float_mask(layout.mask), position_ids=layout.positions[None]).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_bf16_prefill_close_to_fp32(small_limit):
    """bf16 runs (the fast CPU path) stay close to fp32: same greedy code, similar readout."""
    from lens.models.registry import load_model

    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model("tiny-llama", dtype=dtype)
        runs[dtype] = BlockSearchRunner(model, small_limit, progress=False).run_query("q1", 8)
    a, b = runs[torch.float32].readout_logits, runs[torch.bfloat16].readout_logits
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_beam_over_corpus_codes_ranks_by_code_probability(models, hf_models, small_limit):
    """With a beam as wide as the corpus, the ranked codes are every corpus code sorted by
    log P(code) = sum of the four digits' log-probs (over the ten digit tokens), each computed
    here by transformers with teacher forcing on the whole layout."""
    model, hf = models("tiny-llama"), hf_models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    n = 6
    run = runner.run_query("q1", n, beam=n)
    query_ids = runner.pool.query_token_ids(model.tokenizer, "q1")
    expected = {}
    for code in run.codes:
        digits = [runner.digit_ids[int(c)].item() for c in code]
        layout = dense_layout(runner.pool, run.corpus, query_ids + digits[:-1])
        logits = hf(layout.tokens[None], attention_mask=float_mask(layout.mask), position_ids=layout.positions[None]).logits[0]
        readout = layout.query_slice.start + len(query_ids) - 1
        logp = torch.log_softmax(logits[readout : readout + 4][:, runner.digit_ids], -1)
        expected[code] = sum(logp[i, int(c)].item() for i, c in enumerate(code))
    assert sorted(run.ranked_codes) == sorted(run.codes)
    assert run.ranked_codes == sorted(expected, key=lambda c: -expected[c])
    for code, lp in zip(run.ranked_codes, run.ranked_logprobs):
        assert abs(lp - expected[code]) < 1e-4
    assert run.decoded == run.ranked_codes[0]
    narrow = runner.run_query("q1", n, beam=2)
    assert narrow.ranked_codes[0] in run.codes and len(narrow.ranked_codes) == 2

"""Hook points: TransformerLens names, run_with_cache / run_with_hooks, and agreement with
TransformerLens's TransformerBridge on SmolLM2 under the BlockSearch block mask."""

import pytest
import torch

from lens.data.layout import dense_layout
from lens.runtime import BlockSearchRunner
from tests.conftest import float_mask

HOOKS_PER_BLOCK = [
    "hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
    "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
    "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]


def test_run_with_cache_names_and_shapes(models):
    model = models("tiny-qwen3")
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (2, 11, cfg.vocab_size)
    for layer in range(cfg.n_layers):
        for hook in HOOKS_PER_BLOCK:
            assert f"blocks.{layer}.{hook}" in cache, hook
    assert cache["blocks.0.attn.hook_q"].shape == (2, 11, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (2, 11, cfg.n_kv_heads, cfg.d_head)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, cfg.n_heads, 11, 11)
    assert cache["blocks.1.hook_resid_post"].shape == (2, 11, cfg.d_model)
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(2, cfg.n_heads, 11), atol=1e-5)
    assert pattern.triu(1).abs().max() == 0  # causal


def test_run_with_hooks_can_ablate_a_head(models):
    model = models("tiny-llama")
    tokens = torch.arange(100, 120)[None]

    def ablate(z, hook):
        z[:, :, 2] = 0
        return z

    clean = model(tokens)
    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate)])
    assert (clean - ablated).abs().max() > 1e-3
    assert torch.allclose(model(tokens), clean)  # hooks removed afterwards


def test_engine_hooks_fire_on_the_query_pass(models, small_limit):
    """hook_z, hook_attn_out etc. fire in the engine path too (the pattern hooks do not: no T x T)."""
    model = models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    runner.prefill(runner.corpus("q0", 6)[0])
    seen = []
    with model.hooks(fwd_hooks=[("blocks.2.attn.hook_z", lambda z, hook: seen.append(z.shape))]):
        runner.run_query("q0", 6)
    n_query = len(runner.pool.query_token_ids(model.tokenizer, "q0"))
    assert seen[0] == (1, n_query, model.cfg.n_heads, model.cfg.d_head)
    assert len(seen) == 4  # query block + three decoded digits


@pytest.mark.slow
def test_attention_hooks_agree_with_transformer_bridge_on_smollm2(models, small_limit):
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from lens.models.registry import smollm2_folder

    model = models("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=model.tokenizer, device="cpu"
    )
    runner = BlockSearchRunner(model, small_limit, progress=False)
    corpus, _ = runner.corpus("q1", 6)
    layout = dense_layout(runner.pool, corpus, runner.pool.query_token_ids(model.tokenizer, "q1"))
    names = [f"blocks.{layer}.attn.hook_{kind}" for layer in (0, 14, 29) for kind in ("attn_scores", "pattern")]
    theirs_logits, theirs = bridge.run_with_cache(
        layout.tokens[None], attention_mask=float_mask(layout.mask), position_ids=layout.positions[None],
        names_filter=lambda n: n in names,
    )
    ours_logits, ours = model.run_with_cache(
        layout.tokens[None], attention_mask=layout.mask[None, None], position_ids=layout.positions[None],
        names_filter=lambda n: n in names,
    )
    assert (ours_logits - theirs_logits).abs().max() <= 1e-4
    allowed = layout.mask[None, None].expand(1, model.cfg.n_heads, -1, -1)
    for name in names:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, name
        if name.endswith("attn_scores"):  # masked entries: -inf (lens) vs finfo.min (bridge)
            assert (a[allowed] - b[allowed]).abs().max() <= 1e-4, name
            assert (a[~allowed] == float("-inf")).all() and (b[~allowed] < -1e30).all()
        else:
            assert (a - b).abs().max() <= 1e-5, name

"""The nnsight backend: any transformers causal LM run densely in the BlockSearch layout.

On Llama-architecture models it must give lens's own engine's records (same weights, fp32); on
architectures lens's engine does not run (GPT-2, Gemma: random tiny configs built offline) its
statistics must equal transformers' own attention weights and logits, its interventions must do
what they say, and too long a context is refused with the reason."""

import pandas as pd
import pytest
import torch

from kernels.spec import parse_intervention
from lens.data.layout import LayoutConfig, dense_layout
from lens.errors import LensError
from lens.metrics import head_rows, layer_rows, query_row
from lens.models.hf import HFModel
from lens.models.backends import load_model
from lens.models.registry import smollm2_folder
from lens.runtime import BlockSearchRunner, make_runner
from lens.runtime.hf_runner import HFRunner

SPECS = [None, "ssmax:s=0.6,n=docs", "sink:b=2", "temperature:t=0.7", "adaptive:h=0.5", "log-n:train=4",
         "route:layer=1,B=3", "route:layer=1,B=3,by=mean-key", "route:layer=1,B=3,by=chunk-mean,chunk=4", "ssmax:s=0.5,n=keys+route:layer=0,B=2"]
FIELDS = ("attn_out", "gold_attn_out", "resid_post", "logit_lens", "route_scores")


@pytest.fixture(scope="module")
def hf_tiny_llama():
    return load_model("tiny-llama", backend="nnsight")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert torch.equal(torch.isinf(a), torch.isinf(b))  # the same documents unattended (routing)
    finite = torch.isfinite(a)
    x, y = a[finite].float(), b[finite].float()
    assert ((x - y).abs() / x.abs().clamp(min=1)).max().item() <= tol  # relative beyond magnitude 1


def _same_runs(ra, rb, tol: float) -> None:
    assert ra.ranked_codes == rb.ranked_codes and ra.decoded == rb.decoded and ra.routed == rb.routed
    assert ra.n_tokens == rb.n_tokens
    _close(ra.readout_logits, rb.readout_logits, tol * 10)
    _close(ra.digit_logprobs, rb.digit_logprobs, tol * 10)
    for name in FIELDS:
        _close(getattr(ra, name), getattr(rb, name), tol * 10)
    assert len(ra.layers) == len(rb.layers)
    for la, lb in zip(ra.layers, rb.layers):
        for name in ("output", "lse", "doc_max", "doc_lse", "gold_output"):
            _close(getattr(la, name), getattr(lb, name), tol)


@pytest.mark.parametrize("spec", SPECS)
def test_equals_lens_engine_on_tiny_llama(spec, models, hf_tiny_llama, small_limit):
    fn = parse_intervention(spec) if spec else None
    ours = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False).run_query("q3", 7, fn, beam=2)
    theirs = HFRunner(hf_tiny_llama, small_limit, progress=False).run_query("q3", 7, fn, beam=2)
    _same_runs(ours, theirs, 2e-5)
    assert query_row(ours)["decoded"] == query_row(theirs)["decoded"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", [None, "ssmax:s=0.43,n=keys", "route:layer=16,B=3"])
def test_equals_lens_engine_on_smollm2(spec, models, small_limit):
    fn = parse_intervention(spec) if spec else None
    ours = BlockSearchRunner(models("smollm2-135m"), small_limit, progress=False).run_query("q2", 6, fn, beam=2)
    hf = load_model("smollm2-135m", backend="nnsight")
    theirs = HFRunner(hf, small_limit, progress=False).run_query("q2", 6, fn, beam=2)
    _same_runs(ours, theirs, 3e-4)  # fp32 rounding over 30 layers (SSMax sharpens it), as in test_nnsight.py


def _tiny_other(arch: str):
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=49152, bos_token_id=0, eos_token_id=0, n_positions=1024, n_embd=64, n_layer=2, n_head=4))
    else:
        hf = GemmaForCausalLM(GemmaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    return load_model(hf.eval(), backend="nnsight", tokenizer=AutoTokenizer.from_pretrained(smollm2_folder()))


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_other_architectures_match_transformers_attention(arch, small_limit):
    model = _tiny_other(arch)
    runner = HFRunner(model, small_limit, LayoutConfig(query_offset=512), progress=False)  # GPT-2: 1,024 positions
    run = runner.run_query("q3", 7, beam=2)
    layout = dense_layout(runner.pool, run.corpus, runner.pool.query_token_ids(model.tokenizer, "q3"))
    mask = torch.zeros(layout.mask.shape).masked_fill(~layout.mask, torch.finfo(torch.float32).min)[None, None]
    out = model.hf(layout.tokens[None], attention_mask=mask, position_ids=layout.positions[None], output_attentions=True)
    assert (out.logits[0, -1] - run.readout_logits).abs().max().item() <= 1e-5
    for layer, res in enumerate(run.layers):
        weights = out.attentions[layer][0, :, -1]  # [head, T] at the readout token
        mass = torch.stack([weights[:, layout.key_doc == j].sum(-1) for j in range(7)], -1)
        assert (res.document_mass() - mass).abs().max().item() <= 1e-6
    rows = layer_rows(run)
    assert len(rows) == 2 and {"r_sum_hit", "r_any_hit", "gold_share"} <= set(rows[0]) and len(head_rows(run)) == 8
    assert 0 < rows[0]["gold_share"] < 1

    same = runner.run_query("q3", 7, parse_intervention("temperature:t=1"), beam=2)  # the identity
    assert same.ranked_codes == run.ranked_codes
    assert (same.readout_logits - run.readout_logits).abs().max().item() <= 1e-5
    sharp = runner.run_query("q3", 7, parse_intervention("ssmax:s=0.9,n=docs"), beam=2)
    assert (sharp.readout_logits - run.readout_logits).abs().max().item() > 1e-4
    routed = runner.run_query("q3", 7, parse_intervention("route:layer=0,B=2"), beam=2)
    assert len(routed.routed) == 2
    kept = torch.zeros(7, dtype=torch.bool)
    kept[routed.routed] = True
    assert (routed.layers[1].document_mass()[:, ~kept] == 0).all()
    assert (routed.layers[1].document_mass()[:, kept] > 0).all()


def test_context_limits_are_refused_with_the_reason(hf_tiny_llama, small_limit):
    runner = HFRunner(hf_tiny_llama, small_limit, progress=False, max_tokens=100)
    with pytest.raises(LensError, match="materialises every layer's T x T scores"):
        runner.run_query("q3", 7)
    gpt2 = HFRunner(_tiny_other("gpt2"), small_limit, progress=False)  # the query at position 4,096
    with pytest.raises(LensError, match="learned position table ends at 1023"):
        gpt2.run_query("q3", 7)


def test_loading_and_runner_choice(small_limit, hf_tiny_llama):
    assert isinstance(hf_tiny_llama, HFModel) and hf_tiny_llama.cfg.n_layers == 3
    assert isinstance(make_runner(hf_tiny_llama, small_limit, progress=False), HFRunner)
    with pytest.raises(LensError, match="keeps no KV cache"):
        make_runner(hf_tiny_llama, small_limit, kv="disk")
    with pytest.raises(LensError, match="backend 'vllm'"):
        load_model("tiny-llama", backend="vllm")
    with pytest.raises(LensError, match="pass backend='nnsight'"):
        load_model(hf_tiny_llama.hf)
    with pytest.raises(LensError, match="needs its tokenizer"):
        load_model(hf_tiny_llama.hf, backend="nnsight")


def test_sweep_records_equal_across_backends(tmp_path):
    from lens.metrics import read_records
    from lens.sweep import SweepConfig, run_sweep

    frames = {}
    for backend in ("lens", "nnsight"):
        cfg = SweepConfig(model="tiny-llama", dataset="synthetic-limit:docs=24,items=6,queries=6", n=[5, 7], queries=3,
                          interventions=["none", "ssmax:s=0.5,n=docs", "route:layer=1,B=2"], dtype="float32",
                          batch=3, backend=backend)
        run_sweep(cfg, tmp_path / backend, progress=False)
        frames[backend] = read_records(tmp_path / backend / "records.parquet")
    a, b = frames["lens"], frames["nnsight"]
    assert set(b.backend) == {"nnsight"} and set(a.backend) != {"nnsight"}
    keys = ["level", "query_id", "n_docs", "intervention", "layer", "head"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    assert a[keys].equals(b[keys])
    # a head's gold rank can differ where documents tie exactly (under shared positions every
    # document's first token has the same key): fewer than 5% of rows, the rest equal
    assert ((a.gold_rank - b.gold_rank).abs().fillna(0) > 0).mean() < 0.05
    for col in a.columns:
        if col in ("backend", "lens_version", "gold_rank"):
            continue
        if pd.api.types.is_float_dtype(a[col]):
            assert ((a[col] - b[col]).abs().fillna(0) <= 1e-4).all() and a[col].isna().equals(b[col].isna()), col
        else:
            assert a[col].astype(str).equals(b[col].astype(str)), col

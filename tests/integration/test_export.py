"""Exported artefacts load in the tools researchers use: the adapter through peft onto
transformers' SmolLM2, the merged checkpoint through AutoModelForCausalLM; both give lens's
logits, and the merged one decodes lens's codes on a small corpus."""

import json
import subprocess
import sys

import pytest
import torch

from lens.data.datasets import load_dataset
from lens.data.layout import dense_layout
from lens.errors import LensError
from lens.models.export import export
from lens.models.registry import smollm2_folder
from lens.runtime import BlockSearchRunner
from tests.conftest import float_mask

pytestmark = pytest.mark.slow
TOKENS = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(3))


def test_peft_loads_the_adapter_onto_transformers_smollm2(models, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = export("blocksearch-135m", tmp_path / "peft", "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32, attn_implementation="eager")
    tuned = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        theirs = tuned(TOKENS).logits
    ours = models("blocksearch-135m")(TOKENS)
    plain = models("smollm2-135m")(TOKENS)
    assert (ours - plain).abs().max() > 0.1  # the adapter changes the model
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_merged_checkpoint_decodes_lens_codes_in_plain_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = export("blocksearch-135m", tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = models("blocksearch-135m")
    assert tokenizer("Snow Leopards").input_ids == model.tokenizer("Snow Leopards").input_ids
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() <= 1e-4
    runner = BlockSearchRunner(model, load_dataset("limit-pairs:docs=8,queries=4"), progress=False)
    for query in runner.dataset.queries:
        run = runner.run_query(query.id, 8, record=False)
        query_ids = runner.pool.query_token_ids(model.tokenizer, query.id)
        digits = [runner.digit_ids[int(c)].item() for c in run.decoded[:-1]]
        layout = dense_layout(runner.pool, run.corpus, query_ids + digits)
        with torch.no_grad():
            logits = hf(layout.tokens[None], attention_mask=float_mask(layout.mask),
                        position_ids=layout.positions[None]).logits[0]
        readout = layout.query_slice.start + len(query_ids) - 1
        greedy = logits[readout : readout + 4][:, runner.digit_ids].argmax(-1).tolist()
        assert "".join(map(str, greedy)) == run.decoded


def test_the_length_aware_model_exports_its_s_and_the_cli_refuses_bad_targets(tmp_path):
    from lens.models.registry import adapter_names

    if "blocksearch-135m-ssmax" in adapter_names():
        folder = export("blocksearch-135m-ssmax", tmp_path / "ssmax", "peft")
        ssmax = json.loads((folder / "lens_ssmax.json").read_text())
        assert ssmax["n"] == "docs" and len(ssmax["s"]) == 30 and "log(N)" in ssmax["how"]
    with pytest.raises(LensError, match="not an adapter"):
        export("smollm2-135m", tmp_path / "x", "peft")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    done = subprocess.run([sys.executable, "-m", "lens.cli", "export", "tiny-llama", str(tmp_path / "full")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not an empty folder" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "lens.cli", "export", "tiny-llama", str(tmp_path / "tiny")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / "tiny" / "model.safetensors").is_file()

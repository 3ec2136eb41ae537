"""Model registry errors and the command line (run as a user would, in a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lens.errors import LensError
from lens.models.registry import load_model

LENS = [sys.executable, "-m", "lens.cli"]


def run_lens(*args, env=None):
    return subprocess.run(LENS + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_unknown_model_name():
    with pytest.raises(LensError, match="unknown model 'gpt-5'.*lens models"):
        load_model("gpt-5")


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(LensError, match="model_type 'gpt2' is not supported; lens runs llama, qwen3"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LensError, match="not valid JSON"):
        load_model(tmp_path)


def test_local_hf_folder_loads(tmp_path, models):
    """A local HF checkpoint folder (config.json + safetensors + tokenizer) of a supported arch."""
    from safetensors.torch import save_file

    from lens.models.loading import hf_config_dict
    from lens.models.registry import TINY_CONFIGS, smollm2_folder, tiny_state_dict

    cfg = TINY_CONFIGS["tiny-qwen3"]
    save_file(tiny_state_dict(cfg, 0), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    for f in Path(smollm2_folder()).glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    model = load_model(tmp_path)
    import torch
    tokens = torch.arange(5, 25)[None]
    assert torch.equal(model(tokens), models("tiny-qwen3")(tokens))


def test_cli_models_lists_registry():
    out = run_lens("models")
    assert out.returncode == 0, out.stderr
    for name in ("smollm2-135m", "tiny-llama", "tiny-qwen3"):
        assert name in out.stdout
    assert "30" in out.stdout.split("smollm2-135m")[1].splitlines()[0]  # layers


@pytest.mark.parametrize("args,message", [
    (["demo", "--model", "nope"], "unknown model 'nope'"),
    (["demo", "--model", "tiny-llama", "--n", "100"], "--n 100 is larger than the pool of 64 documents"),
    (["demo", "--model", "tiny-llama", "--intervention", "ssmax:q=1"], "ssmax takes"),
    (["demo", "--model", "tiny-llama", "--dataset", "/nonexistent"], "not a folder"),
    (["demo", "--model", "tiny-llama", "--max-doc-tokens", "20"], "more than max_doc_tokens=20"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message):
    out = run_lens(*args)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("lens: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_cli_demo_decodes_codes():
    out = run_lens("demo", "--model", "tiny-llama", "--n", "8,16", "--queries", "2",
                   "--intervention", "none", "--intervention", "temperature:t=0.5")
    assert out.returncode == 0, out.stderr
    decoded = [l for l in out.stdout.splitlines() if " decoded " in l]
    assert len(decoded) == 2 * 2 * 2
    assert all(len(l.split(" decoded ")[1].split()[0]) == 4 for l in decoded)


def test_blocksearch_is_registered_and_explains_a_missing_adapter():
    from lens.models.registry import ADAPTERS, REGISTRY

    assert "blocksearch-135m" in REGISTRY
    if not (ADAPTERS / "blocksearch-135m" / "adapter.safetensors").is_file():
        with pytest.raises(LensError, match="no trained adapter .*make train"):
            load_model("blocksearch-135m")


def test_quiet_and_verbose(tmp_path):
    """lens's notes go through the `lens` logger: --quiet keeps errors only and no progress bars."""
    import subprocess
    import sys

    args = ["demo", "--model", "tiny-llama", "--n", "8", "--queries", "1"]
    loud = subprocess.run([sys.executable, "-m", "lens.cli", *args], capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([sys.executable, "-m", "lens.cli", "--quiet", *args], capture_output=True, text=True,
                           timeout=300)
    assert loud.returncode == quiet.returncode == 0
    assert "hit@1" in quiet.stdout and "%|" not in quiet.stderr and "%|" in loud.stderr
    from lens.log import log, set_verbosity

    set_verbosity(quiet=True)
    assert not log.isEnabledFor(20)
    set_verbosity()
    assert log.isEnabledFor(20) and not log.isEnabledFor(10)

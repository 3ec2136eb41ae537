"""Artefacts other tools load: a shipped adapter in peft's own format (HF module names), and any
lens model as a merged transformers checkpoint (config, safetensors, tokenizer).

A model trained with a length-aware softmax (``blocksearch-135m-ssmax``) also writes
``lens_ssmax.json``: its learned s_L per layer and how to apply them (transformers has no such
softmax; without them the checkpoint is the adapter's weights under a plain softmax).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lens.errors import LensError
from lens.models.loading import hf_config_dict, rename
from lens.paths import atomic_dir

HF_BASE = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what a peft config names as its base
SSMAX_NOTE = ("Scalable softmax per layer: multiply the query rows' attention scores (scaled q.k) of layer L by "
              "s[L] * log(N), N the number of documents in the corpus, before the softmax; only the query and "
              "decoded digits' rows (documents are prefilled without it). lens applies it itself "
              "(model.builtin_score_fn); transformers does not.")

def hf_name(lens_name: str) -> str:
    """A lens parameter name as transformers names it (the inverse of ``loading.lens_name``)."""
    return rename(lens_name, to_hf=True)


def _ssmax_file(config: dict, state: dict, out: Path) -> None:
    if "ssmax" in config:
        s = state["ssmax.s"].float().tolist()
        (out / "lens_ssmax.json").write_text(json.dumps(dict(config["ssmax"], s=s, how=SSMAX_NOTE), indent=1))


def export_peft(adapter_dir: Path, out: Path) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` that ``PeftModel.from_pretrained``
    loads onto the base model (``base_model_name_or_path``; pass the base model object)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = load_file(adapter_dir / "adapter.safetensors")
    lora = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            module, _, rest = name.partition(".lora_")
            kind = rest.split(".")[0]  # A or B (lens keys carry peft's adapter name, "default")
            lora[f"base_model.model.{hf_name(module)}.lora_{kind}.weight"] = tensor.contiguous()
    peft_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=HF_BASE.get(config["base"], config["base"]),
        r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0, bias="none",
        target_modules=config["target_modules"], fan_in_fan_out=False, inference_mode=True,
    )
    with atomic_dir(out) as tmp:
        save_file(lora, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=1))
        # what peft's config has no field for: the layout the adapter was trained on, and its recipe
        (tmp / "lens_adapter.json").write_text(json.dumps(
            dict(layout=config.get("layout", {}), training=config.get("training", {})), indent=1))
        _ssmax_file(config, state, tmp)
    return out


def export_merged(model, out: Path) -> Path:
    """A transformers checkpoint of a loaded lens model (adapters merged): config.json,
    model.safetensors, the tokenizer, and lens_ssmax.json where the model has its own softmax."""
    cfg = model.cfg
    state = {hf_name(k): v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    config = dict(hf_config_dict(cfg), torch_dtype="float32")
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        model.tokenizer.save_pretrained(str(tmp))
        builtin = getattr(model, "builtin_score_fn", None)
        if builtin is not None:
            (tmp / "lens_ssmax.json").write_text(json.dumps(dict(n=builtin.n, s=list(builtin.s), how=SSMAX_NOTE), indent=1))
    return out


def export(name: str, out: str | Path, fmt: str = "merged") -> Path:
    from lens.models.registry import ADAPTERS, adapter_names, load_model

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LensError(f"{out}: exists and is not an empty folder; choose a new one")
    if fmt == "peft":
        if name not in adapter_names():
            raise LensError(f"--format peft: {name!r} is not an adapter; choose one of {', '.join(adapter_names())}")
        return export_peft(ADAPTERS / name, out)
    if fmt != "merged":
        raise LensError(f"--format {fmt!r}: choose merged or peft")
    return export_merged(load_model(name, dtype=torch.float32), out)

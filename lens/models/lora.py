"""LoRA adapters on the decoder's linear layers: add them for training, read their state, merge a
saved adapter into the weights (no peft needed at inference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from lens.models.decoder import Decoder

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def add_lora(model: Decoder, rank: int, alpha: float, targets: list[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters (peft) into the decoder's linear layers; returns the trainable ones."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state(model: Decoder) -> dict[str, Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def merge_lora(model: Decoder, adapter_dir: str | Path) -> None:
    """W <- W + (alpha / r) B A for every adapted linear layer (no peft needed at inference).

    An adapter trained with a length-aware softmax (``"ssmax"`` in its config, s_L stored as
    ``ssmax.s``) sets ``model.builtin_score_fn``: the engine runs every query row under it, before
    any intervention."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(adapter_dir / "adapter.safetensors")
    if "ssmax" in config:
        from kernels.interventions import SSMax

        s = state.pop("ssmax.s").float().tolist()
        model.builtin_score_fn = SSMax(s=tuple(s), n=config["ssmax"].get("n", "docs"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in state.items():
            if ".lora_A." not in name:
                continue
            b = state[name.replace(".lora_A.", ".lora_B.")]
            target = modules[name.split(".lora_A.")[0]]
            target.weight += (scale * (b.float() @ a.float())).to(target.weight.dtype)

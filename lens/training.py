"""Training a BlockSearch-style retriever through the inference code path.

:func:`layout_digit_logits` runs one example exactly as the engine does at inference (the
instruction block, block-sparse document prefill with ``kernels.block_prefill``, the query pass
with ``kernels.corpus_attention``), but with gradients, the four code digits teacher-forced.
LoRA adapters (peft) are the trained parameters; :func:`merge_lora` folds a saved adapter into a
loaded decoder (how ``blocksearch-135m`` is registered).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from kernels.corpus_attention import corpus_attention
from kernels.score_functions import ScoreFunction
from lens.engine import prefill_batch, run_instruction
from lens.models.decoder import Decoder

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def layout_digit_logits(
    model: Decoder,
    instruction_ids: list[int],
    docs: list[list[int]],
    query_ids: list[int],
    code_digits: list[int],
    digit_ids: Tensor,
    query_offset: int = 4096,
    score_fn: ScoreFunction | None = None,
    mass_layer: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Digit logits [4, 10] at the four code positions (teacher-forced), and, if ``mass_layer``
    is given, the readout token's log attention mass per document at that layer [head, N]."""
    n_inst = len(instruction_ids)
    instruction = run_instruction(model, instruction_ids)
    keys, values = prefill_batch(model, instruction, docs, [n_inst] * len(docs), model.tokenizer.pad_token_id or 0)
    lengths = [len(d) for d in docs]
    corpus_k = [torch.cat([instruction.keys[l]] + [keys[i, l, :n].transpose(0, 1) for i, n in enumerate(lengths)], 1)
                for l in range(model.cfg.n_layers)]
    corpus_v = [torch.cat([instruction.values[l]] + [values[i, l, :n].transpose(0, 1) for i, n in enumerate(lengths)], 1)
                for l in range(model.cfg.n_layers)]
    key_doc = torch.cat([torch.full((n_inst,), -1)] + [torch.full((n,), j) for j, n in enumerate(lengths)])
    tokens = torch.tensor(query_ids + [int(digit_ids[d]) for d in code_digits[:-1]])
    positions = torch.arange(query_offset, query_offset + tokens.shape[0])[None]
    log_mass = {}

    def attend(layer, q, k, v):
        res = corpus_attention(
            q[0].transpose(0, 1), corpus_k[layer], corpus_v[layer], key_doc, len(docs), k[0].transpose(0, 1),
            v[0].transpose(0, 1), layer=layer, scale=model.blocks[layer].attn.scale, score_fn=score_fn,
            stats=layer == mass_layer, stats_rows="all",
        )
        if layer == mass_layer:
            readout = len(query_ids) - 1
            log_mass["value"] = res.doc_lse[:, readout] - res.lse[:, readout : readout + 1]
        return res.output[None]

    resid = model.run_blocks(model.embed(tokens[None]), positions, attend)
    start = len(query_ids) - 1
    logits = model.unembed(resid[:, start : start + 4])[0]
    return logits[:, digit_ids], log_mass.get("value")


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
    """W <- W + (alpha / r) B A for every adapted linear layer (no peft needed at inference)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(adapter_dir / "adapter.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in state.items():
            if ".lora_A." not in name:
                continue
            b = state[name.replace(".lora_A.", ".lora_B.")]
            target = modules[name.split(".lora_A.")[0]]
            target.weight += (scale * (b.float() @ a.float())).to(target.weight.dtype)

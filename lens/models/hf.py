"""Any transformers causal LM, wrapped for the nnsight backend (:mod:`lens.runtime.hf_runner`):
the model in eager attention (so its pre-softmax scores exist as a tensor nnsight can read and
replace), its nnsight envoy, and where its decoder layers, attention, output projection, final
norm and unembedding live, found from the module tree rather than named per architecture.

    model = lens.load_model("path/to/hf-folder", backend="nnsight")   # or an HF model object
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lens.errors import LensError

OUT_PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")  # Llama/Qwen/Gemma/Mistral, GPT-2, Phi/NeoX, OPT
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
# the dense backend materialises every layer's [head, T, T] scores (transformers' eager attention)
MAX_TOKENS = 8192


@dataclass
class HFShape:
    n_layers: int
    n_heads: int
    vocab_size: int


class HFModel:
    """A transformers causal LM for the nnsight backend.  ``hf``: the model (eager attention,
    eval mode); ``envoy``: its nnsight wrapper; ``tokenizer``; ``name``; ``fingerprint``."""

    backend = "nnsight"

    def __init__(self, hf, tokenizer, name: str, fingerprint: str, builtin_score_fn=None, layout_defaults=None):
        from nnsight.modeling.transformers import TransformersModel

        if getattr(hf.config, "is_encoder_decoder", False):
            raise LensError(f"{name}: an encoder-decoder model; the nnsight backend runs causal LMs (decoder only)")
        hf.config._attn_implementation = "eager"  # scores as a tensor, and a float mask added as given
        self.hf, self.tokenizer, self.name, self.fingerprint = hf.eval(), tokenizer, name, fingerprint
        self.builtin_score_fn, self.layout_defaults = builtin_score_fn, layout_defaults or {}
        self.envoy = TransformersModel(hf, tokenizer=tokenizer)
        self.layers_path = _layers_path(hf)
        layer = hf.get_submodule(f"{self.layers_path}.0")
        self.attn_name = _attention_name(layer, name)
        attn = getattr(layer, self.attn_name)
        self.out_proj_name = next((n for n in OUT_PROJECTIONS if isinstance(getattr(attn, n, None), nn.Module)), None)
        if self.out_proj_name is None:
            raise LensError(f"{name}: its attention ({type(attn).__name__}) has none of the output projections "
                            f"{', '.join(OUT_PROJECTIONS)}; the nnsight backend needs one to split off the gold part")
        base = hf.base_model
        self.final_norm = next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)),
                               None)
        if self.final_norm is None:
            raise LensError(f"{name}: no final norm ({', '.join(FINAL_NORMS)}) on {type(base).__name__}; "
                            "the logit lens needs it")
        cfg = hf.config
        vocab = hf.get_output_embeddings().weight.shape[0]
        self.cfg = HFShape(cfg.num_hidden_layers, cfg.num_attention_heads, vocab)
        if tokenizer.vocab_size > vocab:
            raise LensError(f"{name}: tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}")
        self.digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
        # learned absolute positions (GPT-2's wpe, OPT's embed_positions) end at their table's size
        embeddings = hf.get_input_embeddings()
        tables = [m.num_embeddings for m in base.children() if isinstance(m, nn.Embedding) and m is not embeddings]
        self.max_position = min(tables) if tables else None

    def layer_envoy(self, layer: int):
        envoy = self.envoy
        for part in self.layers_path.split("."):
            envoy = getattr(envoy, part)
        return envoy[layer]

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(getattr(self.hf.get_submodule(f"{self.layers_path}.{layer}"), self.attn_name), self.out_proj_name)

    def digit_logit_lens(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding of residual vectors ``[..., d_model]``, the ten digits only."""
        weight = self.hf.get_output_embeddings().weight[self.digit_ids]
        return (self.final_norm(resid) @ weight.T).float()


def _layers_path(hf) -> str:
    n = hf.config.num_hidden_layers
    for path, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and path.count(".") <= 2:
            return path
    raise LensError(f"{type(hf).__name__}: no list of {n} decoder layers found; the nnsight backend needs one")


def _attention_name(layer: nn.Module, name: str) -> str:
    for child_name, child in layer.named_children():
        if "attention" in type(child).__name__.lower() or child_name in ("self_attn", "attn", "attention"):
            return child_name
    raise LensError(f"{name}: no attention module in {type(layer).__name__}; the nnsight backend needs one per layer")


def load_hf_model(source, tokenizer=None, dtype: torch.dtype = torch.float32) -> HFModel:
    """``source``: a transformers model object (give its ``tokenizer``), a local HF checkpoint
    folder (its own tokenizer unless one is given), or a lens model name (its weights, adapters
    merged, as the transformers model of that architecture, with its own length-aware softmax)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise LensError("an HF model object needs its tokenizer: load_model(hf_model, backend='nnsight', tokenizer=...)")
        digest = hashlib.sha256(repr(source.config.to_dict()).encode()).hexdigest()[:12]
        return HFModel(source.to(dtype), tokenizer, type(source).__name__, f"{type(source).__name__}-{digest}")
    from lens.models.registry import REGISTRY, TINY_CONFIGS, adapter_names

    name = str(source)
    if name in REGISTRY or name in TINY_CONFIGS or name in adapter_names():
        return _from_lens(name, dtype)
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise LensError(f"{name!r}: not a lens model name ({', '.join(REGISTRY)}) nor an HF checkpoint folder "
                        "(config.json + weights)")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise LensError(f"{folder}: no tokenizer there ({err}); pass tokenizer=...") from None
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    from lens.models.loading import folder_fingerprint

    return HFModel(hf, tokenizer, folder.name, f"{folder.name}-{folder_fingerprint(folder)}")


def _from_lens(name: str, dtype: torch.dtype) -> HFModel:
    """A lens model's weights as the transformers model of its architecture (in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lens.models.export import hf_name
    from lens.models.loading import hf_config_dict
    from lens.models.registry import load_model

    lens_model = load_model(name, dtype=torch.float32)
    cfg = hf_config_dict(lens_model.cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    state = {hf_name(k): v for k, v in lens_model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise LensError(f"{name}: its weights do not map onto {type(hf).__name__} (missing {missing}, unexpected {unexpected})")
    hf.tie_weights()
    return HFModel(hf.to(dtype), lens_model.tokenizer, name, f"nnsight-{lens_model.fingerprint}",
                   builtin_score_fn=getattr(lens_model, "builtin_score_fn", None),
                   layout_defaults=lens_model.layout_defaults)

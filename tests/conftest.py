import pytest
import torch

from lens.data.datasets import limit_dataset
from lens.models.loading import hf_config_dict
from lens.models.registry import load_model, smollm2_folder, tiny_state_dict

torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def models():
    """Loaded lens models by name, shared across the session (SmolLM2 takes a few seconds)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, dtype=torch.float32)
        return cache[name]

    return get


def hf_reference(name, model):
    """The transformers model with the same weights, eager attention, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "smollm2-135m":
        return AutoModelForCausalLM.from_pretrained(
            smollm2_folder(), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    cfg = hf_config_dict(model.cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.load_state_dict(tiny_state_dict(model.cfg, 0), strict=not model.cfg.tie_embeddings)
    hf.tie_weights()
    return hf


@pytest.fixture(scope="session")
def hf_models(models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_reference(name, models(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def small_limit():
    return limit_dataset(n_docs=24, items_per_doc=6, n_queries=6, seed=3)


def float_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [T, T] (True = attend) -> additive float [1, 1, T, T] for transformers eager
    (eager adds a boolean mask instead of applying it: see ENVIRONMENT.md)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out.masked_fill_(~mask, torch.finfo(torch.float32).min)
    return out[None, None]

"""Which engine runs a model: lens's own (:mod:`lens.models.registry`: Llama and Qwen3, block-sparse
streaming kernels, to about a million tokens) or nnsight (:mod:`lens.models.hf`: any transformers
causal LM, dense, small corpora)."""

from __future__ import annotations

from pathlib import Path

import torch

from lens.errors import LensError

BACKENDS = ("lens", "nnsight")


def load_model(name_or_path, dtype: torch.dtype = torch.float32, backend: str = "lens", tokenizer=None):
    """A model for ``backend``.  ``"lens"``: a registry name (``lens models``) or a local HF
    checkpoint folder of a supported architecture, as lens's own decoder.  ``"nnsight"``: any
    transformers causal LM (a folder, a model object with its ``tokenizer``, or a registry name)
    as an :class:`~lens.models.hf.HFModel`; :func:`lens.runtime.make_runner` gives its runner."""
    if backend not in BACKENDS:
        raise LensError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "nnsight":
        from lens.models.hf import load_hf_model

        return load_hf_model(name_or_path, tokenizer=tokenizer, dtype=dtype)
    if not isinstance(name_or_path, (str, Path)):
        raise LensError(f"a {type(name_or_path).__name__} object: lens's own engine loads a name or a folder; "
                        "pass backend='nnsight' to run a transformers model object")
    from lens.models.registry import load_model as load_lens

    return load_lens(name_or_path, dtype=dtype)

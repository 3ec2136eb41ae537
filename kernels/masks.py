"""Attention masks as small predicates, FlexAttention ``mask_mod``-style: a function of
(query index, key index) tensors that broadcast, True where the query attends the key.
:func:`create_mask` lays one out as a boolean matrix; the prefill, the instruction block, the
query pass with drafts, training's passes and the dense reference layout all build theirs so."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor], Tensor]


def causal(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx


def prefix_then_causal(n_prefix: int) -> MaskMod:
    """Every key of a shared prefix, then causally the query's own segment (keys after the
    prefix are numbered from 0 like the queries)."""
    return lambda q_idx, kv_idx: (kv_idx < n_prefix) | (kv_idx - n_prefix <= q_idx)


def same_segment(segment: Tensor) -> MaskMod:
    """Query and key in the same segment (``segment``: one id per position)."""
    return lambda q_idx, kv_idx: segment[q_idx] == segment[kv_idx]


def and_masks(*mods: MaskMod) -> MaskMod:
    def mod(q_idx, kv_idx):
        out = mods[0](q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(q_idx, kv_idx)
        return out
    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    def mod(q_idx, kv_idx):
        out = mods[0](q_idx, kv_idx)
        for m in mods[1:]:
            out = out | m(q_idx, kv_idx)
        return out
    return mod


def create_mask(mask_mod: MaskMod, n_q: int, n_kv: int, q_offset: int = 0, device=None) -> Tensor:
    """bool [n_q, n_kv]; query row i has index ``q_offset + i`` (e.g. the last Q of S keys)."""
    q_idx = torch.arange(q_offset, q_offset + n_q, device=device)[:, None]
    kv_idx = torch.arange(n_kv, device=device)[None, :]
    return mask_mod(q_idx, kv_idx).expand(n_q, n_kv)

"""Block-sparse document prefill: each document attends to the instruction block and causally
to itself, never to other documents.  Documents are batched; no T x T mask over the corpus is
ever built (the mask is [doc_len, prefix_len + doc_len], shared by the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.masks import create_mask, prefix_then_causal


def block_prefill(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor) -> Tensor:
    """Attention for a batch of right-padded documents behind a shared prefix.

    q: [docs, len, head, d]; k, v: [docs, len, kv_head, d]; prefix_k, prefix_v: [kv_head, P, d]
    (the instruction's keys and values).  Returns z [docs, len, head, d].  Right padding needs no
    mask of its own: a real token never sees a later (padding) position under the causal mask.
    """
    docs, length = q.shape[:2]
    n_prefix = prefix_k.shape[1]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(docs, -1, -1, -1), k.transpose(1, 2)], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(docs, -1, -1, -1), v.transpose(1, 2)], dim=2)
    mask = create_mask(prefix_then_causal(n_prefix), length, n_prefix + length, device=q.device)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    return z.transpose(1, 2)

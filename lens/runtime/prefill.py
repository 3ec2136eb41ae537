"""Prefill: the instruction block once (causal), then documents block-sparsely in fixed batches
(each document sees the instruction and itself).

A document's KV depends on the other rows of its batch at the last bit (padded width and GEMM
shape change the order of sums), so the batches are fixed per pool (:func:`pool_batches`), never
made from whichever documents happened to be asked for first."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.block_prefill import block_prefill
from kernels.masks import causal, create_mask
from lens.data.layout import PoolLayout, pool_order
from lens.models.decoder import Decoder
from lens.runtime.records import DocumentKV


def run_instruction(model: Decoder, token_ids: list[int]) -> DocumentKV:
    """The instruction block's KV (causal, positions 0..I-1).  Differentiable (training uses it);
    the engine calls it under no_grad."""
    ids = torch.tensor([token_ids])
    keys, values = [], []

    def attend(layer, q, k, v):
        keys.append(k[0].transpose(0, 1))
        values.append(v[0].transpose(0, 1))
        mask = create_mask(causal, q.shape[1], q.shape[1])[None, None]
        return model.blocks[layer].attn.dense(q, k, v, mask)

    model.run_blocks(model.embed(ids), torch.arange(ids.shape[1])[None], attend)
    return DocumentKV(torch.stack(keys), torch.stack(values))


def padded_documents(docs: list[list[int]], starts: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids and their positions [docs, width] for a batch of documents."""
    width = max(map(len, docs))
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(docs), width, dtype=torch.long)
    for row, (toks, start) in enumerate(zip(docs, starts)):
        ids[row, : len(toks)] = torch.tensor(toks)
        positions[row] = torch.arange(start, start + width)
    return ids, positions


def prefill_batch(
    model: Decoder, instruction: DocumentKV, docs: list[list[int]], starts: list[int], pad_id: int, stack: bool = True
) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:
    """Block-sparse prefill of right-padded documents: keys, values [docs, layer, len, kv_head, d]
    (``stack=False``: one [docs, len, kv_head, d] tensor per layer, which keeps autograd cheap)."""
    ids, positions = padded_documents(docs, starts, pad_id)
    keys, values = [], []

    def attend(layer, q, k, v):
        keys.append(k)
        values.append(v)
        return block_prefill(q, k, v, instruction.keys[layer], instruction.values[layer])

    model.run_blocks(model.embed(ids), positions, attend)
    if not stack:
        return keys, values
    return torch.stack(keys, dim=1), torch.stack(values, dim=1)


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group items (indices into ``lengths``, taken in the given order) so that each batch's
    padded size (count x longest) stays within ``batch_tokens``."""
    batches, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def pool_batches(pool: PoolLayout, seed: int, batch_tokens: int) -> list[list[int]]:
    """The fixed prefill batches of a pool (pool indices): runs of its seeded storage order
    (:func:`lens.data.layout.pool_order`, the order every corpus's distractors are drawn in) of
    up to ``batch_tokens`` padded tokens.  A corpus at size N is mostly a prefix of that order,
    so a small N prefills few batches beyond its own documents."""
    order = pool_order(len(pool.doc_token_ids), seed)
    return [[order[i] for i in b] for b in length_batches([len(pool.doc_token_ids[d]) for d in order], batch_tokens)]


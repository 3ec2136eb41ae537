"""Attention of a few query tokens over a corpus KV, with the per-document statistics the lens
needs.  This is the dense reference: it materialises [head, query, keys] scores, which is fine
for modest corpora; a streaming kernel replaces it behind the same interface.

Keys are the corpus (instruction + documents, ``key_doc`` naming each key's document, -1 for
the instruction) followed by the query side's own keys (``self_k``), of which the ``Q`` queries
are the last ``Q``: query i attends the corpus and the self keys up to and including itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.score_functions import ScoreContext, ScoreFunction, apply_score_function


@dataclass
class CorpusAttentionResult:
    output: Tensor  # [Q, head, d] attention output per head (z)
    lse: Tensor  # [head, Q] log of the softmax denominator (sink included)
    doc_max: Tensor | None = None  # [head, Q, N] max score over each document's tokens (MaxSim)
    doc_lse: Tensor | None = None  # [head, Q, N] logsumexp of each document's scores; mass = exp(doc_lse - lse)
    gold_output: Tensor | None = None  # [Q, head, d] the part of output contributed by gold_docs' tokens


def corpus_attention(
    q: Tensor,
    corpus_k: Tensor,
    corpus_v: Tensor,
    key_doc: Tensor,
    n_docs: int,
    self_k: Tensor,
    self_v: Tensor,
    *,
    layer: int,
    scale: float,
    score_fn: ScoreFunction | None = None,
    gold_docs: list[int] | None = None,
    stats: bool = True,
) -> CorpusAttentionResult:
    """q: [head, Q, d] (rotated); corpus_k/v: [kv_head, T, d]; key_doc: [T] long;
    self_k/v: [kv_head, S, d] with S >= Q."""
    n_heads, n_q, _ = q.shape
    n_rep = n_heads // corpus_k.shape[0]
    t, s = corpus_k.shape[1], self_k.shape[1]
    keys = torch.cat([corpus_k, self_k], dim=1).repeat_interleave(n_rep, dim=0)
    values = torch.cat([corpus_v, self_v], dim=1).repeat_interleave(n_rep, dim=0)
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale  # [head, Q, T+S]

    self_pos = torch.arange(s - n_q, s)  # each query's index among the self keys
    allowed = torch.ones(n_q, t + s, dtype=torch.bool)
    allowed[:, t:] = torch.arange(s)[None, :] <= self_pos[:, None]
    all_key_doc = torch.cat([key_doc, torch.full((s,), -1, dtype=key_doc.dtype)])
    n_keys = (t + self_pos + 1).view(1, n_q, 1)
    ctx = ScoreContext(layer, n_heads, n_keys, n_docs, all_key_doc)
    scores, sink = apply_score_function(scores, score_fn, ctx)
    scores = scores.masked_fill(~allowed, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.view(n_heads, 1).float())
    probs = torch.exp(scores - lse[..., None])
    output = (probs @ values.float()).transpose(0, 1).to(q.dtype)
    result = CorpusAttentionResult(output, lse)
    if not stats:
        return result

    doc_scores = scores[..., :t]
    is_doc = key_doc >= 0
    index = key_doc.clamp(min=0).expand(n_heads, n_q, t)
    neg_inf = torch.full((n_heads, n_q, n_docs), float("-inf"))
    masked = doc_scores.masked_fill(~is_doc, float("-inf"))
    result.doc_max = neg_inf.scatter_reduce(-1, index, masked, reduce="amax", include_self=True)
    shifted = torch.exp(masked - result.doc_max.gather(-1, index))
    sums = torch.zeros(n_heads, n_q, n_docs).scatter_add(-1, index, shifted)
    result.doc_lse = result.doc_max + torch.log(sums)
    if gold_docs:
        is_gold = torch.isin(key_doc, torch.tensor(gold_docs, dtype=key_doc.dtype))
        gold_probs = probs[..., :t] * is_gold
        result.gold_output = (gold_probs @ values[:, :t].float()).transpose(0, 1).to(q.dtype)
    return result

"""The materialised reference of corpus attention: all [head, Q, T+S] scores at once, fp32
throughout.  The oracle the streaming, fused and compiled paths are held to (tests, benchmarks);
never on the hot path."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.corpus_attention import CorpusAttentionResult, kept_keys, self_mask_rows
from kernels.online_softmax import merge_doc_stats
from kernels.score_functions import ScoreContext, ScoreFunction, apply_score_function


def dense_corpus_attention(
    q: Tensor, corpus_k: Tensor, corpus_v: Tensor, key_doc: Tensor, n_docs: int, self_k: Tensor, self_v: Tensor, *,
    layer: int, scale: float, score_fn: ScoreFunction | None = None, gold_docs: list[int] | None = None,
    stats: bool = True, keep_docs: Tensor | None = None, route_stats: bool = False, self_mask: Tensor | None = None,
) -> CorpusAttentionResult:
    """The materialised reference (all [head, Q, T+S] scores at once), fp32 throughout."""
    n_heads, n_q, _ = q.shape
    n_rep = n_heads // corpus_k.shape[0]
    t, s = corpus_k.shape[1], self_k.shape[1]
    keys = torch.cat([corpus_k, self_k], dim=1).float().repeat_interleave(n_rep, dim=0)
    values = torch.cat([corpus_v, self_v], dim=1).float().repeat_interleave(n_rep, dim=0)
    raw = (q.float() @ keys.transpose(-1, -2)) * scale  # [head, Q, T+S]

    kept = kept_keys(key_doc, keep_docs)
    kept = kept if kept is not None else torch.ones(t, dtype=torch.bool)
    allowed = torch.ones(n_q, t + s, dtype=torch.bool)
    allowed[:, :t] = kept
    allowed[:, t:] = self_mask_rows(n_q, s, self_mask)
    all_key_doc = torch.cat([key_doc, torch.full((s,), -1, dtype=key_doc.dtype)])
    n_keys = allowed.sum(1).view(1, n_q, 1)
    n_attended = int(keep_docs.sum()) if keep_docs is not None else n_docs
    ctx = ScoreContext(layer, n_heads, n_keys, n_attended, all_key_doc, mask=allowed)
    scores, sink = apply_score_function(raw, score_fn, ctx)
    scores = scores.masked_fill(~allowed, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.view(n_heads, 1).float())
    probs = torch.exp(scores - lse[..., None])
    result = CorpusAttentionResult((probs @ values).transpose(0, 1).to(q.dtype), lse)
    if route_stats:
        result.route_max = torch.full((n_heads, 1, n_docs), float("-inf"))
        merge_doc_stats(raw[..., :t].amax(1, keepdim=True), key_doc, result.route_max)
        result.route_max = result.route_max[:, 0]
    if not stats:
        return result
    doc_scores = scores[..., :t]
    result.doc_max = torch.full((n_heads, n_q, n_docs), float("-inf"))
    merge_doc_stats(doc_scores, key_doc, result.doc_max)
    result.doc_lse = torch.full((n_heads, n_q, n_docs), float("-inf"))
    for j in range(n_docs):
        in_doc = key_doc == j
        if in_doc.any():
            result.doc_lse[..., j] = torch.logsumexp(doc_scores[..., in_doc], dim=-1)
    if gold_docs:
        is_gold = torch.isin(key_doc, torch.tensor(gold_docs, dtype=key_doc.dtype))
        result.gold_output = ((probs[..., :t] * is_gold) @ values[:, :t]).transpose(0, 1).to(q.dtype)
    return result

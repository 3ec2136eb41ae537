"""Attention of a few query tokens over a corpus KV, with the per-document statistics the lens
needs.

Keys are the corpus (instruction + documents; ``key_doc`` names each key's document, -1 for the
instruction) followed by the query side's own keys (``self_k``), of which the ``Q`` queries are
the last ``Q``: query i attends the corpus and the self keys up to and including itself (or, with
``self_mask`` [Q, S], the self keys it names: a tree of drafted digits in speculative decoding).

* :func:`corpus_attention` streams the corpus in chunks with an online (flash-style) softmax:
  it never holds more than ``[head, Q, chunk]`` scores, so its memory does not grow with the
  corpus.  Its chunks can come from tensors or from a disk-backed store
  (:func:`attend_chunks`).
* :func:`kernels.reference.dense_corpus_attention` materialises all scores: the reference the
  tests hold the streaming kernel to.

Both apply a score function (intervention) inside, honour ``keep_docs`` (top-B routing: keys of
documents not kept are not attended), and return the output, the log-sum-exp, and per document
its max score (MaxSim), the log-sum-exp of its scores (so ``mass = exp(doc_lse - lse)`` is
exact), and the part of the output contributed by ``gold_docs``.  With routing, SSMax's and any
score function's ``n_keys`` / ``n_docs`` count what is attended (kept documents only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Iterator

import torch
from torch import Tensor

from kernels.fused import update_fused_streams
from kernels.online_softmax import (
    ChunkMeans, OnlineSoftmax, add_doc_sums, add_key_sum_scores, gold_part, grouped_row_max, grouped_scores,
    merge_doc_stats,
)
from kernels.score_functions import ScoreContext, ScoreFunction, apply_score_function


@dataclass
class CorpusAttentionResult:
    output: Tensor  # [Q, head, d] attention output per head (z)
    lse: Tensor  # [head, Q] log of the softmax denominator (sink included)
    doc_max: Tensor | None = None  # [head, Q, N] max score over each document's tokens (MaxSim); -inf if not attended
    doc_lse: Tensor | None = None  # [head, Q, N] logsumexp of each document's scores; mass = exp(doc_lse - lse)
    gold_output: Tensor | None = None  # [Q, head, d] the part of output contributed by gold_docs' tokens
    route_max: Tensor | None = None  # [head, N] max over query tokens and each document's keys of the raw scaled q.k
    route_mean: Tensor | None = None  # [head, N] max over query tokens of q . mean(K_doc), scaled (mean-key routing)
    # keys per chunk -> [head, N], the readout row's best q . mean(K_chunk) over the document's chunks (chunk-mean routing)
    route_chunk: dict | None = None

    def document_mass(self, row: int = -1) -> Tensor:
        """Each document's softmax mass at one statistics row (default: the readout), [head, N],
        in [0, 1] with a sum <= 1: ``exp(doc_lse - lse)`` in fp32, where the denominator is never
        taken below the documents' own total (in bf16 the statistics' scores are rounded, the
        flash denominator's are not, so at extreme settings the two can disagree; the sum over
        documents then is the documents' own).  Documents not attended get 0."""
        doc_lse = self.doc_lse[:, row].float()
        lse = self.lse[:, -1:].float() if row == -1 else self.lse[:, row : row + 1].float()
        denominator = torch.maximum(lse, torch.logsumexp(doc_lse, -1, keepdim=True))
        return torch.exp(doc_lse - denominator).nan_to_num(0.0)


Chunk = tuple[Tensor, Tensor, Tensor]  # keys [kv_head, C, d], values [kv_head, C, d], key_doc [C]


def self_mask_rows(n_q: int, n_self: int, mask: Tensor | None) -> Tensor:
    """Which self keys each query row attends, bool [Q, S]: by default the Q queries are the last
    Q self keys, each attending the keys up to itself (causal).  A given mask (e.g. a tree of
    drafted digits, each attending the query and its own earlier digits) is checked for shape."""
    if mask is None:
        return torch.arange(n_self)[None, :] <= torch.arange(n_self - n_q, n_self)[:, None]
    if mask.shape != (n_q, n_self) or mask.dtype != torch.bool:
        raise ValueError(f"self_mask must be bool [{n_q}, {n_self}] (query rows, self keys); got {mask.dtype} {list(mask.shape)}")
    return mask


def kept_keys(key_doc: Tensor, keep_docs: Tensor | None) -> Tensor | None:
    """Boolean [T] of the keys attended under routing (instruction keys always), or None for all."""
    if keep_docs is None:
        return None
    return (key_doc < 0) | keep_docs[key_doc.clamp(min=0)]


def iter_chunks(
    keys: Tensor, values: Tensor, key_doc: Tensor, chunk_size: int, keep_docs: Tensor | None = None
) -> Iterator[Chunk]:
    kept = kept_keys(key_doc, keep_docs)
    if kept is not None:
        index = kept.nonzero().squeeze(1)
        keys, values, key_doc = keys[:, index], values[:, index], key_doc[index]
    for start in range(0, key_doc.shape[0], chunk_size):
        stop = start + chunk_size
        yield keys[:, start:stop], values[:, start:stop], key_doc[start:stop]


class CorpusAttentionStream:
    """Online (flash-style) softmax of one set of query tokens over chunks of corpus keys.

    Feed chunks with :meth:`update` in any order and as many as wanted (each key once), then
    :meth:`finish` with the query side's own keys.  ``n_corpus_keys`` / ``n_docs_attended`` are
    how many corpus keys and documents will be fed in all: score functions (SSMax) need them
    before the stream ends.  ``stats_rows="last"`` keeps per-document statistics for the last
    query token only (the readout token), which is what keeps many streams cheap at large N."""

    def __init__(
        self, q: Tensor, n_docs: int, *, n_corpus_keys: int, n_docs_attended: int, n_self: int, layer: int,
        scale: float, score_fn: ScoreFunction | None = None, gold_docs: list[int] | None = None,
        stats: bool = True, route_stats: bool = False, stats_rows: str = "all", self_mask: Tensor | None = None,
        route_rows: slice = slice(None), route_mean: bool = False, row_entropy: Tensor | None = None,
        entropy: bool = False, route_chunks: dict[int, int] | None = None,
    ):
        n_heads, n_q, d = q.shape
        self.q, self.scale, self.layer, self.score_fn = q, scale, layer, score_fn
        self.n_docs, self.n_docs_attended = n_docs, n_docs_attended
        self.self_mask = self_mask_rows(n_q, n_self, self_mask)
        self.n_keys = (n_corpus_keys + self.self_mask.sum(1)).view(1, n_q, 1)
        self.rows = slice(n_q - 1, n_q) if stats_rows == "last" else slice(0, n_q)
        n_rows = 1 if stats_rows == "last" else n_q
        self.gold = torch.tensor(gold_docs, dtype=torch.long) if gold_docs else None
        self.row_entropy = row_entropy  # each row's entropy from a first pass (adaptive temperature)
        self.state = OnlineSoftmax(n_heads, n_q, d, n_rows if gold_docs and stats else None, entropy=entropy)
        self.doc_max = torch.full((n_heads, n_rows, n_docs), float("-inf")) if stats else None
        self.doc_lse = torch.full((n_heads, n_rows, n_docs), float("-inf")) if stats else None
        self.route_max = torch.full((n_heads, n_docs), float("-inf")) if route_stats else None
        self.route_rows = route_rows  # the rows routing scores reduce over (the query's own, not drafted digits)
        n_route = len(range(n_q)[route_rows])
        self.route_sum = torch.zeros(n_heads, n_route, n_docs) if route_mean else None
        self.route_count = torch.zeros(n_docs) if route_mean else None
        # chunk-mean routing scores of the readout row: {keys per chunk: chunks per document at most}
        self.route_chunks = [ChunkMeans(n_heads, n_docs, c, k) for c, k in route_chunks.items()] if route_chunks else None
        # Fast path: a score function that only scales each (head, row) folds into q, the bulk
        # goes through PyTorch's fused flash kernel, and per-document statistics are computed
        # for the readout row alone (the generic path keeps them for every row if asked).
        scale_rows = (torch.ones(n_heads, 1, 1) if score_fn is None
                      else score_fn.row_scale(ScoreContext(layer, n_heads, self.n_keys, n_docs_attended, None,
                                                           row_entropy=row_entropy)))
        self.folded_q = self.row_scales = None
        if scale_rows is not None and stats_rows == "last" and not entropy:  # a first pass sees raw scores
            self.folded_q = (q.float() * scale_rows).to(q.dtype)
            self.row_scales = scale_rows.float().expand(n_heads, n_q, 1)

    def _context(self, key_doc: Tensor) -> ScoreContext:
        return ScoreContext(self.layer, self.q.shape[0], self.n_keys, self.n_docs_attended, key_doc,
                            row_entropy=self.row_entropy)

    def update(self, keys: Tensor, values: Tensor, key_doc: Tensor) -> None:
        """One chunk: keys, values [kv_head, C, d]; key_doc [C] (document of each key, -1 none)."""
        if self.folded_q is not None:
            self._update_fused(keys, values, key_doc)
            return
        raw = grouped_scores(self.q, keys, self.scale)
        if self.route_max is not None:
            merge_doc_stats(raw[:, self.route_rows].amax(1, keepdim=True), key_doc, self.route_max[:, None])
        if self.route_sum is not None:
            add_doc_sums(raw[:, self.route_rows], key_doc, self.route_sum, self.route_count)
        for means in self.route_chunks or ():
            means.add(raw[:, -1], key_doc)
        scores, _ = apply_score_function(raw, self.score_fn, self._context(key_doc))
        self._accumulate(scores, values, key_doc)

    def _grouped_q(self, dtype: torch.dtype, n_kv: int, folded: bool = True) -> Tensor:
        """The folded (or, ``folded=False``, raw) queries as [kv_head, rows, d]: the heads of a KV
        group become extra query rows of that KV head (no K/V expansion)."""
        n_heads, n_q, d = self.q.shape
        return (self.folded_q if folded else self.q).to(dtype).reshape(n_kv, (n_heads // n_kv) * n_q, d)

    def grouped_row_scale(self, n_kv: int) -> Tensor:
        """Each row's score scale in :meth:`_grouped_q`'s layout, [kv_head, rows] fp32."""
        return self.row_scales.reshape(n_kv, -1)

    @cached_property
    def raw_routable(self) -> bool:
        """Whether the raw routing scores can be had from the scaled ones (every routing row's
        scale positive and finite), so the compiled kernel can give them in its pass."""
        scales = self.row_scales[:, self.route_rows]
        return bool(((scales > 0) & torch.isfinite(scales)).all())

    def _update_fused(self, keys: Tensor, values: Tensor, key_doc: Tensor) -> None:
        update_fused_streams([(self, key_doc)], keys, values)

    @property
    def keeps_gold(self) -> bool:
        return self.state.gold_acc is not None

    @property
    def uses_key_doc(self) -> bool:
        """Whether the chunks' document ids matter to this stream (statistics, routing scores, or
        a score function on the generic path); if not, any numbering may be passed."""
        return (self.folded_q is None or self.doc_max is not None or self.keeps_gold or self.route_max is not None
                or self.route_sum is not None or self.route_chunks is not None)

    @property
    def wants_readout_scores(self) -> bool:
        return self.folded_q is not None and (self.doc_max is not None or self.keeps_gold)

    def _merge_flash(
        self, out: Tensor, lse: Tensor, keys: Tensor, values: Tensor, key_doc: Tensor, last: Tensor | None = None,
        chunk_stats: tuple[Tensor, Tensor, Tensor] | None = None, chunk_route: tuple | None = None,
    ) -> None:
        """Fold one chunk's flash result (out [kv_head, rows, d], lse [kv_head, rows]) into the
        running softmax, and take the chunk's statistics: ``last``, the readout row's scores
        [head, 1, C] if already computed, or ``chunk_stats``, the statistics themselves as the
        compiled kernel gives them (per-document max and log-sum-exp [head, 1, N] in this stream's
        numbering, -inf for documents not in the chunk; gold output [head, 1, d] normalised by
        the chunk's log-sum-exp).  ``chunk_route``: the chunk's routing scores from the kernel,
        (documents in this stream's numbering, their MaxSim [head, docs], sums of raw scores
        [head, routing rows, docs] and key counts [docs])."""
        n_heads, n_q, d = self.q.shape
        # routing scores from the raw scores (before interventions)
        if chunk_route is not None:
            docs, doc_max, doc_sum, count = chunk_route
            if self.route_max is not None:
                self.route_max[:, docs] = torch.maximum(self.route_max[:, docs], doc_max)
            if self.route_sum is not None:
                self.route_sum[..., docs] += doc_sum
                self.route_count[docs] += count
        else:
            if self.route_max is not None:  # max over query rows
                merge_doc_stats(grouped_row_max(self.q[:, self.route_rows], keys, self.scale), key_doc,
                                self.route_max[:, None])
            if self.route_sum is not None:
                add_key_sum_scores(self.q[:, self.route_rows], keys, key_doc, self.scale, self.route_sum,
                                   self.route_count)
        if self.route_chunks is not None:
            readout = grouped_scores(self.q[:, -1:], keys, self.scale)[:, 0]
            for means in self.route_chunks:
                means.add(readout, key_doc)
        m, alpha, beta = self.state.add_flash(out.reshape(n_heads, n_q, d).float(), lse.reshape(n_heads, n_q).float())
        if chunk_stats is not None:
            chunk_max, chunk_lse, chunk_gold = chunk_stats
            if self.keeps_gold:
                self.state.add_gold(alpha[:, -1:], chunk_gold * beta[:, -1:, None])
            if self.doc_max is not None:
                self.doc_max = torch.maximum(self.doc_max, chunk_max)
                self.doc_lse = torch.logaddexp(self.doc_lse, chunk_lse)
        elif self.doc_max is not None or self.keeps_gold:
            if last is None:
                last = grouped_scores(self.folded_q[:, -1:], keys, self.scale)  # [head, 1, C], post-intervention
            if self.keeps_gold:
                part = gold_part(lambda i: torch.exp(last[..., i] - m[:, -1:, None]), key_doc, self.gold, values)
                self.state.add_gold(alpha[:, -1:], part)
            if self.doc_max is not None:
                merge_doc_stats(last, key_doc, self.doc_max, self.doc_lse)

    def finish_entropy(self, self_k: Tensor, self_v: Tensor) -> Tensor:
        """A first pass's end (a stream made with ``entropy=True``): each row's attention
        entropy over the corpus and its self keys, [head, Q, 1]."""
        s = self_k.shape[1]
        scores, _ = apply_score_function(grouped_scores(self.q, self_k, self.scale), self.score_fn,
                                         self._context(torch.full((s,), -1, dtype=torch.long)))
        self._accumulate(scores.masked_fill(~self.self_mask, float("-inf")), self_v, None)
        return self.state.entropy()

    def finish(self, self_k: Tensor, self_v: Tensor) -> CorpusAttentionResult:
        s = self_k.shape[1]
        scores, sink = apply_score_function(
            grouped_scores(self.q, self_k, self.scale), self.score_fn,
            self._context(torch.full((s,), -1, dtype=torch.long)),
        )
        self._accumulate(scores.masked_fill(~self.self_mask, float("-inf")), self_v, None)
        lse, output, scale = self.state.finish(sink)
        gold = None
        if self.keeps_gold:
            gold = (self.state.gold_acc * scale[:, self.rows]).transpose(0, 1).to(self.q.dtype)
        route_mean = None
        if self.route_sum is not None:
            route_mean = (self.route_sum / self.route_count.clamp(min=1)).amax(1)
            route_mean[:, self.route_count == 0] = float("-inf")
        return CorpusAttentionResult(output.transpose(0, 1).to(self.q.dtype), lse, self.doc_max, self.doc_lse, gold,
                                     self.route_max, route_mean,
                                     None if self.route_chunks is None else {m.chunk: m.result() for m in self.route_chunks})

    def _accumulate(self, scores: Tensor, values: Tensor, key_doc: Tensor | None) -> None:
        alpha, p = self.state.add_scores(scores, values)
        if self.keeps_gold:
            part = None if key_doc is None else gold_part(lambda i: p[:, self.rows][..., i], key_doc, self.gold, values)
            self.state.add_gold(alpha[:, self.rows], part)
        if self.doc_max is not None and key_doc is not None:
            merge_doc_stats(scores[:, self.rows], key_doc, self.doc_max, self.doc_lse)


def update_shared(streams: list[CorpusAttentionStream], keys: Tensor, values: Tensor, key_docs: list[Tensor]) -> None:
    """Feed one chunk to several streams that all attend it (e.g. a beam's hypotheses, or queries
    over the same documents), each with its own ``key_doc`` (its own document numbering).

    The streams on the fused path share one kernel call: their query rows are stacked, so the
    chunk's keys and values are read once, not once per stream (the decoding steps are bound by
    that read).  Rows do not interact, so each stream gets what :meth:`update` would give it."""
    fused = [(s, kd) for s, kd in zip(streams, key_docs) if s.folded_q is not None and s.scale == streams[0].scale]
    fused_ids = {id(s) for s, _ in fused}
    for s, kd in zip(streams, key_docs):
        if id(s) not in fused_ids:
            s.update(keys, values, kd)
    if fused:
        update_fused_streams(fused, keys, values)


def attend_chunks(
    q: Tensor,
    chunks: Iterable[Chunk],
    n_docs: int,
    self_k: Tensor,
    self_v: Tensor,
    **kwargs,
) -> CorpusAttentionResult:
    """Stream ``chunks`` through a :class:`CorpusAttentionStream` (keyword arguments as there)."""
    stream = CorpusAttentionStream(q, n_docs, n_self=self_k.shape[1], **kwargs)
    for keys, values, key_doc in chunks:
        stream.update(keys, values, key_doc)
    return stream.finish(self_k, self_v)


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
    keep_docs: Tensor | None = None,
    route_stats: bool = False,
    stats_rows: str = "all",
    chunk_size: int = 16384,
    self_mask: Tensor | None = None,
) -> CorpusAttentionResult:
    """Streaming corpus attention.  q: [head, Q, d] (rotated); corpus_k/v: [kv_head, T, d];
    key_doc: [T] long; self_k/v: [kv_head, S, d] with S >= Q; keep_docs: bool [N] or None."""
    kept = kept_keys(key_doc, keep_docs)
    n_keys = int(kept.sum()) if kept is not None else key_doc.shape[0]
    n_attended = int(keep_docs.sum()) if keep_docs is not None else n_docs
    return attend_chunks(
        q, iter_chunks(corpus_k, corpus_v, key_doc, chunk_size, keep_docs), n_docs, self_k, self_v,
        n_corpus_keys=n_keys, n_docs_attended=n_attended, layer=layer, scale=scale, score_fn=score_fn,
        gold_docs=gold_docs, stats=stats, route_stats=route_stats, stats_rows=stats_rows, self_mask=self_mask,
    )

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
* :func:`dense_corpus_attention` materialises all scores: the reference the tests hold the
  streaming kernel to.

Both apply a score function (intervention) inside, honour ``keep_docs`` (top-B routing: keys of
documents not kept are not attended), and return the output, the log-sum-exp, and per document
its max score (MaxSim), the log-sum-exp of its scores (so ``mass = exp(doc_lse - lse)`` is
exact), and the part of the output contributed by ``gold_docs``.  With routing, SSMax's and any
score function's ``n_keys`` / ``n_docs`` count what is attended (kept documents only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from kernels.native import decode_kernel
from kernels.score_functions import ScoreContext, ScoreFunction, apply_score_function


@dataclass
class CorpusAttentionResult:
    output: Tensor  # [Q, head, d] attention output per head (z)
    lse: Tensor  # [head, Q] log of the softmax denominator (sink included)
    doc_max: Tensor | None = None  # [head, Q, N] max score over each document's tokens (MaxSim); -inf if not attended
    doc_lse: Tensor | None = None  # [head, Q, N] logsumexp of each document's scores; mass = exp(doc_lse - lse)
    gold_output: Tensor | None = None  # [Q, head, d] the part of output contributed by gold_docs' tokens
    route_max: Tensor | None = None  # [head, N] max over query tokens and each document's keys of the raw scaled q.k

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


def _self_mask(n_q: int, n_self: int, mask: Tensor | None) -> Tensor:
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
        route_rows: slice = slice(None),
    ):
        n_heads, n_q, d = q.shape
        self.q, self.scale, self.layer, self.score_fn = q, scale, layer, score_fn
        self.n_docs, self.n_docs_attended = n_docs, n_docs_attended
        self.self_mask = _self_mask(n_q, n_self, self_mask)
        self.n_keys = (n_corpus_keys + self.self_mask.sum(1)).view(1, n_q, 1)
        self.rows = slice(n_q - 1, n_q) if stats_rows == "last" else slice(0, n_q)
        n_rows = 1 if stats_rows == "last" else n_q
        self.m = torch.full((n_heads, n_q), float("-inf"))
        self.l = torch.zeros(n_heads, n_q)
        self.acc = torch.zeros(n_heads, n_q, d)
        self.gold = torch.tensor(gold_docs, dtype=torch.long) if gold_docs else None
        self.gold_acc = torch.zeros(n_heads, n_rows, d) if gold_docs and stats else None
        self.doc_max = torch.full((n_heads, n_rows, n_docs), float("-inf")) if stats else None
        self.doc_lse = torch.full((n_heads, n_rows, n_docs), float("-inf")) if stats else None
        self.route_max = torch.full((n_heads, n_docs), float("-inf")) if route_stats else None
        self.route_rows = route_rows  # the rows routing scores reduce over (the query's own, not drafted digits)
        # Fast path: a score function that only scales each (head, row) folds into q, the bulk
        # goes through PyTorch's fused flash kernel, and per-document statistics are computed
        # for the readout row alone (the generic path keeps them for every row if asked).
        scale_rows = (torch.ones(n_heads, 1, 1) if score_fn is None
                      else score_fn.row_scale(ScoreContext(layer, n_heads, self.n_keys, n_docs_attended, None)))
        self.folded_q = None
        if scale_rows is not None and stats_rows == "last":
            self.folded_q = (q.float() * scale_rows).to(q.dtype)

    def _context(self, key_doc: Tensor) -> ScoreContext:
        return ScoreContext(self.layer, self.q.shape[0], self.n_keys, self.n_docs_attended, key_doc)

    def update(self, keys: Tensor, values: Tensor, key_doc: Tensor) -> None:
        """One chunk: keys, values [kv_head, C, d]; key_doc [C] (document of each key, -1 none)."""
        if self.folded_q is not None:
            self._update_fused(keys, values, key_doc)
            return
        raw = _grouped_scores(self.q, keys, self.scale)
        if self.route_max is not None:
            _doc_max(raw[:, self.route_rows].amax(1, keepdim=True), key_doc, self.route_max[:, None])
        scores, _ = apply_score_function(raw, self.score_fn, self._context(key_doc))
        self._accumulate(scores, values, key_doc)

    def _grouped_q(self, dtype: torch.dtype, n_kv: int) -> Tensor:
        """The folded queries as [kv_head, rows, d]: the heads of a KV group become extra query
        rows of that KV head (no K/V expansion)."""
        n_heads, n_q, d = self.q.shape
        return self.folded_q.to(dtype).reshape(n_kv, (n_heads // n_kv) * n_q, d)

    def _update_fused(self, keys: Tensor, values: Tensor, key_doc: Tensor) -> None:
        _update_fused_streams([(self, key_doc)], keys, values)

    @property
    def uses_key_doc(self) -> bool:
        """Whether the chunks' document ids matter to this stream (statistics, routing scores, or
        a score function on the generic path); if not, any numbering may be passed."""
        return (self.folded_q is None or self.doc_max is not None or self.gold_acc is not None
                or self.route_max is not None)

    @property
    def wants_readout_scores(self) -> bool:
        return self.folded_q is not None and (self.doc_max is not None or self.gold_acc is not None)

    def _merge_flash(
        self, out: Tensor, lse: Tensor, keys: Tensor, values: Tensor, key_doc: Tensor, last: Tensor | None = None,
        chunk_stats: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Fold one chunk's flash result (out [kv_head, rows, d], lse [kv_head, rows]) into the
        running softmax, and take the chunk's statistics: ``last``, the readout row's scores
        [head, 1, C] if already computed, or ``chunk_stats``, the statistics themselves as the
        compiled kernel gives them (per-document max and log-sum-exp [head, 1, N] in this stream's
        numbering, -inf for documents not in the chunk; gold output [head, 1, d] normalised by
        the chunk's log-sum-exp)."""
        n_heads, n_q, d = self.q.shape
        kv = keys.shape[0]
        if self.route_max is not None:  # raw scores (before interventions), max over query rows
            _doc_max(_grouped_row_max(self.q[:, self.route_rows], keys, self.scale), key_doc, self.route_max[:, None])
        out = out.reshape(n_heads, n_q, d).float()
        lse = lse.reshape(n_heads, n_q).float()
        m_new = torch.maximum(self.m, lse)
        alpha = torch.exp(self.m - m_new)  # m starts at -inf: alpha 0
        beta = torch.exp(lse - m_new)
        self.l = self.l * alpha + beta
        self.acc = self.acc * alpha[..., None] + out * beta[..., None]
        if chunk_stats is not None:
            chunk_max, chunk_lse, chunk_gold = chunk_stats
            if self.gold_acc is not None:
                self.gold_acc = self.gold_acc * alpha[:, -1:, None] + chunk_gold * beta[:, -1:, None]
            if self.doc_max is not None:
                self.doc_max = torch.maximum(self.doc_max, chunk_max)
                self.doc_lse = torch.logaddexp(self.doc_lse, chunk_lse)
        elif self.doc_max is not None or self.gold_acc is not None:
            if last is None:
                last = _grouped_scores(self.folded_q[:, -1:], keys, self.scale)  # [head, 1, C], post-intervention
            if self.gold_acc is not None:
                self.gold_acc = self.gold_acc * alpha[:, -1:, None]
                gold = torch.isin(key_doc, self.gold).nonzero().squeeze(1)  # only gold keys contribute
                if gold.numel():
                    p = torch.exp(last[..., gold] - m_new[:, -1:, None])
                    self.gold_acc += _grouped_pv(p, values[:, gold], n_heads // kv)
            if self.doc_max is not None:
                _merge_doc_stats(last, key_doc, self.doc_max, self.doc_lse)
        self.m = m_new

    def finish(self, self_k: Tensor, self_v: Tensor) -> CorpusAttentionResult:
        s = self_k.shape[1]
        scores, sink = apply_score_function(
            _grouped_scores(self.q, self_k, self.scale), self.score_fn,
            self._context(torch.full((s,), -1, dtype=torch.long)),
        )
        self._accumulate(scores.masked_fill(~self.self_mask, float("-inf")), self_v, None)
        lse = self.m + torch.log(self.l)
        if sink is not None:
            lse = torch.logaddexp(lse, sink.view(-1, 1).float())
        scale = torch.exp(self.m - lse)[..., None]
        output = (self.acc * scale).transpose(0, 1).to(self.q.dtype)
        gold = None
        if self.gold_acc is not None:
            gold = (self.gold_acc * scale[:, self.rows]).transpose(0, 1).to(self.q.dtype)
        return CorpusAttentionResult(output, lse, self.doc_max, self.doc_lse, gold, self.route_max)

    def _accumulate(self, scores: Tensor, values: Tensor, key_doc: Tensor | None) -> None:
        n_rep = scores.shape[0] // values.shape[0]
        m_new = torch.maximum(self.m, scores.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
        alpha = torch.exp(self.m - safe)
        p = torch.exp(scores - safe[..., None])
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha[..., None] + _grouped_pv(p, values, n_rep)
        self.m = m_new
        if self.gold_acc is not None:
            self.gold_acc = self.gold_acc * alpha[:, self.rows, None]
            if key_doc is not None:
                gold = torch.isin(key_doc, self.gold).nonzero().squeeze(1)  # only gold keys contribute
                if gold.numel():
                    self.gold_acc += _grouped_pv(p[:, self.rows][..., gold], values[:, gold], n_rep)
        if self.doc_max is not None and key_doc is not None:
            _merge_doc_stats(scores[:, self.rows], key_doc, self.doc_max, self.doc_lse)


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
        _update_fused_streams(fused, keys, values)


# Up to this many query rows per KV head in a stream (and whenever its readout statistics are
# kept) the compiled kernel beats PyTorch's flash kernel on this box (bench_kernels --part roof:
# with AMX tiles for q.k up to ~150 rows; with AVX-512 dot products only, up to ~16).  The choice
# is made per stream, never by how many streams share a chunk: a stream's numbers do not depend
# on its companions (a resumed sweep batches differently).
NATIVE_MAX_ROWS = {True: 160, False: 16}  # keyed by kernel.uses_amx()


def _update_fused_streams(fused: list[tuple[CorpusAttentionStream, Tensor]], keys: Tensor, values: Tensor) -> None:
    """One chunk for streams on the fused path (same scale): their rows stacked into one call of
    the compiled kernel (:mod:`kernels.native`), which also computes the readout rows'
    per-document statistics and gold output in the same pass, and of PyTorch's flash kernel for
    the streams the compiled kernel does not take (its statistics then need a second pass)."""
    kv = keys.shape[0]
    rows = [s._grouped_q(keys.dtype, kv) for s, _ in fused]
    kernel = _native_for(rows[0], keys, values)
    if kernel is not None:
        limit = NATIVE_MAX_ROWS[kernel.uses_amx()]
        mine = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores or rows[i].shape[1] <= limit]
        if mine and _update_native(kernel, [fused[i] for i in mine], [rows[i] for i in mine], keys, values):
            fused = [f for i, f in enumerate(fused) if i not in mine]
            rows = [r for i, r in enumerate(rows) if i not in mine]
    if not fused:
        return
    q = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
    sizes = [r.shape[1] for r in rows]
    scale = fused[0][0].scale
    out, lse = _flash(q, keys, values, scale)
    # the readout rows of the streams that keep statistics: one more shared pass over the keys
    lasts = [None] * len(fused)
    asking = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores]
    if asking:
        readout = torch.cat([fused[i][0].folded_q[:, -1:] for i in asking], 1)  # [head, streams, d]
        scores = _grouped_scores(readout, keys, scale)  # [head, streams, C]
        for j, i in enumerate(asking):
            lasts[i] = scores[:, j : j + 1]
    for (s, kd), o, l, last in zip(fused, out.split(sizes, 1), lse.split(sizes, 1), lasts):
        s._merge_flash(o, l, keys, values, kd, last)


def _native_for(q: Tensor, keys: Tensor, values: Tensor):
    """The compiled decode kernel when it applies here (bf16, no autograd, a built head size,
    the kernel available), else None."""
    if not (q.dtype == keys.dtype == values.dtype == torch.bfloat16) or keys.shape[-1] not in (32, 64, 128):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad):
        return None
    return decode_kernel()


def _update_native(kernel, fused, rows: list[Tensor], keys: Tensor, values: Tensor) -> bool:
    """The compiled kernel's pass over the streams' stacked rows: statistics in the first asking
    stream's document numbering, handed to each stream in its own.  False (nothing done) when a
    document's keys are not one run in the chunk, which the kernel's per-document statistics need."""
    kv = keys.shape[0]
    q = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
    sizes = [r.shape[1] for r in rows]
    asking = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    empty = torch.empty(0, dtype=torch.long)
    # the document ids always go in: they place the kernel's parts, so a row's summation order is
    # the same whether or not other rows keep statistics
    base = fused[asking[0] if asking else 0][1].long().contiguous()
    n_docs = fused[asking[0]][0].n_docs if asking else 0
    stat_rows, gold_rows, to_base = [], [], {}
    for i in asking:
        s, kd = fused[i]
        n_heads, n_q, _ = s.q.shape
        rep = n_heads // kv
        stat_rows += [offsets[i] + e * n_q + n_q - 1 for e in range(rep)]  # head g*rep+e's readout row
        to_base[i] = None if kd is fused[asking[0]][1] else _to_base(base, kd, n_docs)
        gold = torch.zeros(n_docs, dtype=torch.bool)
        if s.gold_acc is not None:
            own = torch.zeros(n_docs, dtype=torch.bool)
            own[s.gold] = True
            gold = own if to_base[i] is None else torch.cat([own, torch.zeros(1, dtype=torch.bool)])[_inverse(to_base[i], n_docs)]
        gold_rows += [gold] * rep
    gold_mask = torch.stack(gold_rows) if asking and any(bool(g.any()) for g in gold_rows) else empty
    try:
        out, lse, doc_max, doc_lse, gold_out = kernel.decode_attention(
            q.contiguous(), _rows_contiguous(keys), _rows_contiguous(values), float(fused[0][0].scale), base, n_docs,
            torch.tensor(stat_rows, dtype=torch.long), gold_mask)
    except RuntimeError as e:  # checked before any work: scattered documents -> the flash path
        if "not one run" in str(e):
            return False
        raise
    stats = {}
    start = 0
    for i in asking:
        s = fused[i][0]
        rep = s.q.shape[0] // kv
        part = slice(start, start + rep)
        start += rep
        shape = (kv * rep, 1, -1)
        m, l, g = doc_max[:, part].reshape(shape), doc_lse[:, part].reshape(shape), gold_out[:, part].reshape(shape)
        if to_base[i] is not None:  # base numbering -> this stream's (absent documents: -inf)
            pad = torch.full((kv * rep, 1, 1), float("-inf"))
            m, l = torch.cat([m, pad], -1)[..., to_base[i]], torch.cat([l, pad], -1)[..., to_base[i]]
        stats[i] = (m, l, g)
    for i, ((s, kd), o, ls) in enumerate(zip(fused, out.split(sizes, 1), lse.split(sizes, 1))):
        s._merge_flash(o, ls, keys, values, kd, chunk_stats=stats.get(i))
    return True


def _to_base(base: Tensor, own: Tensor, n_docs: int) -> Tensor:
    """For each of a stream's documents, its index in the base numbering (``n_docs`` when the
    chunk does not hold it): the two numberings label the same keys."""
    index = torch.full((n_docs,), n_docs, dtype=torch.long)
    mask = base >= 0
    index[own[mask]] = base[mask]
    return index


def _inverse(to_base: Tensor, n_docs: int) -> Tensor:
    """For each base document, the stream's own index (``n_docs`` when not in the chunk)."""
    inverse = torch.full((n_docs + 1,), n_docs, dtype=torch.long)
    inverse[to_base] = torch.arange(n_docs)
    return inverse[:n_docs]


def _rows_contiguous(x: Tensor) -> Tensor:
    """[kv_head, C, d] with each key's d values contiguous and rows adjacent (a chunk slice is)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _flash(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU flash attention, no mask: q [kv_head, rows, d] over keys/values
    [kv_head, C, d] -> (out [kv_head, rows, d], lse [kv_head, rows])."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], keys[None], values[None], 0.0, False, scale=scale)[:2]
    return out[0], lse[0]


def _grouped_pv(p: Tensor, values: Tensor, n_rep: int) -> Tensor:
    """p [head, Q, C] @ values [kv_head, C, d] without repeating values across the head group."""
    kv, c, d = values.shape
    n_q = p.shape[1]
    out = p.reshape(kv, n_rep * n_q, c).to(values.dtype) @ values
    return out.reshape(kv * n_rep, n_q, d).float()


def _grouped_scores(q: Tensor, keys: Tensor, scale: float) -> Tensor:
    """q [head, Q, d] . keys [kv_head, C, d] -> [head, Q, C] fp32, one matmul per KV group."""
    kv, c, _ = keys.shape
    n_heads, n_q, d = q.shape
    # keys @ q^T then transpose: ~1.6x faster than q @ keys^T for bf16 on these CPUs
    s = (keys @ q.reshape(kv, (n_heads // kv) * n_q, d).to(keys.dtype).transpose(-1, -2)).transpose(-1, -2)
    return s.reshape(n_heads, n_q, c).float() * scale


def _grouped_row_max(q: Tensor, keys: Tensor, scale: float) -> Tensor:
    """max over the query rows of the scaled scores, [head, 1, C], reduced before any transpose
    (the full [head, Q, C] scores are never laid out)."""
    kv, c, _ = keys.shape
    n_heads, n_q, d = q.shape
    s = keys @ q.reshape(kv, (n_heads // kv) * n_q, d).to(keys.dtype).transpose(-1, -2)  # [kv, C, rep*Q]
    s = s.view(kv, c, n_heads // kv, n_q).amax(-1)  # [kv, C, rep]
    return (s.permute(0, 2, 1).reshape(n_heads, 1, c).float() * scale)


def _chunk_docs(key_doc: Tensor) -> tuple[Tensor | None, Tensor, slice | Tensor, int] | None:
    """The documents of one chunk: (mask of its document keys or None when all are, each key's
    local document index, the documents as a slice or an index tensor, how many); None without
    documents.

    A chunk of a concatenated corpus holds a run of consecutive documents, so the local index is
    ``key_doc - first`` and the documents a slice: no sort.  Scattered ids fall back to unique."""
    mask = None
    if key_doc.numel() == 0 or bool(key_doc.min() < 0):
        mask = key_doc >= 0
        if not mask.any():
            return None
        key_doc = key_doc[mask]
    lo, hi = int(key_doc.min()), int(key_doc.max())
    if hi - lo < 2 * key_doc.numel():
        return mask, key_doc - lo, slice(lo, hi + 1), hi + 1 - lo
    docs, local = torch.unique(key_doc, return_inverse=True)
    return mask, local, docs, docs.shape[0]


def _merge_doc_stats(scores: Tensor, key_doc: Tensor, doc_max: Tensor, doc_lse: Tensor) -> None:
    """Fold one chunk's per-document max and logsumexp into the running [head, rows, N] tensors
    (documents may span chunk boundaries)."""
    found = _chunk_docs(key_doc)
    if found is None:
        return
    mask, local, docs, n_local = found
    s = scores if mask is None else scores[..., mask]
    h, q, _ = s.shape
    index = local.expand(h, q, -1)
    chunk_max = torch.full((h, q, n_local), float("-inf")).scatter_reduce(
        -1, index, s, reduce="amax", include_self=True
    )
    shifted = torch.exp(s - chunk_max.gather(-1, index).nan_to_num(neginf=0.0))
    chunk_lse = chunk_max + torch.log(torch.zeros_like(chunk_max).scatter_add(-1, index, shifted))
    # clone: a slice is a view, and autograd (training reads doc_lse) must not see it overwritten
    doc_max[..., docs] = torch.maximum(doc_max[..., docs].clone(), chunk_max)
    doc_lse[..., docs] = torch.logaddexp(doc_lse[..., docs].clone(), chunk_lse)


def _doc_max(scores: Tensor, key_doc: Tensor, out: Tensor) -> None:
    """out[..., d] = max(out[..., d], max of scores over d's keys), in place."""
    found = _chunk_docs(key_doc)
    if found is None:
        return
    mask, local, docs, n_local = found
    s = scores if mask is None else scores[..., mask]
    chunk_max = torch.full((*s.shape[:2], n_local), float("-inf")).scatter_reduce(
        -1, local.expand(*s.shape[:2], -1), s, reduce="amax", include_self=True)
    out[..., docs] = torch.maximum(out[..., docs].clone(), chunk_max)


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


def dense_corpus_attention(
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
    self_mask: Tensor | None = None,
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
    allowed[:, t:] = _self_mask(n_q, s, self_mask)
    all_key_doc = torch.cat([key_doc, torch.full((s,), -1, dtype=key_doc.dtype)])
    n_keys = allowed.sum(1).view(1, n_q, 1)
    n_attended = int(keep_docs.sum()) if keep_docs is not None else n_docs
    ctx = ScoreContext(layer, n_heads, n_keys, n_attended, all_key_doc)
    scores, sink = apply_score_function(raw, score_fn, ctx)
    scores = scores.masked_fill(~allowed, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    if sink is not None:
        lse = torch.logaddexp(lse, sink.view(n_heads, 1).float())
    probs = torch.exp(scores - lse[..., None])
    result = CorpusAttentionResult((probs @ values).transpose(0, 1).to(q.dtype), lse)
    if route_stats:
        result.route_max = torch.full((n_heads, 1, n_docs), float("-inf"))
        _doc_max(raw[..., :t].amax(1, keepdim=True), key_doc, result.route_max)
        result.route_max = result.route_max[:, 0]
    if not stats:
        return result
    doc_scores = scores[..., :t]
    result.doc_max = torch.full((n_heads, n_q, n_docs), float("-inf"))
    _doc_max(doc_scores, key_doc, result.doc_max)
    result.doc_lse = torch.full((n_heads, n_q, n_docs), float("-inf"))
    for j in range(n_docs):
        in_doc = key_doc == j
        if in_doc.any():
            result.doc_lse[..., j] = torch.logsumexp(doc_scores[..., in_doc], dim=-1)
    if gold_docs:
        is_gold = torch.isin(key_doc, torch.tensor(gold_docs, dtype=key_doc.dtype))
        result.gold_output = ((probs[..., :t] * is_gold) @ values[:, :t]).transpose(0, 1).to(q.dtype)
    return result

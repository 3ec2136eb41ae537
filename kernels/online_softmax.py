"""The online (flash-style) softmax state, and the grouped matmuls and per-document statistics
every corpus-attention path folds into it.

One :class:`OnlineSoftmax` holds a stream's running max ``m``, denominator ``l`` and unnormalised
output ``acc`` per (head, query row), and the gold documents' share of the output.  Parts arrive
either as raw scores (:meth:`OnlineSoftmax.add_scores`: the generic path) or as a normalised
flash result with its log-sum-exp (:meth:`OnlineSoftmax.add_flash`: PyTorch's flash kernel and
the compiled kernel); both rescale by the same running-max update (:meth:`OnlineSoftmax.rescale`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class OnlineSoftmax:
    def __init__(self, n_heads: int, n_q: int, d: int, gold_rows: int | None = None, entropy: bool = False):
        """``gold_rows``: how many of the last query rows keep a gold part (None: no gold part).
        ``entropy``: also keep sum(p * s), for each row's entropy (raw scores only)."""
        self.m = torch.full((n_heads, n_q), float("-inf"))
        self.l = torch.zeros(n_heads, n_q)
        self.acc = torch.zeros(n_heads, n_q, d)
        self.gold_acc = torch.zeros(n_heads, gold_rows, d) if gold_rows else None
        self.ps = torch.zeros(n_heads, n_q) if entropy else None

    def rescale(self, part_max: Tensor) -> tuple[Tensor, Tensor]:
        """Take a part whose row maxima are ``part_max`` [head, Q]: the new running max (rows with no
        key yet held at 0, so nothing is inf - inf) and the factor ``alpha`` the old sums scale by."""
        m_new = torch.maximum(self.m, part_max)
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(self.m - safe)  # m starts at -inf: alpha 0
        self.m = m_new
        return safe, alpha

    def add_scores(self, scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """One part given as scores [head, Q, C] over values [kv_head, C, d]; returns (alpha, p),
        p the part's unnormalised probabilities (for the gold part and statistics)."""
        safe, alpha = self.rescale(scores.amax(-1))
        p = torch.exp(scores - safe[..., None])
        self.l = self.l * alpha + p.sum(-1)
        if self.ps is not None:
            self.ps = self.ps * alpha + torch.where(p > 0, p * scores, torch.zeros_like(p)).sum(-1)
        self.acc = self.acc * alpha[..., None] + grouped_pv(p, values, scores.shape[0] // values.shape[0])
        return alpha, p

    def add_flash(self, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One part given as a normalised output [head, Q, d] and its log-sum-exp [head, Q];
        returns (the new running max, alpha, beta: the factor the part's own sums scale by)."""
        safe, alpha = self.rescale(lse)
        beta = torch.exp(lse - safe)
        self.l = self.l * alpha + beta
        self.acc = self.acc * alpha[..., None] + out * beta[..., None]
        return safe, alpha, beta

    def add_state(self, m: Tensor, l: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
        """Another state's sums (e.g. a shard's, over other keys): returns (alpha, beta), the
        factors this state's and the other's sums were scaled by."""
        safe, alpha = self.rescale(m)
        beta = torch.exp(m - safe)
        self.l = self.l * alpha + l * beta
        self.acc = self.acc * alpha[..., None] + acc * beta[..., None]
        return alpha, beta

    def add_gold(self, alpha: Tensor, part: Tensor | None = None) -> None:
        """The gold output: rescaled by ``alpha`` [head, rows], plus the part's gold output
        [head, rows, d] (in the running max's units) when it holds gold keys."""
        self.gold_acc = self.gold_acc * alpha[..., None]
        if part is not None:
            self.gold_acc += part

    def entropy(self) -> Tensor:
        """Each row's attention entropy over the keys seen (no sink), [head, Q, 1]: with
        p = exp(s - m) / l, -sum p log p = m + log l - sum(p s) / l."""
        return (self.m + torch.log(self.l) - self.ps / self.l)[..., None]

    def finish(self, sink: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(lse [head, Q] with the sink's term, output [head, Q, d], the output's scale [head, Q, 1])."""
        lse = self.m + torch.log(self.l)
        if sink is not None:
            lse = torch.logaddexp(lse, sink.view(-1, 1).float())
        scale = torch.exp(self.m - lse)[..., None]
        return lse, self.acc * scale, scale


def gold_part(probs_of, key_doc: Tensor, gold: Tensor, values: Tensor) -> Tensor | None:
    """The gold keys' share of a part's output: ``probs_of(index)`` gives their unnormalised
    probabilities [head, rows, G]; None when the part holds no gold key."""
    index = torch.isin(key_doc, gold).nonzero().squeeze(1)
    if not index.numel():
        return None
    probs = probs_of(index)
    return grouped_pv(probs, values[:, index], probs.shape[0] // values.shape[0])


def grouped_pv(p: Tensor, values: Tensor, n_rep: int) -> Tensor:
    """p [head, Q, C] @ values [kv_head, C, d] without repeating values across the head group."""
    kv, c, d = values.shape
    n_q = p.shape[1]
    out = p.reshape(kv, n_rep * n_q, c).to(values.dtype) @ values
    return out.reshape(kv * n_rep, n_q, d).float()


def grouped_scores(q: Tensor, keys: Tensor, scale: float) -> Tensor:
    """q [head, Q, d] . keys [kv_head, C, d] -> [head, Q, C] fp32, one matmul per KV group."""
    kv, c, _ = keys.shape
    n_heads, n_q, d = q.shape
    # keys @ q^T then transpose: ~1.6x faster than q @ keys^T for bf16 on these CPUs
    s = (keys @ q.reshape(kv, (n_heads // kv) * n_q, d).to(keys.dtype).transpose(-1, -2)).transpose(-1, -2)
    return s.reshape(n_heads, n_q, c).float() * scale


def grouped_row_max(q: Tensor, keys: Tensor, scale: float) -> Tensor:
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


def _doc_scores(scores: Tensor, key_doc: Tensor):
    """A chunk's document-key scores [head, rows, C'], each key's local document index expanded to
    them, the chunk's documents (slice or index) and how many; None without documents."""
    found = _chunk_docs(key_doc)
    if found is None:
        return None
    mask, local, docs, n_local = found
    s = scores if mask is None else scores[..., mask]
    return s, local.expand(*s.shape[:2], -1), docs, n_local


def merge_doc_stats(scores: Tensor, key_doc: Tensor, doc_max: Tensor, doc_lse: Tensor | None = None) -> None:
    """Fold one chunk's per-document max (and, given ``doc_lse``, log-sum-exp) into the running
    [head, rows, N] tensors, in place (documents may span chunk boundaries)."""
    found = _doc_scores(scores, key_doc)
    if found is None:
        return
    s, index, docs, n_local = found
    h, q, _ = s.shape
    chunk_max = torch.full((h, q, n_local), float("-inf")).scatter_reduce(
        -1, index, s, reduce="amax", include_self=True
    )
    # clone: a slice is a view, and autograd (training reads doc_lse) must not see it overwritten
    doc_max[..., docs] = torch.maximum(doc_max[..., docs].clone(), chunk_max)
    if doc_lse is None:
        return
    shifted = torch.exp(s - chunk_max.gather(-1, index).nan_to_num(neginf=0.0))
    chunk_lse = chunk_max + torch.log(torch.zeros_like(chunk_max).scatter_add(-1, index, shifted))
    doc_lse[..., docs] = torch.logaddexp(doc_lse[..., docs].clone(), chunk_lse)


def add_doc_sums(scores: Tensor, key_doc: Tensor, sums: Tensor, counts: Tensor) -> None:
    """Add one chunk's per-document score sums [head, rows, N] and key counts [N], in place (the
    mean of q.k over a document's keys is q . mean(K_doc): mean-key routing)."""
    found = _doc_scores(scores, key_doc)
    if found is None:
        return
    s, index, docs, n_local = found
    sums[..., docs] += torch.zeros(*s.shape[:2], n_local).scatter_add(-1, index, s)
    counts[docs] += torch.bincount(index[0, 0], minlength=n_local)


def add_key_sum_scores(q: Tensor, keys: Tensor, key_doc: Tensor, scale: float, sums: Tensor, counts: Tensor) -> None:
    """:func:`add_doc_sums` for raw scores ``scale * q . k`` without laying the scores out: the
    sum over a document's keys of q.k is q . (the sum of its keys), so one small matmul per chunk
    against each document's key sum.  q [head, rows, d]; keys [kv_head, C, d]."""
    found = _chunk_docs(key_doc)
    if found is None:
        return
    mask, local, docs, n_local = found
    k = keys if mask is None else keys[:, mask]
    doc_keys = torch.zeros(k.shape[0], n_local, k.shape[2]).index_add_(1, local, k.float())
    kv = keys.shape[0]
    n_heads, n_q, d = q.shape
    s = q.float().reshape(kv, (n_heads // kv) * n_q, d) @ doc_keys.transpose(1, 2)  # [kv, rep*Q, docs]
    sums[..., docs] += s.reshape(n_heads, n_q, n_local) * scale
    counts[docs] += torch.bincount(local, minlength=n_local)


class ChunkMeans:
    """Chunk-mean routing scores, accumulated chunk by chunk: each document's keys cut into
    chunks of ``chunk`` tokens (at most ``n_chunks``, the last one taking the rest), each chunk
    scored by the mean of one query row's raw scores over its keys (q . mean K_chunk), and a
    document by its best chunk.  Keys of a document must arrive in order (they do from every
    KV source), so a key's place in its document is the count seen before it."""

    def __init__(self, n_heads: int, n_docs: int, chunk: int, n_chunks: int):
        self.chunk, self.n_chunks = chunk, n_chunks
        self.sums = torch.zeros(n_heads, n_docs * n_chunks)
        self.counts = torch.zeros(n_docs * n_chunks)
        self.seen = torch.zeros(n_docs, dtype=torch.long)

    def add(self, scores: Tensor, key_doc: Tensor) -> None:
        """One chunk of keys: ``scores`` [head, C] (the row's raw scores), ``key_doc`` [C]."""
        keys = (key_doc >= 0).nonzero().squeeze(1)
        if keys.numel() == 0:
            return
        docs = key_doc[keys]
        first = torch.full_like(self.seen, key_doc.numel()).scatter_reduce(0, docs, keys, "amin")
        place = self.seen[docs] + keys - first[docs]  # a document's keys are contiguous within a chunk
        slot = docs * self.n_chunks + (place // self.chunk).clamp(max=self.n_chunks - 1)
        self.sums.index_add_(1, slot, scores[:, keys].float())
        self.counts.index_add_(0, slot, torch.ones(slot.numel()))
        self.seen.index_add_(0, docs, torch.ones_like(docs))

    def cut(self, docs: slice) -> "ChunkMeans":
        """The part for documents ``docs`` (a shard's run of whole documents)."""
        part = ChunkMeans.__new__(ChunkMeans)
        part.chunk, part.n_chunks, k = self.chunk, self.n_chunks, self.n_chunks
        keys = slice(docs.start * k if docs.start else None, docs.stop * k if docs.stop is not None else None)
        part.sums, part.counts, part.seen = self.sums[:, keys], self.counts[keys], self.seen[docs]
        return part

    def merge(self, part: "ChunkMeans", docs: slice) -> None:
        k = self.n_chunks
        keys = slice(docs.start * k if docs.start else None, docs.stop * k if docs.stop is not None else None)
        self.sums[:, keys] += part.sums
        self.counts[keys] += part.counts
        self.seen[docs] += part.seen

    def result(self) -> Tensor:
        """[head, N]: each document's best chunk mean (-inf for documents not seen)."""
        means = (self.sums / self.counts.clamp(min=1)).masked_fill(self.counts == 0, float("-inf"))
        return means.view(means.shape[0], -1, self.n_chunks).amax(-1)

"""Corpus attention over documents sharded across workers, merged exactly.

Each shard feeds its own documents' keys to a :class:`~kernels.corpus_attention.CorpusAttentionStream`
made with the whole corpus's counts (``n_corpus_keys``, ``n_docs_attended``, document ids in the
corpus's numbering) and returns a :class:`ShardPart`: its running max, denominator and output
sums, the gold share, and its documents' statistics.  The log-sum-exp algebra that merges chunks
merges shards: :func:`merge_parts` folds the parts in a fixed order into a stream that then
finishes with the query side's own keys, as one stream over every shard would.

Routing across shards: at the route layer every shard returns its documents' routing maxima
(``route_max``, -inf elsewhere); their maximum is the corpus's, so the top B are chosen on the
merged part (:meth:`kernels.score_functions.Route.keep`) and each shard then feeds only its kept
documents (``keep_docs``) with the kept total as ``n_corpus_keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.corpus_attention import CorpusAttentionStream


@dataclass
class ShardPart:
    """One shard's share of one stream at one layer (what crosses the network)."""

    m: Tensor  # [head, Q] running max
    l: Tensor  # [head, Q] denominator, in units of exp(m)
    acc: Tensor  # [head, Q, d] output sums, in units of exp(m)
    gold_acc: Tensor | None  # [head, rows, d] the gold documents' share of acc
    doc_max: Tensor | None  # [head, rows, n] the shard's documents (``docs`` of the corpus's N)
    doc_lse: Tensor | None  # [head, rows, n]
    route_max: Tensor | None  # [head, n]
    route_sum: Tensor | None  # [head, rows, n] sums of raw scores per document (mean-key routing)
    route_count: Tensor | None  # [n] keys per document
    route_chunks: list | None  # ChunkMeans of the shard's documents (chunk-mean routing)
    docs: slice = field(default_factory=lambda: slice(None))  # which of the corpus's documents the statistics are for

    def nbytes(self) -> int:
        tensors = [t for t in vars(self).values() if isinstance(t, Tensor)]
        for means in self.route_chunks or ():
            tensors += [means.sums, means.counts, means.seen]
        return sum(t.numel() * t.element_size() for t in tensors)


def shard_part(stream: CorpusAttentionStream, docs: slice = slice(None)) -> ShardPart:
    """A stream fed one shard's chunks, as the part it sends: the statistics of its documents
    ``docs`` only (a shard holds a run of whole documents)."""
    state = stream.state
    cut = lambda t: None if t is None else t[..., docs]  # noqa: E731
    return ShardPart(state.m, state.l, state.acc, state.gold_acc, cut(stream.doc_max), cut(stream.doc_lse),
                     cut(stream.route_max), cut(stream.route_sum), cut(stream.route_count),
                     None if stream.route_chunks is None else [m.cut(docs) for m in stream.route_chunks], docs)


def merge_parts(stream: CorpusAttentionStream, parts: list[ShardPart]) -> CorpusAttentionStream:
    """Fold ``parts`` (in this order) into ``stream``, a stream made like the shards' and fed only
    the keys the driver holds (the instruction's); ``stream.finish(self_k, self_v)`` then gives
    the corpus's result."""
    state = stream.state
    for part in parts:
        alpha, beta = state.add_state(part.m, part.l, part.acc)
        if stream.keeps_gold:
            state.add_gold(alpha[:, stream.rows], part.gold_acc * beta[:, stream.rows, None])
        d = part.docs
        if stream.doc_max is not None:
            stream.doc_max[..., d] = torch.maximum(stream.doc_max[..., d], part.doc_max)
            stream.doc_lse[..., d] = torch.logaddexp(stream.doc_lse[..., d], part.doc_lse)
        if stream.route_max is not None:
            stream.route_max[..., d] = torch.maximum(stream.route_max[..., d], part.route_max)
        if stream.route_sum is not None:
            stream.route_sum[..., d] += part.route_sum
            stream.route_count[d] += part.route_count
        for means, got in zip(stream.route_chunks or (), part.route_chunks or ()):
            means.merge(got, d)
    return stream


def shard_documents(key_doc: Tensor, n_shards: int) -> list[Tensor]:
    """Contiguous runs of whole documents, about equal in keys: per shard, the indices of its
    document keys (instruction keys, -1, go to no shard: the driver holds them).  A shard's
    documents are ``shard_docs(key_doc, index)``."""
    docs = key_doc[key_doc >= 0]
    cuts = torch.linspace(0, docs.numel(), n_shards + 1).round().long()
    bounds = [int(docs[min(int(c), docs.numel() - 1)]) for c in cuts[1:-1]]  # first document of shards 1..
    edges = [0, *bounds, int(docs.max()) + 1]
    return [((key_doc >= lo) & (key_doc < hi)).nonzero().squeeze(1) for lo, hi in zip(edges, edges[1:])]


def shard_docs(key_doc: Tensor, index: Tensor) -> slice:
    """The run of documents a shard's keys ``index`` hold."""
    docs = key_doc[index]
    return slice(int(docs.min()), int(docs.max()) + 1)

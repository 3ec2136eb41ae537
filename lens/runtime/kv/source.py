"""Where documents' KV lives, as the runner sees it: prefill a corpus, feed a layer's keys to
every stream's corpus attention (one read for all streams), count what a stream attends."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor
import torch

from kernels.corpus_attention import kept_keys
from lens.data.layout import PoolLayout
from lens.runtime.stream import QueryStream


class KVSource:
    """What the engine needs of a place that holds documents' KV (see MemoryKV, DiskKV)."""

    pool: PoolLayout

    def prefill(self, corpus: list[int]) -> None:
        raise NotImplementedError

    def feed(self, layer: int, streams: list[QueryStream]) -> None:
        """Pass every stream's corpus keys of ``layer`` to ``stream.attention.update``."""
        raise NotImplementedError

    def _per_corpus(self, kind: str, lists: tuple, compute):
        """A value computed once per corpus list (or pair of lists): keyed by the lists' ids, the
        identity checked on the way out, the most recent 512 kept."""
        memo = self.__dict__.setdefault("_memo", OrderedDict())
        key = (kind, *map(id, lists))
        hit = memo.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], lists)):
            hit = memo[key] = (lists, compute())
            while len(memo) > 512:
                memo.popitem(last=False)
        return hit[1]

    def corpus_keys(self, stream: QueryStream, layer: int | None = None) -> int:
        """Number of corpus keys (instruction + documents) the stream attends at ``layer``."""
        n_inst = len(self.pool.instruction_ids)
        if layer is not None and stream.attends_routed(layer):
            lengths = [len(self.pool.doc_token_ids[d]) for d in stream.corpus]
            return n_inst + sum(n for n, keep in zip(lengths, stream.attended(layer).tolist()) if keep)
        return n_inst + self._per_corpus(
            "tokens", (stream.corpus,), lambda: sum(len(self.pool.doc_token_ids[d]) for d in stream.corpus))

    @staticmethod
    def update(stream: QueryStream, layer: int, keys: Tensor, values: Tensor, key_doc: Tensor) -> None:
        """One chunk to one stream, past its route layer only the keys of its kept documents."""
        if stream.attends_routed(layer):
            kept = kept_keys(key_doc, stream.attended(layer))
            if not kept.any():
                return
            keys, values, key_doc = keys[:, kept], values[:, kept], key_doc[kept]
        stream.attention.update(keys, values, key_doc)


def renumber(key_doc: Tensor, remap: Tensor | None) -> Tensor:
    """Document indices from one corpus order into another (instruction keys stay -1)."""
    if remap is None:
        return key_doc
    return torch.where(key_doc >= 0, remap[key_doc.clamp(min=0)], key_doc)

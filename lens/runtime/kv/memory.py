"""Documents' KV in memory, prefilled on demand in the pool's fixed batches."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kernels.corpus_attention import iter_chunks, update_shared
from lens.data.layout import PoolLayout, document_start
from lens.models.decoder import Decoder
from lens.runtime.kv.source import KVSource, renumber
from lens.runtime.prefill import length_batches, pool_batches, prefill_batch, run_instruction
from lens.runtime.records import DocumentKV
from lens.runtime.stream import QueryStream


class MemoryKV(KVSource):
    """Documents' KV in memory, prefilled on demand (the interactive path, up to a few million
    tokens of KV: SmolLM2 needs 23 KB per token in bf16)."""

    def __init__(
        self, model: Decoder, pool: PoolLayout, batch_tokens: int = 2048, progress: bool = True, seed: int = 0,
        kv_dtype: torch.dtype | None = None,
    ):
        """``batch_tokens`` sizes the fixed batches.  A small N prefills whole the batches its
        documents fall in, so smaller batches keep a first query's prefill near its own documents;
        ``experiments/bench_prefill.py --sizes`` measures the trade (README, Performance)."""
        self.model, self.pool, self.layout = model, pool, pool.config
        self.batch_tokens, self.progress, self.seed = batch_tokens, progress, seed
        self.batches = pool_batches(pool, seed, batch_tokens)  # the disk cache's too
        self._batch_of = {d: b for b, docs in enumerate(self.batches) for d in docs}
        self._start = document_start(self.layout, len(pool.instruction_ids), 0)  # all (not under sequential)
        self.dtype = kv_dtype or model.dtype  # bf16 under an fp32 model halves the cache's memory
        with torch.no_grad():
            self._instruction = run_instruction(model, pool.instruction_ids)  # the prefill's, in the model's dtype
        self.instruction = DocumentKV(self._instruction.keys.to(self.dtype), self._instruction.values.to(self.dtype))
        self._store: dict[str, DocumentKV] = {}
        self._keys: dict[tuple[int, int], str] = {}
        self._concat: OrderedDict = OrderedDict()
        self.concat_budget_bytes = int(float(os.environ.get("LENS_CORPUS_CACHE_GB", "4")) * 1e9)
        self.concat_min_docs = 65  # sets of documents this large are concatenated once and kept
        self._fingerprint = self.layout.document_fingerprint()

    def _key(self, doc: int, start: int) -> str:
        key = self._keys.get((doc, start))
        if key is None:
            h = hashlib.sha256(f"{self.model.fingerprint}|{self._fingerprint}|{start}|".encode())
            h.update(torch.tensor(self.pool.doc_token_ids[doc], dtype=torch.int64).numpy().tobytes())
            key = self._keys[doc, start] = h.hexdigest()
        return key

    def starts(self, corpus: list[int]) -> list[int]:
        starts, offset, n_inst = [], 0, len(self.pool.instruction_ids)
        for d in corpus:
            starts.append(document_start(self.layout, n_inst, offset))
            offset += len(self.pool.doc_token_ids[d])
        return starts

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self._concat.clear()
        self.__dict__.pop("_memo", None)

    def _groups(self, corpus: list[int]) -> list[list[tuple[int, int, str]]]:
        """The fixed batches that hold ``corpus``'s documents, as (document, start, store key).

        Under ``shared`` and ``restart`` positions a document has one start: its batch is the
        pool's (:attr:`batches`), whichever corpus asks.  Under ``sequential`` positions a
        document's start depends on the corpus, so the batches are runs of the corpus itself
        and a document's key names its batch: a corpus whose batch holds the same documents at
        the same starts shares it, any other prefills its own."""
        if self.layout.positions != "sequential":
            return [[(d, self._start, self._key(d, self._start)) for d in self.batches[b]]
                    for b in sorted({self._batch_of[d] for d in corpus})]
        starts, groups = self.starts(corpus), []
        for b in length_batches([len(self.pool.doc_token_ids[d]) for d in corpus], self.batch_tokens):
            keys = [self._key(corpus[i], starts[i]) for i in b]
            batch = hashlib.sha256("|".join(keys).encode()).hexdigest()[:16]
            groups.append([(corpus[i], starts[i], f"{k}@{batch}") for i, k in zip(b, keys)])
        return groups

    def _doc_keys(self, corpus: list[int]) -> list[str]:
        """The store key of each of ``corpus``'s documents, in corpus order."""
        if self.layout.positions != "sequential":
            return [self._key(d, self._start) for d in corpus]
        return [k for group in self._groups(corpus) for _, _, k in group]  # runs of the corpus, in order

    @torch.no_grad()
    def prefill(self, corpus: list[int]) -> None:
        """Make sure every document of ``corpus`` (pool indices) has its KV cached.

        A missing document is prefilled with the whole of its fixed batch (:meth:`_groups`), so
        its KV is the same bits whatever was prefilled before: a resumed sweep, a query asked
        after another, the disk cache and this one all hold the same KV."""
        groups = [g for g in self._groups(corpus) if any(k not in self._store for _, _, k in g)]
        if not groups:
            return
        with tqdm(total=sum(map(len, groups)), desc="prefill documents", unit="doc", disable=not self.progress,
                  leave=False) as bar:
            for items in groups:
                keys, values = prefill_batch(
                    self.model, self._instruction, [self.pool.doc_token_ids[d] for d, _, _ in items],
                    [s for _, s, _ in items], self.model.tokenizer.pad_token_id or 0,
                )
                for row, (d, _, key) in enumerate(items):
                    n = len(self.pool.doc_token_ids[d])
                    self._store[key] = DocumentKV(
                        keys[row, :, :n].transpose(1, 2).to(self.dtype).contiguous(),
                        values[row, :, :n].transpose(1, 2).to(self.dtype).contiguous(),
                    )
                bar.update(len(items))

    def _corpus_kv(self, corpus: list[int]) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per layer the corpus's keys and values concatenated (instruction first), and the
        document index of every key.  Concatenated once per corpus and kept (most recent first)
        within ``concat_budget_bytes``, so decoding steps and intervention reruns reuse them."""
        key = tuple(corpus)
        if key in self._concat:
            self._concat.move_to_end(key)
            return self._concat[key]
        docs = [self._store[k] for k in self._doc_keys(corpus)]
        n_layers = self.instruction.keys.shape[0]
        keys = [torch.cat([self.instruction.keys[l]] + [kv.keys[l] for kv in docs], dim=1) for l in range(n_layers)]
        values = [torch.cat([self.instruction.values[l]] + [kv.values[l] for kv in docs], dim=1) for l in range(n_layers)]
        key_doc = torch.cat(
            [torch.full((self.instruction.keys.shape[2],), -1, dtype=torch.long)]
            + [torch.full((kv.keys.shape[2],), j, dtype=torch.long) for j, kv in enumerate(docs)]
        )
        return self._keep(key, (keys, values, key_doc))

    def _keep(self, key, entry: tuple) -> tuple:
        """A concatenation kept (most recent first) within ``concat_budget_bytes``."""
        self._concat[key] = entry
        size = lambda e: sum(t.numel() * t.element_size() for t in e[0] + e[1])  # noqa: E731
        while len(self._concat) > 1 and sum(size(e) for e in self._concat.values()) > self.concat_budget_bytes:
            self._concat.popitem(last=False)
        return entry

    def feed(self, layer: int, streams: list[QueryStream], chunk_size: int = 65536) -> None:
        """Where a document's positions do not depend on the corpus (``shared`` and ``restart``
        positions), the documents every stream attends (a sweep unit's shared distractors; a
        beam's whole corpus) are read once for all of them, one kernel call per chunk
        (:func:`kernels.corpus_attention.update_shared`), and each other document once for the
        streams that hold it.  Routed streams, past their route layer, read the instruction and
        their kept documents alone.  Under ``sequential`` positions streams share a chunk when
        their corpora are the same documents in the same order."""
        if self.layout.positions == "sequential":
            self._feed_by_corpus(layer, streams, chunk_size)
            return
        whole = []  # streams reading their whole corpus, or all of it but a few hidden documents
        for s in streams:
            if s.routed_at(layer):
                index = s.attended(layer).nonzero().squeeze(1)
                kept = tuple(s.corpus[i] for i in index.tolist())
                self._feed_docs(layer, [s], kept, True, [index], chunk_size)
            else:
                whole.append(s)
        if whole:
            for members, docs, instruction, positions in self._feed_plan(whole):
                self._feed_docs(layer, [whole[i] for i in members], docs, instruction, positions, chunk_size)

    def _feed_plan(self, streams: list[QueryStream]) -> list[tuple]:
        """(stream indices, documents, with the instruction?, each stream's positions of them): the
        documents all streams hold with the instruction, then the others grouped by their holders.
        The same for every layer of a pass: made once per set of corpora."""
        corpora = [s.corpus for s in streams]

        def compute() -> list[tuple]:
            common = set(corpora[0]).intersection(*corpora[1:])
            holders: dict[int, list[int]] = {}
            for i, corpus in enumerate(corpora):
                for d in corpus:
                    if d not in common:
                        holders.setdefault(d, []).append(i)
            by_holders: dict[tuple, list[int]] = {}
            for d, hs in holders.items():
                by_holders.setdefault(tuple(hs), []).append(d)
            parts = [(tuple(range(len(corpora))), tuple(sorted(common)), True)]
            parts += [(hs, tuple(sorted(docs)), False) for hs, docs in by_holders.items()]
            wheres = [{d: i for i, d in enumerate(corpus)} for corpus in corpora]
            return [(hs, docs, inst, [torch.tensor([wheres[i][d] for d in docs], dtype=torch.long) for i in hs])
                    for hs, docs, inst in parts]

        return self._per_corpus("plan", tuple(corpora), compute)

    def _feed_docs(self, layer: int, streams: list[QueryStream], docs: tuple, instruction: bool,
                   positions: list[Tensor], chunk_size: int) -> None:
        """``docs`` (pool indices, the instruction first where ``instruction``) to each of
        ``streams``, one kernel call per chunk (per run of keys between hidden documents where
        streams hide some); ``positions``: each stream's positions of them."""
        if not docs and not instruction:
            return
        keys, values, key_doc = self._docs_kv(docs, instruction, layer)
        for k, v, kd in iter_chunks(keys, values, key_doc, chunk_size):
            # streams that do not read document ids (decoding steps without statistics) skip the renumbering
            ids = [renumber(kd, p) if s.attention.uses_key_doc or s.visible is not None else kd
                   for s, p in zip(streams, positions)]
            # a stream that hides documents reads the runs of keys between them (views, no copies),
            # beside every other stream that reads the same run
            seen = [None if s.visible is None else i.lt(0) | s.visible[i.clamp(min=0)] for s, i in zip(streams, ids)]
            cuts = sorted({0, kd.shape[0], *(c for m in seen if m is not None for c in _edges(m))})
            for a, b in zip(cuts, cuts[1:]):
                members = [j for j, m in enumerate(seen) if m is None or bool(m[a])]
                if len(members) == 1:
                    streams[members[0]].attention.update(k[:, a:b], v[:, a:b], ids[members[0]][a:b])
                elif members:
                    update_shared([streams[j].attention for j in members], k[:, a:b], v[:, a:b],
                                  [ids[j][a:b] for j in members])

    def _docs_kv(self, docs: tuple, instruction: bool, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """``docs``' keys and values at ``layer`` concatenated (the instruction first where
        ``instruction``) and each key's index in ``docs`` (-1: the instruction).  Large sets of
        documents are concatenated at every layer at once and kept (most recent first)
        within ``concat_budget_bytes``, so a pass's layers, its decoding steps and intervention
        reruns reuse them; smaller ones (kept or gold documents) are cut per layer (``concat_min_docs``)."""
        key = (docs, instruction)
        kept = self._concat.get(key) if len(docs) >= self.concat_min_docs else None
        if kept is not None:  # a kept concatenation: no per-document work at all
            self._concat.move_to_end(key)
            return kept[0][layer], kept[1][layer], kept[2]
        kvs = ([self.instruction] if instruction else []) + [self._store[self._key(d, self._start)] for d in docs]
        key_doc = torch.cat([torch.full((kv.keys.shape[2],), j, dtype=torch.long) for j, kv in enumerate(kvs)])
        if instruction:
            key_doc -= 1
        if len(docs) < self.concat_min_docs:
            return (torch.cat([kv.keys[layer] for kv in kvs], dim=1), torch.cat([kv.values[layer] for kv in kvs], dim=1),
                    key_doc)
        n_layers = self.instruction.keys.shape[0]
        keys, values, key_doc = self._keep(key, ([torch.cat([kv.keys[l] for kv in kvs], dim=1) for l in range(n_layers)],
                                                 [torch.cat([kv.values[l] for kv in kvs], dim=1) for l in range(n_layers)],
                                                 key_doc))
        return keys[layer], values[layer], key_doc

    def _feed_by_corpus(self, layer: int, streams: list[QueryStream], chunk_size: int) -> None:
        """Streams over the same documents in the same order share each chunk; routed streams, past
        their route layer, read their kept documents alone."""
        groups: dict = {}
        for stream in streams:
            groups.setdefault(self._group_key(stream.corpus), []).append(stream)
        for members in groups.values():
            leader = self._leader(members[0].corpus)
            all_keys, all_values, key_doc = self._corpus_kv(leader)
            keys, values = all_keys[layer], all_values[layer]
            shared, remaps = [], []
            for s in members:
                remap = self._remap(leader, s.corpus)
                if s.attends_routed(layer):  # its kept documents, in the leader's numbering
                    keep = s.attended(layer) if remap is None else s.attended(layer)[remap]
                    for k, v, docs in iter_chunks(keys, values, key_doc, chunk_size, keep):
                        s.attention.update(k, v, renumber(docs, remap))
                else:
                    shared.append(s)
                    remaps.append(remap)
            if shared:
                for k, v, docs in iter_chunks(keys, values, key_doc, chunk_size):
                    # only streams that read document ids get their own numbering (decoding steps
                    # without statistics on the fused path do not)
                    update_shared([s.attention for s in shared], k, v,
                                  [renumber(docs, r) if s.attention.uses_key_doc else docs for s, r in zip(shared, remaps)])

    def _leader(self, corpus: list[int]) -> list[int]:
        """The document order whose concatenated KV a group reads: the sorted documents when
        positions do not depend on order, so every query over the same documents (in the lab, any
        query at N = the pool) reuses one concatenation across calls; else the corpus itself."""
        if self.layout.positions == "sequential":
            return corpus
        return self._per_corpus("leader", (corpus,), lambda: sorted(corpus))

    def _group_key(self, corpus: list[int]):
        """Streams with equal keys can share the concatenated KV of the first of them: the same
        documents in the same order, or in any order when a document's positions do not depend on
        the documents before it."""
        return self._per_corpus("group", (corpus,), lambda: tuple(self._leader(corpus)))

    def _remap(self, leader: list[int], corpus: list[int]) -> Tensor | None:
        """For each position of ``leader``'s corpus, the position of the same document in
        ``corpus`` (None when the order is the same)."""
        if corpus is leader or corpus == leader:
            return None
        def compute() -> Tensor:
            where = {d: i for i, d in enumerate(corpus)}
            return torch.tensor([where[d] for d in leader], dtype=torch.long)

        return self._per_corpus("remap", (leader, corpus), compute)


def _edges(kept: Tensor) -> list[int]:
    """Where a bool vector changes value (the index of each first element after a change)."""
    return (torch.nonzero(kept[1:] != kept[:-1]).squeeze(1) + 1).tolist()

"""Running the BlockSearch layout on a hooked decoder.

1. The instruction block is run once (causal).
2. Documents are prefilled block-sparsely in batches (each sees the instruction and itself).
   Their per-layer keys and values live in a KV source: :class:`MemoryKV` (a per-document
   cache keyed by model, layout, document tokens and start position; prefilled on demand) or
   :class:`lens.kv_store.DiskKV` (the whole pool on disk, for corpora larger than RAM).  Both
   prefill the same fixed batches (:func:`pool_batches`; under ``sequential`` positions, runs of
   each corpus): a document's KV depends on the other rows of its batch at the last bit (padded
   width and GEMM shape change the order of sums), so it must not depend on which documents
   happened to be asked for first.
3. Query streams, one per (query, N, intervention), run *layer-major*: every stream computes its
   queries for layer L, the source feeds the layer's corpus chunks to all streams at once (a
   disk-backed corpus is read once per layer, whatever the number of streams), then every
   stream finishes the layer.  Attention goes through ``kernels.corpus_attention``, which also
   returns the per-document statistics the lens records (for the readout token).
4. Four digits are decoded greedily (over the ten digit tokens) or by a beam over the corpus's
   codes, reusing the query side's KV.  Given drafts (e.g. the plain run's codes when an
   intervention reruns a query), the drafted digits ride along in the query pass as extra rows
   (a tree: each attends the query and its own earlier digits), and a step whose prefix was
   drafted reads its digit distribution from there instead of passing over the corpus again.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kernels.block_prefill import block_prefill
from kernels.corpus_attention import CorpusAttentionResult, CorpusAttentionStream, iter_chunks, update_shared
from kernels.score_functions import Route, ScoreFunction, find_route, validate_for_model
from lens.data.datasets import Dataset
from lens.data.layout import (
    LayoutConfig, PoolLayout, build_pool_layout, corpus_for_query, document_start, pool_order, query_start,
)
from lens.errors import LensError
from lens.models.decoder import Decoder

CODE_DIGITS = 4


@dataclass
class DocumentKV:
    keys: Tensor  # [layer, kv_head, len, d_head], rotated
    values: Tensor  # [layer, kv_head, len, d_head]


def run_instruction(model: Decoder, token_ids: list[int]) -> DocumentKV:
    """The instruction block's KV (causal, positions 0..I-1).  Differentiable (training uses it);
    the engine calls it under no_grad."""
    ids = torch.tensor([token_ids])
    keys, values = [], []

    def attend(layer, q, k, v):
        keys.append(k[0].transpose(0, 1))
        values.append(v[0].transpose(0, 1))
        mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()[None, None]
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


@dataclass
class QueryRun:
    """One query over one corpus: decoded code and the per-layer record of the readout token."""

    query_id: str
    n_docs: int
    intervention: str
    corpus: list[int]  # pool indices, in corpus order
    gold_positions: list[int]  # indices into corpus
    codes: list[str]  # code of each corpus document
    decoded: str  # the four digits decoded (greedy, or the best of a beam over the corpus's codes)
    digit_logprobs: Tensor  # [4, 10] log-probs over the ten digits at each step of the decoded path
    readout_logits: Tensor  # [vocab] at the readout token (predicts the first digit)
    layers: list[CorpusAttentionResult] = field(default_factory=list)  # readout token only (Q=1)
    attn_out: Tensor | None = None  # [layer, d_model] attention block output at the readout token
    gold_attn_out: Tensor | None = None  # [layer, d_model] W_O applied to the gold part a^G
    resid_post: Tensor | None = None  # [layer, d_model] residual stream after each layer, readout token
    logit_lens: Tensor | None = None  # [layer, 10] digit logits of final norm + unembedding of resid_post
    route_scores: Tensor | None = None  # [layer, 2, N] QK-MaxSim routing score per document (head max, head mean)
    routed: list[int] | None = None  # corpus positions kept by a route intervention (after its layer)
    ranked_codes: list[str] = field(default_factory=list)  # best first (one code when greedy)
    ranked_logprobs: list[float] = field(default_factory=list)  # log P(code) of each ranked code
    n_tokens: int = 0  # context length: instruction + documents + query block

    @property
    def gold_codes(self) -> list[str]:
        return [self.codes[p] for p in self.gold_positions]

    @property
    def correct(self) -> bool:
        return self.decoded in self.gold_codes


def model_score_function(model, score_fn: ScoreFunction | None) -> ScoreFunction | None:
    """The score function a query row runs under: the model's own (a trained length-aware
    softmax, ``model.builtin_score_fn``) first, then the intervention.  A run with no
    intervention is the model's plain run."""
    builtin = getattr(model, "builtin_score_fn", None)
    if builtin is None:
        return score_fn
    return builtin if score_fn is None else builtin + score_fn


@dataclass
class QueryStream:
    """One (query, N, intervention) moving through the layers; grows by each decoded digit."""

    query_id: str
    corpus: list[int]
    gold_positions: list[int]
    query_ids: list[int]
    score_fn: ScoreFunction | None
    route: Route | None
    record: bool
    next_position: int
    n_layers: int
    route_record: bool = True  # record every layer's QK-MaxSim routing scores (routing recall)
    self_k: list = field(default_factory=list)  # per layer [kv_head, S, d]
    self_v: list = field(default_factory=list)
    keep_docs: Tensor | None = None  # bool [N], set at the route layer
    recording: dict = field(default_factory=dict)
    # per step, set by the engine
    resid: Tensor | None = None
    rotary: tuple | None = None
    attention: CorpusAttentionStream | None = None
    source_plan: tuple | None = None  # a KV source's per-corpus lookup, computed once per stream
    start_layer: int = 0  # first layer computed at the first step (earlier ones restored from a plain run)
    # speculative decoding: drafted digit prefixes -> their row in the query pass (rows 0..M-1, the
    # query's own tokens after them), the digit logits each row gave, and the pass's self mask
    drafted: dict | None = None
    draft_logits: dict | None = None
    self_mask: Tensor | None = None
    beam_root: int | None = None  # set on a beam's hypotheses at decoding steps: their dense layers run as one batch

    # decoding: the digits so far, their summed log-prob, and the ten-digit distributions seen
    digits: list = field(default_factory=list)
    score: float = 0.0
    step_logprobs: list = field(default_factory=list)

    def __post_init__(self):
        if not self.self_k:
            self.self_k, self.self_v = [None] * self.n_layers, [None] * self.n_layers

    def extend(self, digit: int, logprobs: Tensor) -> "QueryStream":
        """A hypothesis one digit longer, sharing this one's KV so far (the lists are copied)."""
        return replace(
            self, self_k=list(self.self_k), self_v=list(self.self_v), digits=self.digits + [digit], start_layer=0,
            score=self.score + float(logprobs[digit]), step_logprobs=self.step_logprobs + [logprobs],
        )

    @property
    def n_docs(self) -> int:
        return len(self.corpus)

    def attends_routed(self, layer: int) -> bool:
        return self.route is not None and layer > self.route.layer and self.keep_docs is not None


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
            return n_inst + sum(n for n, keep in zip(lengths, stream.keep_docs.tolist()) if keep)
        return n_inst + self._per_corpus(
            "tokens", (stream.corpus,), lambda: sum(len(self.pool.doc_token_ids[d]) for d in stream.corpus))


class MemoryKV(KVSource):
    """Documents' KV in memory, prefilled on demand (the interactive path, up to a few million
    tokens of KV: SmolLM2 needs 23 KB per token in bf16)."""

    def __init__(
        self, model: Decoder, pool: PoolLayout, batch_tokens: int = 2048, progress: bool = True, seed: int = 0,
    ):
        """``batch_tokens`` sizes the fixed batches.  A small N prefills whole the batches its
        documents fall in, so smaller batches keep a first query's prefill near its own documents;
        ``experiments/bench_prefill.py --sizes`` measures the trade (README, Performance)."""
        self.model, self.pool, self.layout = model, pool, pool.config
        self.batch_tokens, self.progress, self.seed = batch_tokens, progress, seed
        self.batches = pool_batches(pool, seed, batch_tokens)  # the disk cache's too
        self._batch_of = {d: b for b, docs in enumerate(self.batches) for d in docs}
        self._start = document_start(self.layout, len(pool.instruction_ids), 0)  # all (not under sequential)
        with torch.no_grad():
            self.instruction = run_instruction(model, pool.instruction_ids)
        self._store: dict[str, DocumentKV] = {}
        self._keys: dict[tuple[int, int], str] = {}
        self._concat: OrderedDict = OrderedDict()
        self.concat_budget_bytes = int(float(os.environ.get("LENS_CORPUS_CACHE_GB", "4")) * 1e9)
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
                    self.model, self.instruction, [self.pool.doc_token_ids[d] for d, _, _ in items],
                    [s for _, s, _ in items], self.model.tokenizer.pad_token_id or 0,
                )
                for row, (d, _, key) in enumerate(items):
                    n = len(self.pool.doc_token_ids[d])
                    self._store[key] = DocumentKV(
                        keys[row, :, :n].transpose(1, 2).contiguous(), values[row, :, :n].transpose(1, 2).contiguous()
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
        self._concat[key] = (keys, values, key_doc)
        size = lambda entry: sum(t.numel() * t.element_size() for t in entry[0] + entry[1])  # noqa: E731
        while len(self._concat) > 1 and sum(size(e) for e in self._concat.values()) > self.concat_budget_bytes:
            self._concat.popitem(last=False)
        return self._concat[key]

    def feed(self, layer: int, streams: list[QueryStream], chunk_size: int = 65536) -> None:
        """Streams over the same documents (a beam's hypotheses; queries whose corpora hold the same
        documents, when positions do not depend on order) share each chunk: one read, one kernel
        call for all of them (:func:`kernels.corpus_attention.update_shared`).  Routed streams,
        past their route layer, read their kept documents alone."""
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
                    keep = s.keep_docs if remap is None else s.keep_docs[remap]
                    for k, v, docs in iter_chunks(keys, values, key_doc, chunk_size, keep):
                        s.attention.update(k, v, _renumber(docs, remap))
                else:
                    shared.append(s)
                    remaps.append(remap)
            if shared:
                for k, v, docs in iter_chunks(keys, values, key_doc, chunk_size):
                    # only streams that read document ids get their own numbering (decoding steps
                    # without statistics on the fused path do not)
                    update_shared([s.attention for s in shared], k, v,
                                  [_renumber(docs, r) if s.attention.uses_key_doc else docs for s, r in zip(shared, remaps)])

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


def _renumber(key_doc: Tensor, remap: Tensor | None) -> Tensor:
    """Document indices from one corpus order into another (instruction keys stay -1)."""
    if remap is None:
        return key_doc
    return torch.where(key_doc >= 0, remap[key_doc.clamp(min=0)], key_doc)


class BlockSearchRunner:
    """Prefill a dataset's documents once; run any query at any N with any intervention."""

    def __init__(
        self,
        model: Decoder,
        dataset: Dataset,
        layout: LayoutConfig | None = None,
        seed: int = 0,
        batch_tokens: int | None = None,
        progress: bool = True,
        kv: str = "memory",
        kv_folder=None,
    ):
        """``kv="memory"`` prefills documents on demand into RAM; ``kv="disk"`` prefills the whole
        pool once into a verified on-disk cache (``kv_folder``, default ``$LENS_CACHE/kv``).
        ``batch_tokens``: the prefill batches' size, by default each source's own (memory 2048,
        disk 8192); the two hold the same KV bits when it is the same."""
        self.model, self.dataset, self.seed = model, dataset, seed
        self.layout = layout or LayoutConfig.for_model(model)
        self.pool: PoolLayout = build_pool_layout(dataset, model.tokenizer, self.layout)
        self.progress = progress
        if kv == "memory":
            self.source: KVSource = MemoryKV(model, self.pool, batch_tokens or 2048, progress, seed)
        elif kv == "disk":
            from lens.kv_store import DiskKV

            self.source = DiskKV(model, self.pool, seed, kv_folder, batch_tokens or 8192, progress=progress)
        else:
            raise LensError(f"kv={kv!r}: choose memory or disk")
        self.digit_ids = torch.tensor(
            [model.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)], dtype=torch.long
        )
        # plain runs' first-step states per layer, so an intervention that leaves the first layers
        # alone (routing at L, SSMax on a layer range, head scaling) reruns from its first layer
        self._plain: OrderedDict = OrderedDict()
        self.plain_cache_size = 16

    def corpus(self, query_id: str, n_docs: int) -> tuple[list[int], list[int]]:
        return corpus_for_query(self.dataset, query_id, n_docs, self.seed)

    def prefill(self, corpus: list[int]) -> None:
        self.source.prefill(corpus)

    def stream(
        self, query_id: str, n_docs: int, score_fn: ScoreFunction | None = None, record: bool = True,
        route_scores: bool = True,
    ) -> QueryStream:
        """``route_scores=False`` skips the per-layer routing scores (routing recall) in the record,
        a QK pass over every query row: the lab's reruns leave them out."""
        corpus, gold_positions = self.corpus(query_id, n_docs)
        n_layers = self.model.cfg.n_layers
        route = find_route(score_fn)
        if route is not None and not 0 <= route.layer < n_layers - 1:
            raise LensError(f"route layer {route.layer}: must be 0..{n_layers - 2} for a {n_layers}-layer model")
        validate_for_model(score_fn, n_layers, self.model.cfg.n_heads)
        n_inst = len(self.pool.instruction_ids)
        lengths = [len(self.pool.doc_token_ids[d]) for d in corpus]
        q_start = query_start(self.layout, n_inst, sum(lengths), max(lengths))
        return QueryStream(
            query_id, corpus, gold_positions, self.pool.query_token_ids(self.model.tokenizer, query_id),
            score_fn, route, record, q_start, n_layers, route_scores,
        )

    def run_query(
        self, query_id: str, n_docs: int, score_fn: ScoreFunction | None = None, record: bool = True, beam: int = 1
    ) -> QueryRun:
        """Run one query over its corpus of N documents and decode four digits."""
        return self.run_streams([self.stream(query_id, n_docs, score_fn, record)], beam=beam)[0]

    @torch.no_grad()
    def run_streams(
        self, streams: list[QueryStream], desc: str | None = None, beam: int = 1,
        drafts: list[list[str] | None] | None = None,
    ) -> list[QueryRun]:
        """Run several streams together, layer-major (see the module docstring).

        ``beam=1`` decodes greedily over the ten digit tokens.  ``beam=k>1`` keeps the k most
        probable prefixes of the corpus's own codes at each digit (a beam over the code trie),
        so each run also carries its top-k codes ranked by the model's probability.

        ``drafts``, per stream, codes to verify in the query pass (speculative decoding; the
        plain run's ranked codes are good drafts for an intervention's rerun).  The decoded codes
        do not depend on them; a drafted step costs no pass over the corpus, an undrafted one
        costs what it would without drafts.  Numbers agree with an undrafted run to rounding
        (the rows are batched differently), so sweeps, whose records must not depend on what
        ran before, do not draft.  ``self.draft_counts`` tells how many decoding steps the drafts
        answered and how many were computed."""
        if drafts is not None:
            if len(drafts) != len(streams):
                raise LensError(f"drafts: one list of codes per stream ({len(streams)}), got {len(drafts)}")
            for s, codes in zip(streams, drafts):  # every draft checked before any stream changes
                for code in codes or []:
                    if not (isinstance(code, str) and len(code) == CODE_DIGITS and code.isdigit()):
                        raise LensError(f"draft {code!r} for {s.query_id}: expected a code of {CODE_DIGITS} digits")
            for s, codes in zip(streams, drafts):
                if codes:
                    self._plant_drafts(s, codes)
        self.draft_counts = dict(drafted=0, computed=0)
        for s in streams:  # each in its own order: under `sequential` positions depend on it
            self.source.prefill(s.corpus)
        readout: dict[int, Tensor] = {}
        finished: dict[int, list[QueryStream]] = {}
        codes = {id(s): {self.pool.codes[d] for d in s.corpus} for s in streams}
        hypotheses = {id(s): [s] for s in streams}
        total = CODE_DIGITS * self.model.cfg.n_layers
        with tqdm(total=total, desc=desc or "query layers", disable=not self.progress or len(streams) < 2, leave=False) as bar:
            for step in range(CODE_DIGITS):
                active = [h for hs in hypotheses.values() for h in hs]
                root_of = {id(h): r for r, hs in hypotheses.items() for h in hs}
                computing = []
                for h in active:
                    if step == 0 and h.drafted is not None:
                        tokens, positions = self._draft_rows(h)
                    elif step == 0:
                        tokens = torch.tensor(h.query_ids)
                        positions = torch.arange(h.next_position, h.next_position + tokens.shape[0])
                    else:
                        tokens, positions = self.digit_ids[h.digits[-1]].view(1), torch.tensor([h.next_position])
                        if h.drafted is not None and tuple(h.digits) in h.drafted:  # answered by the query pass
                            h.next_position += 1
                            self.draft_counts["drafted"] += 1
                            continue
                        if h.drafted is not None:
                            self._leave_drafts(h)
                        self.draft_counts["computed"] += 1
                    h.next_position += len(h.query_ids) if step == 0 else 1
                    h.beam_root = None if step == 0 else root_of[id(h)]
                    h.resid = self.model.embed(tokens[None])
                    h.rotary = self.model.rotary(positions[None])
                    computing.append(h)
                saving = {}
                if step == 0:
                    saving = {id(h): (h, [], self._plain_key(h)) for h in active if h.score_fn is None and h.drafted is None}
                    for h in active:
                        self._restore_plain(h)
                for layer in range(self.model.cfg.n_layers):
                    for h, inputs, _ in saving.values():
                        inputs.append(h.resid)
                    todo = [h for h in computing if h.start_layer <= layer]
                    if todo:
                        self._layer(layer, todo, record=step == 0)
                    bar.update(1)
                for h in computing:
                    if step == 0 and h.drafted is not None:  # each drafted row's digit distribution
                        h.draft_logits = {p: self._digit_logit_lens(h.resid[0, i]) for p, i in h.drafted.items()}
                        h.self_mask = None
                for h, inputs, key in saving.values():
                    self._plain[key] = dict(resid_in=inputs, self_k=list(h.self_k), self_v=list(h.self_v),
                                            layers=list(h.recording.get("layers", [])))
                    self._plain.move_to_end(key)
                    while len(self._plain) > self.plain_cache_size:
                        self._plain.popitem(last=False)
                for root in streams:
                    candidates = []
                    for h in hypotheses[id(root)]:
                        if step == 0:  # the readout token's whole distribution is part of the record
                            logits = self.model.unembed(h.resid[:, -1:])[0, -1].float()
                            readout[id(root)] = logits
                            digit_logits = logits[self.digit_ids]
                        elif h.drafted is not None:  # verified from the drafted row of this prefix
                            digit_logits = h.draft_logits[tuple(h.digits)]
                        else:  # later steps need only the ten digits' rows of the unembedding
                            digit_logits = self._digit_logit_lens(h.resid[0, -1])
                        logp = torch.log_softmax(digit_logits, dim=-1)
                        prefix = "".join(map(str, h.digits))
                        allowed = range(10) if beam == 1 else sorted(
                            {int(c[step]) for c in codes[id(root)] if c.startswith(prefix)})
                        candidates += [(h.score + float(logp[d]), h, d, logp) for d in allowed]
                    candidates.sort(key=lambda c: -c[0])
                    hypotheses[id(root)] = [h.extend(d, logp) for _, h, d, logp in candidates[:beam]]
                    for h in hypotheses[id(root)]:
                        h.resid = h.rotary = None
                    finished[id(root)] = hypotheses[id(root)]
        return [self._result(s, finished[id(s)], readout[id(s)]) for s in streams]

    def _plant_drafts(self, s: QueryStream, codes: list[str]) -> None:
        """The trie of the drafted codes' first three digits: prefix -> row of the query pass."""
        prefixes = {tuple(int(c) for c in code[:j]) for code in codes for j in range(1, CODE_DIGITS)}
        s.drafted = {p: i for i, p in enumerate(sorted(prefixes, key=lambda p: (len(p), p)))}

    def _draft_rows(self, s: QueryStream) -> tuple[Tensor, Tensor]:
        """Tokens and positions of the query pass with drafts: the drafted digits first (each at
        the position it would have when decoded), the query's tokens last (the readout row stays
        the last row); and the self mask: the query causal, each drafted digit attending the
        query, its own earlier digits and itself."""
        nodes, n_q, m = list(s.drafted), len(s.query_ids), len(s.drafted)
        start = s.next_position
        tokens = torch.cat([self.digit_ids[[p[-1] for p in nodes]], torch.tensor(s.query_ids)])
        positions = torch.cat([torch.tensor([start + n_q + len(p) - 1 for p in nodes]), torch.arange(start, start + n_q)])
        mask = torch.zeros(m + n_q, m + n_q, dtype=torch.bool)
        mask[m:, m:] = torch.ones(n_q, n_q, dtype=torch.bool).tril()
        mask[:m, m:] = True
        for i, p in enumerate(nodes):
            mask[i, [s.drafted[p[:j]] for j in range(1, len(p) + 1)]] = True
        s.self_mask = mask
        return tokens, positions

    def _leave_drafts(self, s: QueryStream) -> None:
        """A hypothesis whose next prefix was not drafted decodes on: its self KV becomes the
        query's rows and those of its (drafted) digits so far, in decoding order."""
        m = len(s.drafted)
        rows = list(range(m, m + len(s.query_ids))) + [s.drafted[tuple(s.digits[:j])] for j in range(1, len(s.digits))]
        index = torch.tensor(rows)
        s.self_k = [k.index_select(1, index) for k in s.self_k]
        s.self_v = [v.index_select(1, index) for v in s.self_v]
        s.drafted = s.draft_logits = None

    def _plain_key(self, s: QueryStream) -> tuple:
        return (s.query_id, tuple(s.query_ids), tuple(s.corpus), s.next_position, s.record, s.route_record)

    def _restore_plain(self, s: QueryStream) -> None:
        """Start ``s`` at its intervention's first layer when a plain run of the same query over
        the same corpus left its states: the layers before that one are exactly the plain run's."""
        if s.score_fn is None or s.drafted is not None:  # drafted rows are not in a plain run's states
            return
        first = min(s.score_fn.first_layer(), self.model.cfg.n_layers - 1)
        plain = self._plain.get(self._plain_key(s)) if first > 0 else None
        if plain is None:
            return
        s.self_k[:first], s.self_v[:first] = plain["self_k"][:first], plain["self_v"][:first]
        if s.record:
            s.recording["layers"] = list(plain["layers"][:first])
        s.resid = plain["resid_in"][first]
        s.start_layer = first

    def _layer(self, layer: int, streams: list[QueryStream], record: bool) -> None:
        block = self.model.blocks[layer]
        attn = block.attn
        batches = self._batches(streams)
        for members in batches:  # a batch: one stream, or a beam's hypotheses (one token each, same position)
            resid, (q, k, v) = block.attention_inputs(torch.cat([s.resid for s in members]), *members[0].rotary)
            for i, s in enumerate(members):
                s.resid = resid[i : i + 1]
                self._open_stream(layer, s, q[i : i + 1], k[i : i + 1], v[i : i + 1], record)
        self.source.feed(layer, streams)
        for members in batches:
            results = [self._close_stream(layer, s) for s in members]
            out = block.finish(torch.cat([s.resid for s in members]), torch.stack([r.output for r in results]))
            for i, s in enumerate(members):
                s.resid = out[i : i + 1]
            for s, res in zip(members, results):
                if record and s.record:
                    self._record(s, attn, res)

    def _batches(self, streams: list[QueryStream]) -> list[list[QueryStream]]:
        """Streams whose dense layers run as one batch: a beam's hypotheses at a decoding step
        (same root, one token each).  Never streams of different roots: a stream's numbers must
        not depend on which others ran beside it (a resumed sweep batches streams differently)."""
        groups: dict = {}
        for s in streams:
            groups.setdefault(id(s) if s.beam_root is None else s.beam_root, []).append(s)
        return list(groups.values())

    def _open_stream(self, layer: int, s: QueryStream, q: Tensor, k: Tensor, v: Tensor, record: bool) -> None:
        """The stream's new keys and values join its self KV; its corpus attention is set up."""
        attn = self.model.blocks[layer].attn
        k_new, v_new = k[0].transpose(0, 1), v[0].transpose(0, 1)
        if s.self_k[layer] is None:
            s.self_k[layer], s.self_v[layer] = k_new, v_new
        else:
            s.self_k[layer] = torch.cat([s.self_k[layer], k_new], dim=1)
            s.self_v[layer] = torch.cat([s.self_v[layer], v_new], dim=1)
        deciding = s.route is not None and layer == s.route.layer and s.keep_docs is None
        routed = s.attends_routed(layer)
        s.attention = CorpusAttentionStream(
            q[0].transpose(0, 1), s.n_docs,
            n_corpus_keys=self.source.corpus_keys(s, layer), n_self=s.self_k[layer].shape[1],
            n_docs_attended=int(s.keep_docs.sum()) if routed else s.n_docs,
            layer=layer, scale=attn.scale, score_fn=model_score_function(self.model, s.score_fn),
            gold_docs=s.gold_positions if record and s.record else None,
            stats=record and s.record, route_stats=deciding or (record and s.record and s.route_record),
            stats_rows="last", self_mask=s.self_mask,
            route_rows=slice(None) if s.self_mask is None else slice(len(s.drafted), None),
        )

    def _close_stream(self, layer: int, s: QueryStream) -> CorpusAttentionResult:
        res = s.attention.finish(s.self_k[layer], s.self_v[layer])
        s.attention = None
        if s.route is not None and layer == s.route.layer and s.keep_docs is None:
            top = s.route.scores(res.route_max).topk(min(s.route.B, s.n_docs)).indices
            s.keep_docs = torch.zeros(s.n_docs, dtype=torch.bool)
            s.keep_docs[top] = True
        return res

    def _record(self, s: QueryStream, attn, res: CorpusAttentionResult) -> None:
        """The readout token's record of one layer."""
        gold = res.gold_output if res.gold_output is not None else torch.zeros_like(res.output[-1:])
        rec = s.recording.setdefault("layers", [])
        rec.append(dict(
            result=CorpusAttentionResult(res.output[-1:], res.lse[:, -1:], res.doc_max, res.doc_lse, res.gold_output),
            attn_out=attn.o_proj(res.output[-1:].reshape(1, -1))[0].float(),
            gold_attn_out=attn.o_proj(gold.reshape(1, -1).to(res.output.dtype))[0].float(),
            resid_post=s.resid[0, -1].float(),
            logit_lens=self._digit_logit_lens(s.resid[0, -1]),
            route_scores=torch.stack([res.route_max.amax(0), res.route_max.mean(0)]) if s.route_record else None,
        ))

    def _digit_logit_lens(self, resid: Tensor) -> Tensor:
        """Final norm + unembedding of a residual vector, restricted to the ten digit tokens: [10]."""
        weight = self.model.lm_head.weight[self.digit_ids]
        return (self.model.ln_final(resid[None])[0] @ weight.T).float()

    def _result(self, s: QueryStream, ranked: list[QueryStream], readout: Tensor) -> QueryRun:
        n_inst = len(self.pool.instruction_ids)
        best = ranked[0]
        run = QueryRun(
            query_id=s.query_id, n_docs=s.n_docs, intervention=s.score_fn.spec() if s.score_fn else "none",
            corpus=s.corpus, gold_positions=s.gold_positions, codes=[self.pool.codes[d] for d in s.corpus],
            decoded="".join(map(str, best.digits)), digit_logprobs=torch.stack(best.step_logprobs),
            readout_logits=readout,
            ranked_codes=["".join(map(str, h.digits)) for h in ranked], ranked_logprobs=[h.score for h in ranked],
            routed=s.keep_docs.nonzero().squeeze(1).tolist() if s.keep_docs is not None else None,
            n_tokens=n_inst + sum(len(self.pool.doc_token_ids[d]) for d in s.corpus) + len(s.query_ids),
        )
        layers = s.recording.get("layers")
        if layers:
            run.layers = [r["result"] for r in layers]
            for name in ("attn_out", "gold_attn_out", "resid_post", "logit_lens", "route_scores"):
                if layers[0][name] is not None:
                    setattr(run, name, torch.stack([r[name] for r in layers]))
        return run

"""One (query, N, intervention) moving through the layers, and the score function it runs under."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kernels.corpus_attention import CorpusAttentionStream
from kernels.score_functions import Intervention, Route, ScoreFunction


def model_score_function(model, score_fn: ScoreFunction | None) -> ScoreFunction | None:
    """The score function a query row runs under: the model's own (a trained length-aware
    softmax, ``model.builtin_score_fn``) first, then the intervention.  A run with no
    intervention is the model's plain run."""
    builtin = getattr(model, "builtin_score_fn", None)
    if builtin is None:
        return score_fn
    return builtin if score_fn is None else builtin + score_fn


ROUTE_CHUNK = 16  # keys per chunk of the chunk-mean routing scores a record carries


@dataclass
class QueryStream:
    """One (query, N, intervention) moving through the layers; grows by each decoded digit."""

    query_id: str
    corpus: list[int]
    gold_positions: list[int]
    query_ids: list[int]
    intervention: Intervention  # its score function and routing policy, either may be absent
    record: bool
    next_position: int
    n_layers: int
    route_record: bool = True  # record every layer's QK-MaxSim routing scores (routing recall)
    longest_doc: int = 0  # tokens of the corpus's longest document (chunk-mean routing's chunks per document)
    self_k: list = field(default_factory=list)  # per layer [kv_head, S, d]
    self_v: list = field(default_factory=list)
    keep_docs: Tensor | None = None  # bool [N], the route's documents, set when it decides (at its layer)
    hidden: tuple = ()  # corpus positions the query never attends, at any layer (exclusion ranking)
    visible: Tensor | None = None  # bool [N], False at the hidden positions (None: none hidden)
    recording: dict = field(default_factory=dict)
    # per step, set by the engine
    resid: Tensor | None = None
    rotary: tuple | None = None
    attention: CorpusAttentionStream | None = None
    pending: tuple | None = None  # (q, arguments) of the layer's stream, made once a first pass gave the rows' entropy
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
        if self.hidden and self.visible is None:
            self.visible = torch.ones(len(self.corpus), dtype=torch.bool)
            self.visible[list(self.hidden)] = False

    def extend(self, digit: int, logprobs: Tensor) -> "QueryStream":
        """A hypothesis one digit longer, sharing this one's KV so far (the lists are copied)."""
        return replace(
            self, self_k=list(self.self_k), self_v=list(self.self_v), digits=self.digits + [digit], start_layer=0,
            score=self.score + float(logprobs[digit]), step_logprobs=self.step_logprobs + [logprobs],
        )

    @property
    def score_fn(self) -> ScoreFunction | None:
        return self.intervention.score

    @property
    def route(self) -> Route | None:
        return self.intervention.route

    @property
    def plain(self) -> bool:
        """No intervention: the model's own run."""
        return not self.intervention

    @property
    def n_docs(self) -> int:
        return len(self.corpus)

    def codes(self, pool) -> set[str]:
        """The codes a beam may decode: those of the corpus's documents not hidden."""
        hidden = set(self.hidden)
        return {pool.codes[d] for p, d in enumerate(self.corpus) if p not in hidden}

    def route_chunks(self, deciding: bool, recording: bool) -> dict[int, int] | None:
        """Chunk-mean routing's {keys per chunk: chunks per document at most} where a layer needs
        its scores: the route's own chunk to decide a chunk-mean route, ``ROUTE_CHUNK`` for the
        record (the same in every run, so records compare); None where neither is needed."""
        sizes = set()
        if deciding and self.route is not None and self.route.by == "chunk-mean":
            sizes.add(self.route.chunk)
        if recording:
            sizes.add(ROUTE_CHUNK)
        return {c: max(1, -(-self.longest_doc // c)) for c in sorted(sizes)} or None

    def routed_at(self, layer: int) -> bool:
        """Past its route layer, once the route decided: it reads the route's documents alone."""
        return self.route is not None and layer > self.route.layer and self.keep_docs is not None

    def attended(self, layer: int) -> Tensor | None:
        """bool [N], the documents the stream reads at ``layer`` where it reads not all: the
        route's past its route layer once it decided, else those not hidden."""
        return self.keep_docs if self.routed_at(layer) else self.visible

    def attends_routed(self, layer: int) -> bool:
        """Whether the stream reads only some of its documents at ``layer`` (routed or hiding)."""
        return self.attended(layer) is not None

    def deciding(self, layer: int) -> bool:
        """The route layer, before the route decided."""
        return self.route is not None and layer == self.route.layer and self.keep_docs is None

    def decide(self, document_scores: Tensor) -> None:
        """The route's top-B documents by these per-head scores [head, N], among those not hidden."""
        if self.hidden:
            document_scores = document_scores.clone()
            document_scores[:, list(self.hidden)] = float("-inf")
        keep = self.route.keep(document_scores, self.n_docs)
        self.keep_docs = keep if self.visible is None else keep & self.visible


"""The runner: a dataset's documents prefilled once; any query at any N with any intervention.

Query streams, one per (query, N, intervention), run *layer-major*: every stream computes its
queries for layer L, the KV source feeds the layer's corpus chunks to all streams at once (a
disk-backed corpus is read once per layer, whatever the number of streams), then every stream
finishes the layer.  Attention goes through ``kernels.corpus_attention``, which also returns the
per-document statistics the lens records (for the readout token).  Four digits are then decoded
(:mod:`lens.runtime.decode`), reusing the query side's KV.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kernels.corpus_attention import CorpusAttentionResult, CorpusAttentionStream
from kernels.score_functions import Intervention, as_intervention, entropy_probe
from kernels.spec import validate_for_model
from lens.data.datasets import Dataset
from lens.data.layout import LayoutConfig, PoolLayout, build_pool_layout, corpus_for_query, query_start
from lens.errors import LensError
from lens.log import show_progress
from lens.models.decoder import Decoder
from lens.runtime.decode import beam_step, check_drafts, draft_rows, leave_drafts, plant_drafts
from lens.runtime.kv.source import KVSource
from lens.runtime.records import CODE_DIGITS, QueryRun
from lens.runtime.stream import ROUTE_CHUNK, QueryStream, model_score_function

RECORD_FIELDS = ("attn_out", "gold_attn_out", "resid_post", "logit_lens", "route_scores")


class BlockSearchRunner:
    """Prefill a dataset's documents once; run any query at any N with any intervention."""

    def __init__(
        self, model: Decoder, dataset: Dataset, layout: LayoutConfig | None = None, seed: int = 0,
        batch_tokens: int | None = None, progress: bool = True, kv: str = "memory", kv_folder=None,
        kv_wait: bool = False, batch_dense: bool = False, kv_dtype: torch.dtype | None = None,
    ):
        """``kv="memory"`` prefills documents on demand into RAM; ``kv="disk"`` prefills the whole
        pool once into a verified on-disk cache (``kv_folder``, default ``$LENS_CACHE/kv``).
        ``batch_tokens``: the prefill batches' size, by default each source's own (memory 2048,
        disk 8192); the two hold the same KV bits when it is the same.  ``kv_wait``: a disk cache
        another process is building is waited for, not refused.  ``batch_dense``: the dense layers
        (projections, MLP, norms) of all streams at a layer step run as one matmul over their
        stacked rows, where by default each stream (or beam) runs its own: several times faster for
        many streams at small N, but a stream's numbers then depend, at rounding level, on which
        streams ran beside it (fp32 GEMMs sum differently for a few rows than for many), so it is
        for callers whose batches are fixed, such as a sweep's units; never with hooks attached.
        ``kv_dtype``: the cached documents' KV dtype (default the model's; bf16 under an fp32 model
        halves the cache, and the compiled fp32 kernel reads it; not faster where that kernel is
        bound by arithmetic, as on AVX2: docs/performance.md)."""
        self.model, self.dataset, self.seed = model, dataset, seed
        self.layout = layout or LayoutConfig.for_model(model)
        self.pool: PoolLayout = build_pool_layout(dataset, model.tokenizer, self.layout)
        self.progress = progress = progress and show_progress()
        if kv == "memory":
            from lens.runtime.kv.memory import MemoryKV

            self.source: KVSource = MemoryKV(model, self.pool, batch_tokens or 2048, progress, seed, kv_dtype)
        elif kv == "disk":
            from lens.runtime.kv.disk import DiskKV

            self.source = DiskKV(model, self.pool, seed, kv_folder, batch_tokens or 8192, progress=progress, wait=kv_wait,
                                 kv_dtype=kv_dtype)
        else:
            raise LensError(f"kv={kv!r}: choose memory or disk")
        self.digit_ids = torch.tensor(
            [model.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)], dtype=torch.long
        )
        # unrouted runs' first-step states per layer, so an intervention that leaves the first
        # layers alone (routing at L, SSMax on a layer range, head scaling) reruns from its first
        # layer: after the plain run, or, for X+route, after the run of X by itself
        self._plain: OrderedDict = OrderedDict()
        self.plain_cache_size = 64
        self.batch_dense = batch_dense

    def corpus(self, query_id: str, n_docs: int) -> tuple[list[int], list[int]]:
        return corpus_for_query(self.dataset, query_id, n_docs, self.seed)

    def prefill(self, corpus: list[int]) -> None:
        self.source.prefill(corpus)

    def stream(self, query_id: str, n_docs: int, intervention=None, record: bool = True,
               route_scores: bool = True, hidden: tuple[int, ...] = ()) -> QueryStream:
        """``intervention``: an :class:`~kernels.score_functions.Intervention`, a score function, a
        route or None.  ``route_scores=False`` skips the per-layer routing scores (routing
        recall) in the record, a QK pass over every query row: the lab's reruns leave them out.
        ``hidden``: corpus positions the query never attends (the documents keep their places)."""
        intervention = as_intervention(intervention)
        corpus, gold_positions = self.corpus(query_id, n_docs)
        n_layers = self.model.cfg.n_layers
        route = intervention.route
        if route is not None and not 0 <= route.layer < n_layers - 1:
            raise LensError(f"route layer {route.layer}: must be 0..{n_layers - 2} for a {n_layers}-layer model")
        validate_for_model(intervention, n_layers, self.model.cfg.n_heads)
        hidden = tuple(sorted(set(hidden)))
        if hidden and (hidden[0] < 0 or hidden[-1] >= n_docs or len(hidden) == n_docs):
            raise LensError(f"hidden documents {list(hidden)}: give corpus positions 0..{n_docs - 1}, leaving one or more seen")
        n_inst = len(self.pool.instruction_ids)
        lengths = [len(self.pool.doc_token_ids[d]) for d in corpus]
        q_start = query_start(self.layout, n_inst, sum(lengths), max(lengths))
        return QueryStream(
            query_id, corpus, gold_positions, self.pool.query_token_ids(self.model.tokenizer, query_id),
            intervention, record, q_start, n_layers, route_scores, max(lengths), hidden=hidden,
        )

    def run_query(self, query_id: str, n_docs: int, intervention=None, record: bool = True, beam: int = 1) -> QueryRun:
        """Run one query over its corpus of N documents and decode four digits."""
        return self.run_streams([self.stream(query_id, n_docs, intervention, record)], beam=beam)[0]

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
            check_drafts(streams, drafts)
            for s, codes in zip(streams, drafts):
                if codes:
                    plant_drafts(s, codes)
        self.draft_counts = dict(drafted=0, computed=0)
        self._hooks_attached = self.batch_dense and self._hooked()  # checked once per call, not per layer step
        for s in streams:  # each in its own order: under `sequential` positions depend on it
            self.source.prefill(s.corpus)
        readout: dict[int, Tensor] = {}
        codes = {id(s): s.codes(self.pool) for s in streams}
        hypotheses = {id(s): [s] for s in streams}
        total = CODE_DIGITS * self.model.cfg.n_layers
        with tqdm(total=total, desc=desc or "query layers", disable=not self.progress or len(streams) < 2, leave=False) as bar:
            for step in range(CODE_DIGITS):
                active = [h for hs in hypotheses.values() for h in hs]
                root_of = {id(h): r for r, hs in hypotheses.items() for h in hs}
                computing = [h for h in active if self._step_inputs(h, step, root_of[id(h)])]
                saving = {}
                if step == 0:
                    saving = {id(h): (h, [], self._plain_key(h)) for h in active if h.route is None and h.drafted is None}
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
                self._save_plain(saving.values())
                for root in streams:
                    hs = hypotheses[id(root)]
                    logits = [self._digit_logits(h, step, readout, id(root)) for h in hs]
                    hypotheses[id(root)] = beam_step(hs, logits, step, beam, codes[id(root)])
        return [self._result(s, hypotheses[id(s)], readout[id(s)]) for s in streams]

    def _step_inputs(self, h: QueryStream, step: int, root: int) -> bool:
        """Set the hypothesis's input embedding and rotary for this step; False when its drafted
        query pass already answered the step."""
        if step == 0 and h.drafted is not None:
            tokens, positions = draft_rows(h, self.digit_ids)
        elif step == 0:
            tokens = torch.tensor(h.query_ids)
            positions = torch.arange(h.next_position, h.next_position + tokens.shape[0])
        else:
            tokens, positions = self.digit_ids[h.digits[-1]].view(1), torch.tensor([h.next_position])
            if h.drafted is not None and tuple(h.digits) in h.drafted:  # answered by the query pass
                h.next_position += 1
                self.draft_counts["drafted"] += 1
                return False
            if h.drafted is not None:
                leave_drafts(h)
            self.draft_counts["computed"] += 1
        h.next_position += len(h.query_ids) if step == 0 else 1
        h.beam_root = None if step == 0 else root
        h.resid = self.model.embed(tokens[None])
        h.rotary = self.model.rotary(positions[None])
        return True

    def _digit_logits(self, h: QueryStream, step: int, readout: dict, root: int) -> Tensor:
        if step == 0:  # the readout token's whole distribution is part of the record
            logits = self.model.unembed(h.resid[:, -1:])[0, -1].float()
            readout[root] = logits
            return logits[self.digit_ids]
        if h.drafted is not None:  # verified from the drafted row of this prefix
            return h.draft_logits[tuple(h.digits)]
        return self._digit_logit_lens(h.resid[0, -1])  # later steps need only the ten digits' rows

    def _plain_key(self, s: QueryStream, intervention=None) -> tuple:
        """What fixes an unrouted run's states: the query over its corpus, what it records, and its
        intervention (``intervention``, default the stream's own)."""
        spec = (s.intervention if intervention is None else intervention).spec()
        return (s.query_id, tuple(s.query_ids), tuple(s.corpus), s.hidden, s.next_position, s.record, s.route_record, spec)

    def _save_plain(self, saving) -> None:
        for h, inputs, key in saving:
            self._plain[key] = dict(resid_in=inputs, self_k=list(h.self_k), self_v=list(h.self_v),
                                    layers=list(h.recording.get("layers", [])))
            self._plain.move_to_end(key)
            while len(self._plain) > self.plain_cache_size:
                self._plain.popitem(last=False)

    def _restore_plain(self, s: QueryStream) -> None:
        """Start ``s`` at a later layer when an earlier run of the same query over the same corpus
        left the states of the layers before it: a routed stream after the run of its score
        function alone (the two are the same up to the route layer), any intervention after the
        plain run (the same up to its first layer)."""
        if s.plain or s.drafted is not None:  # drafted rows: not in an unrouted run
            return
        last = self.model.cfg.n_layers - 1
        bases = [(Intervention(score=s.score_fn), s.route.layer)] if s.route is not None and s.score_fn is not None else []
        bases.append((Intervention(), s.intervention.first_layer()))
        for base, first in bases:
            first = min(first, last)
            plain = self._plain.get(self._plain_key(s, base)) if first > 0 else None
            if plain is not None:
                break
        else:
            return
        s.self_k[:first], s.self_v[:first] = plain["self_k"][:first], plain["self_v"][:first]
        if s.record:
            s.recording["layers"] = list(plain["layers"][:first])
        s.resid = plain["resid_in"][first]
        s.start_layer = first

    def _layer(self, layer: int, streams: list[QueryStream], record: bool) -> None:
        block = self.model.blocks[layer]
        batches = self._batches(streams)
        together = self.batch_dense and len(batches) > 1 and not self._hooks_attached
        groups = [batches] if together else [[b] for b in batches]
        for group in groups:  # a batch: one stream, or a beam's hypotheses (one token each, same position)
            for members, (resid, (q, k, v)) in zip(group, self._dense_in(block, group)):
                for i, s in enumerate(members):
                    s.resid = resid[i : i + 1]
                    self._open_stream(layer, s, q[i : i + 1], k[i : i + 1], v[i : i + 1], record)
        self._first_pass(layer, [s for s in streams if s.pending is not None])
        self.source.feed(layer, streams)
        for group in groups:
            results = [[self._close_stream(layer, s) for s in members] for members in group]
            outs = self._dense_out(block, group, [torch.stack([r.output for r in rs]) for rs in results])
            for members, rs, out in zip(group, results, outs):
                for i, s in enumerate(members):
                    s.resid = out[i : i + 1]
                for s, res in zip(members, rs):
                    if record and s.record:
                        self._record(s, block.attn, res)

    def _hooked(self) -> bool:
        return any(h._forward_hooks or h._forward_pre_hooks for h in self.model.hook_dict.values())

    @staticmethod
    def _flat(parts: list[Tensor]) -> Tensor:
        """[B, T, ...] parts as one [1, sum B*T, ...]: rows of one matmul."""
        return torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in parts], 1)

    @staticmethod
    def _unflat(x: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
        sizes = [b * t for b, t in shapes]
        return [part.reshape(b, t, *x.shape[2:]) for part, (b, t) in zip(x.split(sizes, 1), shapes)]

    def _dense_in(self, block, group: list[list[QueryStream]]) -> list[tuple]:
        """Per batch of the group: the block's (hooked) input and q, k, v, from one call for all."""
        xs = [torch.cat([s.resid for s in members]) for members in group]
        if len(group) == 1:
            return [block.attention_inputs(xs[0], *group[0][0].rotary)]
        shapes = [x.shape[:2] for x in xs]
        rot = [[r.expand(x.shape[0], *r.shape[1:]) for r in members[0].rotary] for members, x in zip(group, xs)]
        resid, qkv = block.attention_inputs(self._flat(xs), self._flat([c for c, _ in rot]), self._flat([s for _, s in rot]))
        parts = [self._unflat(t, shapes) for t in (resid, *qkv)]
        return [(r, (q, k, v)) for r, q, k, v in zip(*parts)]

    def _dense_out(self, block, group: list[list[QueryStream]], zs: list[Tensor]) -> list[Tensor]:
        """Per batch of the group: the block's output from its input and attention z."""
        xs = [torch.cat([s.resid for s in members]) for members in group]
        if len(group) == 1:
            return [block.finish(xs[0], zs[0])]
        return self._unflat(block.finish(self._flat(xs), self._flat(zs)), [x.shape[:2] for x in xs])

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
        deciding = s.deciding(layer)
        routed = s.attends_routed(layer)
        score_fn = model_score_function(self.model, s.score_fn)
        kw = dict(
            n_corpus_keys=self.source.corpus_keys(s, layer), n_self=s.self_k[layer].shape[1],
            n_docs_attended=int(s.attended(layer).sum()) if routed else s.n_docs,
            layer=layer, scale=attn.scale, score_fn=score_fn,
            gold_docs=s.gold_positions if record and s.record else None,
            stats=record and s.record, route_stats=deciding or (record and s.record and s.route_record),
            stats_rows="last", self_mask=s.self_mask,
            route_rows=slice(None) if s.self_mask is None else slice(len(s.drafted), None),
            route_mean=(deciding and s.route.by == "mean-key") or (record and s.record and s.route_record),
            route_chunks=s.route_chunks(deciding, record and s.record and s.route_record),
        )
        q_rows = q[0].transpose(0, 1)
        probe = entropy_probe(score_fn, layer)
        if probe is None:
            s.attention = CorpusAttentionStream(q_rows, s.n_docs, **kw)
            return
        # adaptive temperature: a first pass for each row's entropy, then the layer's stream
        s.pending = (q_rows, kw)
        s.attention = CorpusAttentionStream(q_rows, s.n_docs, **{**kw, "score_fn": probe, "gold_docs": None, "stats": False,
                                                                 "route_stats": False, "route_mean": False,
                                                                 "route_chunks": None}, entropy=True)

    def _first_pass(self, layer: int, streams: list[QueryStream]) -> None:
        """The streams' first pass over the corpus (each row's entropy), then their layer's stream."""
        if not streams:
            return
        self.source.feed(layer, streams)
        for s in streams:
            entropy = s.attention.finish_entropy(s.self_k[layer], s.self_v[layer])
            q_rows, kw = s.pending
            s.pending = None
            s.attention = CorpusAttentionStream(q_rows, s.n_docs, **kw, row_entropy=entropy)

    def _close_stream(self, layer: int, s: QueryStream) -> CorpusAttentionResult:
        res = s.attention.finish(s.self_k[layer], s.self_v[layer])
        s.attention = None
        if s.deciding(layer):
            s.decide(s.route.document_scores(res))
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
            route_scores=torch.stack([x for stat in (res.route_max, res.route_mean, res.route_chunk[ROUTE_CHUNK])
                                      for x in (stat.amax(0), stat.mean(0))]) if s.route_record else None,
        ))

    def _digit_logit_lens(self, resid: Tensor) -> Tensor:
        """Final norm + unembedding of a residual vector, restricted to the ten digit tokens: [10]."""
        weight = self.model.lm_head.weight[self.digit_ids]
        return (self.model.ln_final(resid[None])[0] @ weight.T).float()

    def _result(self, s: QueryStream, ranked: list[QueryStream], readout: Tensor) -> QueryRun:
        n_inst = len(self.pool.instruction_ids)
        best = ranked[0]
        run = QueryRun(
            query_id=s.query_id, n_docs=s.n_docs, intervention=s.intervention.spec(),
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
            for name in RECORD_FIELDS:
                if layers[0][name] is not None:
                    setattr(run, name, torch.stack([r[name] for r in layers]))
        return run

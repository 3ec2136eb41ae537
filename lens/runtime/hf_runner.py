"""The nnsight backend: the BlockSearch layout run densely through any transformers causal LM.

Every pass is one forward of transformers' own model over the whole context (instruction,
documents, query, the digits decoded so far) with lens's block mask as a float mask and lens's
positions, so the documents see only the instruction and themselves and the query sees all.
nnsight reads each layer's pre-softmax scores (the input of the softmax inside the eager
attention function) and the values (the second input of the matmul after it), and where an
intervention is on, replaces the query rows' softmax output with the intervention's attention
(score function, sink, routing mask); the per-document statistics are computed from those
scores.  The records are lens's own (:class:`~lens.runtime.records.QueryRun`), so metrics,
sweeps and figures read them unchanged.

It materialises every layer's ``[head, T, T]`` scores, so it is for small corpora: at most
:data:`~lens.models.hf.MAX_TOKENS` tokens by default (the native engine, ``backend="lens"``,
streams the corpus and runs Llama and Qwen3 to about a million tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kernels.corpus_attention import CorpusAttentionResult, kept_keys
from kernels.online_softmax import ChunkMeans, add_doc_sums, merge_doc_stats
from kernels.score_functions import ScoreContext, apply_score_function
from lens.data.datasets import Dataset
from lens.data.layout import LayoutConfig, build_pool_layout, dense_layout
from lens.errors import LensError
from lens.log import show_progress
from lens.models.hf import MAX_TOKENS, HFModel
from lens.runtime.decode import beam_step
from lens.runtime.records import CODE_DIGITS, QueryRun
from lens.runtime.runner import BlockSearchRunner
from lens.runtime.stream import QueryStream, model_score_function


class HFRunner:
    """:class:`~lens.runtime.runner.BlockSearchRunner`'s interface (``stream``, ``run_streams``,
    ``run_query``) over an :class:`~lens.models.hf.HFModel`, dense.  ``max_tokens``: the longest
    context it runs (memory grows as T² per layer)."""

    corpus = BlockSearchRunner.corpus
    stream = BlockSearchRunner.stream
    run_query = BlockSearchRunner.run_query
    _result = BlockSearchRunner._result  # the record of a run, as the native engine assembles it

    def __init__(self, model: HFModel, dataset: Dataset, layout: LayoutConfig | None = None, seed: int = 0,
                 progress: bool = True, max_tokens: int = MAX_TOKENS):
        if not isinstance(model, HFModel):
            raise LensError("HFRunner runs a model loaded with backend='nnsight'; use BlockSearchRunner for lens's own")
        self.model, self.dataset, self.seed, self.max_tokens = model, dataset, seed, max_tokens
        self.layout = layout or LayoutConfig.for_model(model)
        self.pool = build_pool_layout(dataset, model.tokenizer, self.layout)
        self.progress = progress and show_progress()
        self.digit_ids = model.digit_ids

    def prefill(self, corpus: list[int]) -> None:
        """Nothing to prefill: every pass runs the whole context."""

    @torch.no_grad()
    def run_streams(self, streams: list[QueryStream], desc: str | None = None, beam: int = 1,
                    drafts: list | None = None) -> list[QueryRun]:
        if drafts is not None:
            raise LensError("drafts: the nnsight backend decodes without them (every pass is dense)")
        for s in streams:  # every context's size is checked before anything runs
            self._check(s)
        bar = tqdm(streams, desc=desc or "queries (nnsight)", disable=not self.progress or len(streams) < 2, leave=False)
        return [self._run(s, beam) for s in bar]

    def _check(self, s: QueryStream) -> None:
        """The longest context and position a stream's decoding reaches, against the limits."""
        n_query = len(s.query_ids) + CODE_DIGITS - 1  # the query, then three decoded digits fed back
        t = len(self.pool.instruction_ids) + sum(len(self.pool.doc_token_ids[d]) for d in s.corpus) + n_query
        if t > self.max_tokens:
            raise LensError(f"{s.query_id} at N={s.n_docs}: {t} tokens; the nnsight backend materialises every "
                            f"layer's T x T scores and runs at most {self.max_tokens} (max_tokens=); use a smaller N, "
                            "or lens's own engine (backend='lens', Llama and Qwen3) for long contexts")
        last = s.next_position + n_query - 1  # the stream starts at the query's first position
        if self.model.max_position is not None and last >= self.model.max_position:
            raise LensError(f"{self.model.name}: positions up to {last} at N={s.n_docs}, but its learned position table "
                            f"ends at {self.model.max_position - 1}; lay the query closer (LayoutConfig(query_offset=...), "
                            f"now {self.layout.query_offset}) or use a smaller N")

    def _run(self, s: QueryStream, beam: int) -> QueryRun:
        codes = s.codes(self.pool)
        score_fn = model_score_function(self.model, s.score_fn)
        hypotheses, readout = [s], None
        for step in range(CODE_DIGITS):
            # the hypotheses differ only in their digits: one layout, their tokens stacked
            digits = [int(self.digit_ids[d]) for d in hypotheses[0].digits]
            layout = dense_layout(self.pool, s.corpus, list(s.query_ids) + digits)
            tokens = layout.tokens.repeat(len(hypotheses), 1)
            for i, h in enumerate(hypotheses[1:], 1):
                tokens[i, len(tokens[i]) - step:] = self.digit_ids[h.digits]
            logits = self._pass(s, layout, tokens, score_fn, record=step == 0 and s.record)
            if step == 0:
                readout = logits[0]
            hypotheses = beam_step(hypotheses, [row[self.digit_ids] for row in logits], step, beam, codes)
        return self._result(s, hypotheses, readout)

    def _pass(self, s: QueryStream, layout, tokens: Tensor, score_fn, record: bool) -> Tensor:
        """One dense forward of every hypothesis (same length, same mask): the last row's logits
        ``[B, vocab]``; with ``record``, the readout token's record of every layer into ``s``."""
        model, n_heads = self.model, self.model.cfg.n_heads
        b, t = tokens.shape
        rows = slice(layout.query_slice.start, t)  # the query side: query block and digits
        key_doc = layout.key_doc
        dtype = next(model.hf.parameters()).dtype
        float_mask = torch.zeros(t, t, dtype=dtype).masked_fill_(~layout.mask, torch.finfo(dtype).min)
        gold = torch.isin(key_doc, torch.tensor(s.gold_positions, dtype=key_doc.dtype))
        with model.envoy.trace(tokens, attention_mask=float_mask.expand(b, 1, t, t),
                               position_ids=layout.positions.expand(b, t)):
            for layer in range(model.cfg.n_layers):
                layer_envoy = model.layer_envoy(layer)
                attn = getattr(layer_envoy, model.attn_name)
                call = [n for n in attn.source.names if n.startswith("attention_interface")][-1]
                inner = getattr(attn.source, call).source
                softmax = getattr(inner, next(n for n in inner.names if "softmax" in n))
                raw = softmax.input[:, :, rows].float()  # [B, head, Q, T], scaled q.k (+ 0 where attended)
                allowed = layout.mask[rows]
                routed = s.attends_routed(layer)
                if routed:
                    allowed = allowed & kept_keys(key_doc, s.attended(layer))
                n_docs = int(s.attended(layer).sum()) if routed else s.n_docs
                ctx = ScoreContext(layer, n_heads, allowed.sum(-1).view(1, -1, 1), n_docs, key_doc, mask=allowed)
                scores, sink = apply_score_function(raw, score_fn, ctx)
                scores = scores.masked_fill(~allowed, float("-inf"))
                lse = torch.logsumexp(scores, -1)
                if sink is not None:
                    lse = torch.logaddexp(lse, sink.view(n_heads, 1).float())
                probs = torch.exp(scores - lse[..., None])
                if score_fn is not None or routed:
                    out = softmax.output.clone()
                    out[:, :, rows] = probs.to(out.dtype)
                    softmax.output = out
                deciding = s.deciding(layer)
                if deciding or record:
                    keep_raw = raw.masked_fill(~allowed, float("-inf"))
                if deciding:
                    stats = _route_stats(keep_raw[0], key_doc, s.n_docs, s.route.by, s.route_chunks(True, False))
                    s.decide(stats)
                if record:
                    matmul = [n for n in inner.names if "matmul" in n][-1]
                    values = getattr(inner, matmul).inputs[0][1].float()  # [B, head, T, d]
                    attn_out = attn.output[0][0, -1].float()
                    resid = layer_envoy.output
                    resid = (resid[0] if isinstance(resid, tuple) else resid)[0, -1]
                    self._record(s, layer, keep_raw[0], scores[0, :, -1:], lse[0, :, -1:], probs[0, :, -1],
                                 values[0], gold, key_doc, attn_out, resid)
            logits = model.envoy.output.logits[:, -1].float().save()
        if record:
            self._project(s)
        return logits

    def _project(self, s: QueryStream) -> None:
        """Each recorded layer's gold part through the output projection (its linear part: a
        bias belongs to the whole output) and the logit lens of its residual stream."""
        dtype = next(self.model.hf.parameters()).dtype
        for layer, rec in enumerate(s.recording["layers"]):
            proj, gold = self.model.out_proj(layer), rec["result"].gold_output.reshape(1, -1).to(dtype)
            rec["gold_attn_out"] = (proj(gold) - proj(torch.zeros_like(gold)))[0].float()
            rec["logit_lens"] = self.model.digit_logit_lens(rec["resid_post"][None].to(dtype))[0]

    def _record(self, s, layer, raw, scores, lse, probs, values, gold, key_doc, attn_out, resid) -> None:
        """The readout token's record of one layer, as the native engine writes it."""
        n = s.n_docs
        doc_max = torch.full((scores.shape[0], 1, n), float("-inf"))
        doc_lse = torch.full((scores.shape[0], 1, n), float("-inf"))
        merge_doc_stats(scores, key_doc, doc_max, doc_lse)
        output = (probs[:, None] @ values)[None, :, 0]  # [1, head, d]
        gold_output = ((probs * gold)[:, None] @ values)[None, :, 0]
        rec = s.recording.setdefault("layers", [])
        rec.append(dict(  # gold_attn_out and logit_lens are filled in after the pass (modules run outside the trace)
            result=CorpusAttentionResult(output, lse, doc_max, doc_lse, gold_output),
            attn_out=attn_out, gold_attn_out=None, resid_post=resid.float(), logit_lens=None,
            route_scores=torch.stack([x for by in ("maxsim", "mean-key", "chunk-mean")
                                      for stat in [_route_stats(raw, key_doc, n, by, s.route_chunks(False, True))]
                                      for x in (stat.amax(0), stat.mean(0))]) if s.route_record else None,
        ))


def _route_stats(raw: Tensor, key_doc: Tensor, n_docs: int, by: str, chunks: dict[int, int] | None = None) -> Tensor:
    """Per-head document scores ``[head, N]`` from the query rows' raw scores ``[head, Q, T]``
    (-inf where not attended): QK-MaxSim (max over rows and the document's keys), mean key (max
    over rows of the mean of q.k over the document's keys) or chunk mean (the last row's best
    mean of q.k over a chunk of the document's keys; ``chunks``: {keys per chunk: chunks at most})."""
    h = raw.shape[0]
    if by == "chunk-mean":
        attended = torch.isfinite(raw[:, -1]).all(0) & (key_doc >= 0)
        (chunk, n_chunks), = chunks.items()
        means = ChunkMeans(h, n_docs, chunk, n_chunks)
        means.add(raw[:, -1][:, attended], key_doc[attended])
        return means.result()
    if by == "maxsim":
        out = torch.full((h, 1, n_docs), float("-inf"))
        merge_doc_stats(raw.amax(1, keepdim=True), key_doc, out)
        return out[:, 0]
    sums, counts = torch.zeros(h, raw.shape[1], n_docs), torch.zeros(n_docs)
    add_doc_sums(raw.nan_to_num(neginf=0.0), key_doc, sums, counts)
    attended = torch.isfinite(raw).any(1)  # [head, T]
    means = sums / counts.clamp(min=1)
    seen = torch.zeros(h, n_docs, dtype=torch.bool)
    merge = attended & (key_doc >= 0)
    for head in range(h):
        seen[head, key_doc[merge[head]].unique()] = True
    return means.amax(1).masked_fill(~seen, float("-inf"))

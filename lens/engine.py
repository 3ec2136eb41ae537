"""Running the BlockSearch layout on a hooked decoder.

1. The instruction block is run once (causal).
2. Documents are prefilled block-sparsely in batches (each sees the instruction and itself);
   their per-layer keys and values go into a :class:`DocumentKVCache` keyed by model, layout
   and document content, so every query and every intervention reuses them.
3. A query block runs over the cached corpus through ``kernels.corpus_attention``, which also
   returns the per-document statistics the lens records.
4. Four digits are decoded greedily (over the ten digit tokens), reusing the query side's KV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kernels.block_prefill import block_prefill
from kernels.corpus_attention import CorpusAttentionResult, corpus_attention
from kernels.score_functions import Route, ScoreFunction, find_route
from lens.data.datasets import Dataset
from lens.data.layout import (
    LayoutConfig,
    PoolLayout,
    build_pool_layout,
    corpus_for_query,
    document_start,
    query_start,
)
from lens.errors import LensError
from lens.models.decoder import Decoder

CODE_DIGITS = 4


@dataclass
class DocumentKV:
    keys: Tensor  # [layer, kv_head, len, d_head], rotated
    values: Tensor  # [layer, kv_head, len, d_head]


class DocumentKVCache:
    """Per-document KV, keyed by (model, layout, document tokens, start position).  In memory."""

    def __init__(self):
        self._store: dict[str, DocumentKV] = {}

    @staticmethod
    def key(model_fingerprint: str, layout_fingerprint: str, tokens: list[int], start: int) -> str:
        h = hashlib.sha256(f"{model_fingerprint}|{layout_fingerprint}|{start}|".encode())
        h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str) -> DocumentKV | None:
        return self._store.get(key)

    def put(self, key: str, kv: DocumentKV) -> None:
        self._store[key] = kv

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class QueryRun:
    """One query over one corpus: decoded code and the per-layer record of the readout token."""

    query_id: str
    corpus: list[int]  # pool indices, in corpus order
    gold_positions: list[int]  # indices into corpus
    codes: list[str]  # code of each corpus document
    decoded: str  # greedy four digits
    digit_logprobs: Tensor  # [4, 10] log-probs over the ten digits at each decoding step
    readout_logits: Tensor  # [vocab] at the readout token (predicts the first digit)
    layers: list[CorpusAttentionResult] = field(default_factory=list)  # readout token only (Q=1)
    attn_out: Tensor | None = None  # [layer, d_model] attention block output at the readout token
    gold_attn_out: Tensor | None = None  # [layer, d_model] W_O applied to the gold part a^G
    resid_post: Tensor | None = None  # [layer, d_model] residual stream after each layer, readout token
    n_tokens: int = 0  # context length: instruction + documents + query block
    route_scores: Tensor | None = None  # [layer, 2, N] QK-MaxSim routing score per document (head max, head mean)
    routed: list[int] | None = None  # corpus positions kept by a route intervention (after its layer)

    @property
    def gold_codes(self) -> list[str]:
        return [self.codes[p] for p in self.gold_positions]

    @property
    def correct(self) -> bool:
        return self.decoded in self.gold_codes


@dataclass
class _QuerySide:
    """The query block's own keys and values per layer, grown by each decoded digit."""

    keys: list[Tensor]  # per layer [kv_head, S, d]
    values: list[Tensor]
    next_position: int
    route: Route | None = None
    keep_docs: Tensor | None = None  # bool [N], set at the route layer


class BlockSearchRunner:
    """Prefill a dataset's documents once; run any query at any N with any intervention."""

    def __init__(
        self,
        model: Decoder,
        dataset: Dataset,
        layout: LayoutConfig | None = None,
        seed: int = 0,
        cache: DocumentKVCache | None = None,
        batch_tokens: int = 8192,
        progress: bool = True,
    ):
        self.model, self.dataset, self.seed = model, dataset, seed
        self.layout = layout or LayoutConfig()
        self.pool: PoolLayout = build_pool_layout(dataset, model.tokenizer, self.layout)
        self.cache = cache if cache is not None else DocumentKVCache()
        self.batch_tokens, self.progress = batch_tokens, progress
        self.digit_ids = torch.tensor(
            [model.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)], dtype=torch.long
        )
        self._layout_fingerprint = self.layout.document_fingerprint()
        self._instruction = self._run_instruction()

    # ------------------------------------------------------------------------------ prefill
    @torch.no_grad()
    def _run_instruction(self) -> DocumentKV:
        ids = torch.tensor([self.pool.instruction_ids])
        keys, values = [], []

        def attend(layer, q, k, v):
            keys.append(k[0].transpose(0, 1))
            values.append(v[0].transpose(0, 1))
            mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()[None, None]
            return self.model.blocks[layer].attn.dense(q, k, v, mask)

        self.model.run_blocks(self.model.embed(ids), torch.arange(ids.shape[1])[None], attend)
        return DocumentKV(torch.stack(keys), torch.stack(values))

    def _doc_key(self, doc: int, start: int) -> str:
        return DocumentKVCache.key(
            self.model.fingerprint, self._layout_fingerprint, self.pool.doc_token_ids[doc], start
        )

    def _starts(self, corpus: list[int]) -> list[int]:
        starts, offset, n_inst = [], 0, len(self.pool.instruction_ids)
        for d in corpus:
            starts.append(document_start(self.layout, n_inst, offset))
            offset += len(self.pool.doc_token_ids[d])
        return starts

    @torch.no_grad()
    def prefill(self, corpus: list[int], starts: list[int] | None = None) -> None:
        """Make sure every document of ``corpus`` (pool indices) has its KV in the cache."""
        starts = starts if starts is not None else self._starts(corpus)
        todo = sorted(
            {(d, s) for d, s in zip(corpus, starts) if self._doc_key(d, s) not in self.cache},
            key=lambda ds: len(self.pool.doc_token_ids[ds[0]]),
        )
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="prefill documents", unit="doc", disable=not self.progress, leave=False)
        i = 0
        while i < len(todo):
            longest = len(self.pool.doc_token_ids[todo[i][0]])
            j = i + 1
            while j < len(todo) and (j - i + 1) * len(self.pool.doc_token_ids[todo[j][0]]) <= self.batch_tokens:
                j += 1
            self._prefill_batch(todo[i:j])
            bar.update(j - i)
            i = j
        bar.close()

    def _prefill_batch(self, batch: list[tuple[int, int]]) -> None:
        lengths = [len(self.pool.doc_token_ids[d]) for d, _ in batch]
        width = max(lengths)
        pad = self.model.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ((d, start), n) in enumerate(zip(batch, lengths)):
            ids[row, :n] = torch.tensor(self.pool.doc_token_ids[d])
            positions[row] = torch.arange(start, start + width)
        keys, values = [], []

        def attend(layer, q, k, v):
            keys.append(k)
            values.append(v)
            inst = self._instruction
            return block_prefill(q, k, v, inst.keys[layer], inst.values[layer])

        self.model.run_blocks(self.model.embed(ids), positions, attend)
        keys_all = torch.stack(keys, dim=1)  # [docs, layer, len, kv_head, d]
        values_all = torch.stack(values, dim=1)
        for row, ((d, start), n) in enumerate(zip(batch, lengths)):
            self.cache.put(
                self._doc_key(d, start),
                DocumentKV(
                    keys_all[row, :, :n].transpose(1, 2).contiguous(),
                    values_all[row, :, :n].transpose(1, 2).contiguous(),
                ),
            )

    # -------------------------------------------------------------------------------- query
    def corpus(self, query_id: str, n_docs: int) -> tuple[list[int], list[int]]:
        return corpus_for_query(self.dataset, query_id, n_docs, self.seed)

    def _corpus_kv(self, corpus: list[int], starts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Instruction + documents, concatenated: keys, values [layer, kv_head, T, d]; key_doc [T]."""
        docs = [self.cache.get(self._doc_key(d, s)) for d, s in zip(corpus, starts)]
        inst = self._instruction
        keys = torch.cat([inst.keys] + [kv.keys for kv in docs], dim=2)
        values = torch.cat([inst.values] + [kv.values for kv in docs], dim=2)
        key_doc = torch.cat(
            [torch.full((inst.keys.shape[2],), -1, dtype=torch.long)]
            + [torch.full((kv.keys.shape[2],), j, dtype=torch.long) for j, kv in enumerate(docs)]
        )
        return keys, values, key_doc

    @torch.no_grad()
    def run_query(
        self, query_id: str, n_docs: int, score_fn: ScoreFunction | None = None, record: bool = True
    ) -> QueryRun:
        """Run one query over its corpus of N documents and decode four digits."""
        corpus, gold_positions = self.corpus(query_id, n_docs)
        starts = self._starts(corpus)
        self.prefill(corpus, starts)
        keys, values, key_doc = self._corpus_kv(corpus, starts)
        query_ids = self.pool.query_token_ids(self.model.tokenizer, query_id)
        n_inst = len(self.pool.instruction_ids)
        longest = max(len(self.pool.doc_token_ids[d]) for d in corpus)
        q_start = query_start(self.layout, n_inst, keys.shape[2] - n_inst, longest)
        n_layers = self.model.cfg.n_layers
        route = find_route(score_fn)
        if route is not None and not 0 <= route.layer < n_layers - 1:
            raise LensError(f"route layer {route.layer}: must be 0..{n_layers - 2} for a {n_layers}-layer model")
        side = _QuerySide([None] * n_layers, [None] * n_layers, q_start, route)

        results: list[CorpusAttentionResult] = []
        hooks = {}
        if record:
            hooks = self._record_hooks()
        resid = self._step(torch.tensor(query_ids), side, keys, values, key_doc, len(corpus), score_fn,
                           gold_positions if record else None, results if record else None)
        for h in hooks.values():
            h.remove()
        logits = self.model.unembed(resid[:, -1:])[0, -1].float()
        readout_logits = logits
        digits, logprobs = [], []
        for step in range(CODE_DIGITS):
            digit_logp = torch.log_softmax(logits[self.digit_ids], dim=-1)
            digit = int(digit_logp.argmax())
            digits.append(digit)
            logprobs.append(digit_logp)
            if step < CODE_DIGITS - 1:
                resid = self._step(self.digit_ids[digit : digit + 1], side, keys, values, key_doc,
                                   len(corpus), score_fn, None, None)
                logits = self.model.unembed(resid[:, -1:])[0, -1].float()
        run = QueryRun(
            query_id=query_id,
            corpus=corpus,
            gold_positions=gold_positions,
            codes=[self.pool.codes[d] for d in corpus],
            decoded="".join(map(str, digits)),
            digit_logprobs=torch.stack(logprobs),
            readout_logits=readout_logits,
            layers=results,
            n_tokens=keys.shape[2] + len(query_ids),
            routed=side.keep_docs.nonzero().squeeze(1).tolist() if side.keep_docs is not None else None,
        )
        if record:
            run.attn_out = torch.stack(self._recorded["attn_out"])
            run.gold_attn_out = torch.stack(self._recorded["gold_attn_out"])
            run.resid_post = torch.stack(self._recorded["resid_post"])
            run.route_scores = torch.stack(self._recorded["route_scores"])
        return run

    def _record_hooks(self):
        self._recorded = {"attn_out": [], "gold_attn_out": [], "resid_post": [], "route_scores": []}
        handles = {}
        for block in self.model.blocks:
            handles[f"a{block.layer}"] = block.hook_attn_out.register_forward_hook(
                lambda mod, inp, out: self._recorded["attn_out"].append(out[0, -1].float())
            )
            handles[f"r{block.layer}"] = block.hook_resid_post.register_forward_hook(
                lambda mod, inp, out: self._recorded["resid_post"].append(out[0, -1].float())
            )
        return handles

    def _step(self, tokens, side, keys, values, key_doc, n_docs, score_fn, gold_positions, results):
        """Run query-side tokens [S_new] over the corpus, appending their KV to ``side``."""
        n_new = tokens.shape[0]
        positions = torch.arange(side.next_position, side.next_position + n_new)[None]
        side.next_position += n_new

        def attend(layer, q, k, v):
            k_new, v_new = k[0].transpose(0, 1), v[0].transpose(0, 1)
            if side.keys[layer] is None:
                side.keys[layer], side.values[layer] = k_new, v_new
            else:
                side.keys[layer] = torch.cat([side.keys[layer], k_new], dim=1)
                side.values[layer] = torch.cat([side.values[layer], v_new], dim=1)
            attn = self.model.blocks[layer].attn
            route = side.route
            deciding = route is not None and layer == route.layer and side.keep_docs is None
            res = corpus_attention(
                q[0].transpose(0, 1), keys[layer], values[layer], key_doc, n_docs,
                side.keys[layer], side.values[layer], layer=layer, scale=attn.scale,
                score_fn=score_fn, gold_docs=gold_positions, stats=results is not None,
                keep_docs=side.keep_docs if route is not None and layer > route.layer else None,
                route_stats=results is not None or deciding,
            )
            if deciding:
                top = route.scores(res.route_max).topk(min(route.B, n_docs)).indices
                side.keep_docs = torch.zeros(n_docs, dtype=torch.bool)
                side.keep_docs[top] = True
            if results is not None:
                per_head = res.route_max.amax(dim=1)  # max over query tokens -> [head, N]
                self._recorded["route_scores"].append(torch.stack([per_head.amax(0), per_head.mean(0)]))
                results.append(_readout_only(res))
                gold = res.gold_output[-1:] if res.gold_output is not None else torch.zeros_like(res.output[-1:])
                self._recorded["gold_attn_out"].append(attn.o_proj(gold.reshape(1, -1).to(q.dtype))[0].float())
            return res.output[None]

        return self.model.run_blocks(self.model.embed(tokens[None]), positions, attend)


def _readout_only(res: CorpusAttentionResult) -> CorpusAttentionResult:
    """Keep the last query token's statistics (the readout token predicting the first digit)."""
    return CorpusAttentionResult(
        output=res.output[-1:],
        lse=res.lse[:, -1:],
        doc_max=res.doc_max[:, -1:] if res.doc_max is not None else None,
        doc_lse=res.doc_lse[:, -1:] if res.doc_lse is not None else None,
        gold_output=res.gold_output[-1:] if res.gold_output is not None else None,
    )


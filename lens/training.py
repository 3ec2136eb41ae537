"""Training a BlockSearch-style retriever through the inference code path.

:func:`layout_digit_logits` runs one example exactly as the engine does at inference (the
instruction block, block-sparse document prefill with ``kernels.block_prefill``, the query pass
with ``kernels.corpus_attention``), but with gradients, the four code digits teacher-forced.
LoRA adapters (peft) are the trained parameters; :func:`merge_lora` folds a saved adapter into a
loaded decoder (how ``blocksearch-135m`` is registered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.block_prefill import block_prefill
from kernels.masks import and_masks, causal, create_mask, same_segment
from kernels.corpus_attention import corpus_attention
from kernels.score_functions import ScoreFunction
from lens.runtime.prefill import padded_documents, prefill_batch, run_instruction
from lens.models.decoder import Decoder



@dataclass
class TrainingCorpus:
    """One corpus's prefilled states for the query passes: per layer the instruction's and the
    documents' keys and values in corpus order [kv_head, T, d], and each key's document (-1:
    the instruction)."""

    keys: list[Tensor]
    values: list[Tensor]
    key_doc: Tensor
    n_docs: int


def prefill_training_corpus(model: Decoder, instruction_ids: list[int], docs: list[list[int]],
                            checkpoint: bool = False) -> TrainingCorpus:
    """The instruction block and the block-sparse prefill of ``docs``, as the engine runs them,
    with gradients unless called under ``torch.no_grad()`` (a frozen adapter: the states can
    then serve the passes of several steps).  ``checkpoint`` recomputes each prefill layer in the
    backward pass instead of keeping its activations (corpora of 10K+ tokens)."""
    n_inst = len(instruction_ids)
    instruction = run_instruction(model, instruction_ids)
    pad_id = model.tokenizer.pad_token_id or 0
    if checkpoint and torch.is_grad_enabled():
        keys, values = _prefill_checkpointed(model, instruction, docs, [n_inst] * len(docs), pad_id)
    else:
        keys, values = prefill_batch(model, instruction, docs, [n_inst] * len(docs), pad_id, stack=False)
    lengths = [len(d) for d in docs]
    width = max(lengths)
    # one gather per layer (not one slice per document: each slice's backward is a full-size zero fill)
    real = torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)])

    def corpus(states: list[Tensor], prefix: list[Tensor], layer: int) -> Tensor:
        flat = states[layer].flatten(0, 1).index_select(0, real).transpose(0, 1)
        return torch.cat([prefix[layer], flat], 1)

    n_layers = model.cfg.n_layers
    return TrainingCorpus(
        keys=[corpus(keys, instruction.keys, l) for l in range(n_layers)],
        values=[corpus(values, instruction.values, l) for l in range(n_layers)],
        key_doc=torch.cat([torch.full((n_inst,), -1)] + [torch.full((n,), j) for j, n in enumerate(lengths)]),
        n_docs=len(docs),
    )


def gradient_leaves(c: TrainingCorpus, dtype: torch.dtype | None = None) -> TrainingCorpus:
    """``c``'s states as leaves that collect the query passes' gradient (for
    :func:`backward_through_prefill`), in ``dtype`` if given (bf16 halves a 1,000-document
    corpus's states and their gradient, ~4 GB each in fp32)."""
    leaf = lambda t: t.detach().to(dtype or t.dtype).requires_grad_()  # noqa: E731
    return TrainingCorpus([leaf(k) for k in c.keys], [leaf(v) for v in c.values], c.key_doc, c.n_docs)


def backward_through_prefill(model: Decoder, instruction_ids: list[int], docs: list[list[int]],
                             leaves: TrainingCorpus, chunk_tokens: int) -> None:
    """The prefill's half of a step's backward, a chunk of documents of at most ``chunk_tokens``
    tokens (or one document) at a time.

    The step prefilled ``docs`` without autograd, ran its passes on :func:`gradient_leaves` of
    those states and called ``backward()``: the leaves now hold the loss's gradient with respect
    to every key and value.  Each chunk's prefill is recomputed with autograd and that gradient
    sent through it.  Documents see only the instruction and themselves, so the chunks' gradients
    sum to the backward through the whole prefill, at the memory of one chunk's activations:
    corpora of 1,000 documents (85K tokens) train jointly with the adapter on a CPU."""
    n_inst = len(instruction_ids)
    bounds = [n_inst]
    for d in docs:
        bounds.append(bounds[-1] + len(d))
    chunks = [0]
    for j in range(1, len(docs) + 1):
        if j == len(docs) or bounds[j + 1] - bounds[chunks[-1]] > chunk_tokens:
            chunks.append(j)
    for start, stop in zip(chunks, chunks[1:]):
        part = prefill_training_corpus(model, instruction_ids, docs[start:stop])
        # the passes read the instruction's states too: their gradient goes through the first chunk only
        first, lo = (0, 0) if start == 0 else (n_inst, bounds[start])
        states = [t[:, first:] for t in (*part.keys, *part.values)]
        grads = [leaf.grad[:, lo:bounds[stop]].to(t.dtype) for leaf, t in zip((*leaves.keys, *leaves.values), states)]
        torch.autograd.backward(states, grads)


def layout_digit_logits(
    model: Decoder,
    instruction_ids: list[int],
    docs: list[list[int]] | None,
    passes: list[tuple[list[int], list[int]]],
    digit_ids: Tensor,
    query_offset: int = 4096,
    score_fn: ScoreFunction | None = None,
    mass_layer: int | None = None,
    ssmax: "LearnedSSMax | None" = None,
    checkpoint: bool = False,
    prefilled: TrainingCorpus | None = None,
) -> list[tuple[Tensor, Tensor | None]]:
    """Teacher-forced code digits for several queries over one corpus.

    The documents are prefilled once (block-sparse: they never see the query, so every query over
    the same corpus shares their states and their gradient), or given already prefilled
    (``prefilled``, from :func:`prefill_training_corpus`; ``docs`` is then unused); each pass
    ``(query_ids, code_digits)`` then runs the query block with the code's first three digits
    appended.  Returns, per pass, the digit logits [4, 10] at the four code positions and, if
    ``mass_layer`` is given, the readout token's log attention mass per document at that layer
    [head, N].

    ``ssmax`` (a :class:`LearnedSSMax`) scales the query rows' scores by s_L·log N at every layer,
    differentiably in s_L: the trained length-aware softmax (the same function as
    ``SSMax(s, n="docs")`` on the query side at inference)."""
    c = prefilled if prefilled is not None else prefill_training_corpus(model, instruction_ids, docs, checkpoint)
    corpus_k, corpus_v, key_doc, n_docs = c.keys, c.values, c.key_doc, c.n_docs
    # all passes in one right-padded batch (one read of every weight); padding comes after each
    # row's real tokens, so under the causal self-attention no real token sees it
    rows = [query_ids + [int(digit_ids[d]) for d in code_digits[:-1]] for query_ids, code_digits in passes]
    width_q = max(map(len, rows))
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.tensor([row + [pad] * (width_q - len(row)) for row in rows])
    positions = torch.arange(query_offset, query_offset + width_q).expand(len(rows), -1)
    readouts = [len(query_ids) - 1 for query_ids, _ in passes]
    log_mass: list[Tensor] = []

    n_rows = len(rows) * width_q
    block = torch.arange(n_rows) // width_q
    # corpus keys for every row; the query side block-diagonal (each pass its own) and causal
    self_mask = create_mask(and_masks(same_segment(block), causal), n_rows, n_rows)
    mask = torch.cat([torch.ones(n_rows, key_doc.shape[0], dtype=torch.bool), self_mask], 1)[None, None]

    def attend(layer, q, k, v):
        if ssmax is not None:
            q = q * ssmax.factor(layer, n_docs).to(q.dtype)
        if score_fn is not None or layer == mass_layer:
            return attend_each(layer, q, k, v)
        # every pass's rows in one attention over the corpus: the corpus keys and their gradient are
        # touched once per layer, not once per pass
        b, n_q, n_heads, d = q.shape
        n_kv = k.shape[2]
        qa = q.reshape(1, b * n_q, n_heads, d).transpose(1, 2)
        ka = torch.cat([corpus_k[layer], k.reshape(b * n_q, n_kv, d).transpose(0, 1).to(corpus_k[layer].dtype)], 1)
        va = torch.cat([corpus_v[layer], v.reshape(b * n_q, n_kv, d).transpose(0, 1).to(corpus_v[layer].dtype)], 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            qa.to(ka.dtype), ka[None], va[None], attn_mask=mask, scale=model.blocks[layer].attn.scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(b, n_q, n_heads, d).to(q.dtype)

    def attend_each(layer, q, k, v):
        """Pass by pass through the corpus kernel: score functions and the per-document mass."""
        outputs = []
        for b in range(q.shape[0]):
            res = corpus_attention(
                q[b].transpose(0, 1), corpus_k[layer], corpus_v[layer], key_doc, n_docs, k[b].transpose(0, 1),
                v[b].transpose(0, 1), layer=layer, scale=model.blocks[layer].attn.scale, score_fn=score_fn,
                stats=layer == mass_layer, stats_rows="all",
            )
            if layer == mass_layer:
                r = readouts[b]
                log_mass.append(res.doc_lse[:, r] - res.lse[:, r : r + 1])
            outputs.append(res.output)
        return torch.stack(outputs)

    resid = model.run_blocks(model.embed(tokens), positions, attend)
    index = torch.tensor(readouts)[:, None] + torch.arange(4)
    logits = model.unembed(resid[torch.arange(len(rows))[:, None], index])  # [pass, 4, vocab]
    return [(logits[b][:, digit_ids], log_mass[b] if log_mass else None) for b in range(len(rows))]


class LearnedSSMax(torch.nn.Module):
    """Scalable softmax with one learned s_L per layer: the query rows' scores are multiplied by
    s_L·log N (N: documents in the corpus).  Initialised to 1/log(init_n) at every layer, so at
    N = init_n it starts as the identity."""

    def __init__(self, n_layers: int, init_n: float):
        super().__init__()
        self.s = torch.nn.Parameter(torch.full((n_layers,), 1.0 / math.log(init_n)))

    def factor(self, layer: int, n_docs: int) -> Tensor:
        return self.s[layer] * math.log(n_docs)

    def score_function(self) -> ScoreFunction:
        from kernels.interventions import SSMax

        return SSMax(s=tuple(float(x) for x in self.s.detach()), n="docs")


def _prefill_checkpointed(model: Decoder, instruction, docs: list[list[int]], starts: list[int], pad_id: int):
    """``prefill_batch(..., stack=False)`` with each layer under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    ids, positions = padded_documents(docs, starts, pad_id)
    cos, sin = model.rotary(positions)

    def layer_fn(resid: Tensor, layer: int):
        kv = []

        def attend(l, q, k, v):
            kv.append((k, v))
            return block_prefill(q, k, v, instruction.keys[l], instruction.values[l])

        out = model.blocks[layer](resid, cos, sin, attend)
        return out, kv[0][0], kv[0][1]

    resid = model.embed(ids)
    keys, values = [], []
    for layer in range(model.cfg.n_layers):
        resid, k, v = checkpoint(layer_fn, resid, layer, use_reentrant=False)
        keys.append(k)
        values.append(v)
    return keys, values

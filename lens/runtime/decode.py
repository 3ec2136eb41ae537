"""Decoding four digits: greedy over the ten digit tokens or a beam over the corpus's codes, and
speculative drafts (codes verified in the query pass as extra rows of a tree, so a drafted step
costs no pass over the corpus)."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.masks import causal, create_mask
from lens.errors import LensError
from lens.runtime.records import CODE_DIGITS
from lens.runtime.stream import QueryStream


def check_drafts(streams: list[QueryStream], drafts: list[list[str] | None]) -> None:
    """Every draft checked before any stream changes."""
    if len(drafts) != len(streams):
        raise LensError(f"drafts: one list of codes per stream ({len(streams)}), got {len(drafts)}")
    for s, codes in zip(streams, drafts):
        for code in codes or []:
            if not (isinstance(code, str) and len(code) == CODE_DIGITS and code.isdigit()):
                raise LensError(f"draft {code!r} for {s.query_id}: expected a code of {CODE_DIGITS} digits")


def plant_drafts(s: QueryStream, codes: list[str]) -> None:
    """The trie of the drafted codes' first three digits: prefix -> row of the query pass."""
    prefixes = {tuple(int(c) for c in code[:j]) for code in codes for j in range(1, CODE_DIGITS)}
    s.drafted = {p: i for i, p in enumerate(sorted(prefixes, key=lambda p: (len(p), p)))}


def draft_rows(s: QueryStream, digit_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Tokens and positions of the query pass with drafts: the drafted digits first (each at
    the position it would have when decoded), the query's tokens last (the readout row stays
    the last row); and the self mask: the query causal, each drafted digit attending the
    query, its own earlier digits and itself."""
    nodes, n_q, m = list(s.drafted), len(s.query_ids), len(s.drafted)
    start = s.next_position
    tokens = torch.cat([digit_ids[[p[-1] for p in nodes]], torch.tensor(s.query_ids)])
    positions = torch.cat([torch.tensor([start + n_q + len(p) - 1 for p in nodes]), torch.arange(start, start + n_q)])
    mask = torch.zeros(m + n_q, m + n_q, dtype=torch.bool)
    mask[m:, m:] = create_mask(causal, n_q, n_q)
    mask[:m, m:] = True
    for i, p in enumerate(nodes):
        mask[i, [s.drafted[p[:j]] for j in range(1, len(p) + 1)]] = True
    s.self_mask = mask
    return tokens, positions


def leave_drafts(s: QueryStream) -> None:
    """A hypothesis whose next prefix was not drafted decodes on: its self KV becomes the
    query's rows and those of its (drafted) digits so far, in decoding order."""
    m = len(s.drafted)
    rows = list(range(m, m + len(s.query_ids))) + [s.drafted[tuple(s.digits[:j])] for j in range(1, len(s.digits))]
    index = torch.tensor(rows)
    s.self_k = [k.index_select(1, index) for k in s.self_k]
    s.self_v = [v.index_select(1, index) for v in s.self_v]
    s.drafted = s.draft_logits = None


def beam_step(
    hypotheses: list[QueryStream], digit_logits: list[Tensor], step: int, beam: int, codes: set[str]
) -> list[QueryStream]:
    """The ``beam`` most probable one-digit extensions of a root's hypotheses: over the ten
    digits (``beam=1``, greedy) or over the digits that continue one of the corpus's codes."""
    candidates = []
    for h, logits in zip(hypotheses, digit_logits):
        logp = torch.log_softmax(logits, dim=-1)
        prefix = "".join(map(str, h.digits))
        allowed = range(10) if beam == 1 else sorted({int(c[step]) for c in codes if c.startswith(prefix)})
        candidates += [(h.score + float(logp[d]), h, d, logp) for d in allowed]
    candidates.sort(key=lambda c: -c[0])
    chosen = [h.extend(d, logp) for _, h, d, logp in candidates[:beam]]
    for h in chosen:
        h.resid = h.rotary = None
    return chosen

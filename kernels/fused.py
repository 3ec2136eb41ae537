"""The fused path of corpus attention: streams whose score function only scales each query row
fold it into q, stack their rows, and go through one kernel call per chunk: the compiled kernel
(:mod:`kernels.native`, which also gives the readout rows' per-document statistics in the same
pass) or PyTorch's flash kernel (statistics in a second, shared pass)."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.native import decode_kernel, row_limit
from kernels.online_softmax import grouped_scores


def update_fused_streams(fused: list[tuple], keys: Tensor, values: Tensor) -> None:
    """One chunk for streams on the fused path (same scale): their rows stacked into one call of
    the compiled kernel (:mod:`kernels.native`), which also computes the readout rows'
    per-document statistics, gold output and raw routing scores in the same pass, and of
    PyTorch's flash kernel for the streams the compiled kernel does not take (its statistics then
    need a second pass)."""
    kv = keys.shape[0]
    kernel = _native_for(fused[0][0].q, keys, values)
    if kernel is not None:
        limit = row_limit(kernel)
        # fp32 queries over bf16 KV stay fp32 in the compiled kernel (it reads bf16 keys and values)
        rows = [s._grouped_q(s.q.dtype, kv, folded=False) for s, _ in fused]
        mine = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores or rows[i].shape[1] <= limit]
        if mine and _update_native(kernel, [fused[i] for i in mine], [rows[i] for i in mine], keys, values):
            fused = [f for i, f in enumerate(fused) if i not in mine]
    if not fused:
        return
    rows = [s._grouped_q(keys.dtype, kv) for s, _ in fused]  # the queries take the keys' dtype
    q = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
    sizes = [r.shape[1] for r in rows]
    scale = fused[0][0].scale
    out, lse = _flash(q, keys, values, scale)
    # the readout rows of the streams that keep statistics: one more shared pass over the keys
    lasts = [None] * len(fused)
    asking = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores]
    if asking:
        readout = torch.cat([fused[i][0].folded_q[:, -1:] for i in asking], 1)  # [head, streams, d]
        scores = grouped_scores(readout, keys, scale)  # [head, streams, C]
        for j, i in enumerate(asking):
            lasts[i] = scores[:, j : j + 1]
    for (s, kd), o, l, last in zip(fused, out.split(sizes, 1), lse.split(sizes, 1), lasts):
        s._merge_flash(o, l, keys, values, kd, last)


def _native_for(q: Tensor, keys: Tensor, values: Tensor):
    """The compiled kernel for these queries and keys when it applies here (fp32 or bf16 alike,
    or fp32 queries over bf16 KV: the fp32 build, which reads either; no autograd, a built head
    size, a build for this CPU), else None."""
    if keys.dtype not in (torch.float32, torch.bfloat16) or keys.dtype != values.dtype:
        return None
    if q.dtype != keys.dtype and not (q.dtype == torch.float32 and keys.dtype == torch.bfloat16):
        return None
    if keys.shape[-1] not in (32, 64, 128):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad):
        return None
    return decode_kernel(q.dtype)


def _update_native(kernel, fused, rows: list[Tensor], keys: Tensor, values: Tensor) -> bool:
    """The compiled kernel's pass over the streams' stacked rows (raw queries, each row's scaling
    applied in the kernel): statistics and routing scores (MaxSim and mean-key, from the raw
    scores) in the first asking stream's document numbering, handed to each stream in its own.
    False (nothing done) when a document's keys are not one run in the chunk, which the kernel's
    per-document statistics need."""
    kv = keys.shape[0]
    q = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
    sizes = [r.shape[1] for r in rows]
    asking = [i for i, (s, _) in enumerate(fused) if s.wants_readout_scores]
    routing = [i for i, (s, _) in enumerate(fused) if s.route_max is not None and s.raw_routable]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    empty = torch.empty(0, dtype=torch.long)
    # the document ids always go in: they place the kernel's parts, so a row's summation order is
    # the same whether or not other rows keep statistics
    first = (asking + routing + [0])[0]
    base = fused[first][1].long().contiguous()
    n_docs = fused[first][0].n_docs if asking or routing else 0  # the base numbering's size
    stat_rows, gold_rows, to_base, route_rows, route_group = [], [], {}, [], []
    for i in sorted(set(asking + routing)):
        s, kd = fused[i]
        same = kd is fused[first][1] and s.n_docs == n_docs  # streams of other corpora (other N) share chunks too
        to_base[i] = None if same else _to_base(base, kd, s.n_docs, n_docs)
    for i in asking:
        s, kd = fused[i]
        n_heads, n_q, _ = s.q.shape
        rep = n_heads // kv
        stat_rows += [offsets[i] + e * n_q + n_q - 1 for e in range(rep)]  # head g*rep+e's readout row
        gold = torch.zeros(n_docs, dtype=torch.bool)
        if s.keeps_gold:
            own = torch.zeros(s.n_docs + 1, dtype=torch.bool)
            own[s.gold] = True
            gold = own[:n_docs] if to_base[i] is None else own[_inverse(to_base[i], s.n_docs, n_docs)]
        gold_rows += [gold] * rep
    for j, i in enumerate(routing):  # group j * rep + e: head g*rep+e of routing stream j
        s = fused[i][0]
        n_heads, n_q, _ = s.q.shape
        rep = n_heads // kv
        own = range(n_q)[s.route_rows]
        for e in range(rep):
            route_rows += [offsets[i] + e * n_q + r for r in own]
            route_group += [j * rep + e] * len(own)
    gold_mask = torch.stack(gold_rows) if asking and any(bool(g.any()) for g in gold_rows) else empty
    row_scale = torch.cat([s.grouped_row_scale(kv) for s, _ in fused], 1).contiguous()
    try:
        out, lse, doc_max, doc_lse, gold_out, route_max, route_sum, route_lo = kernel.decode_attention(
            q.contiguous(), _rows_contiguous(keys), _rows_contiguous(values), float(fused[0][0].scale), base, n_docs,
            torch.tensor(stat_rows, dtype=torch.long), gold_mask, row_scale,
            torch.tensor(route_rows, dtype=torch.long), torch.tensor(route_group, dtype=torch.long))
    except RuntimeError as e:  # checked before any work: scattered documents -> the flash path
        if "not one run" in str(e):
            return False
        raise

    def own_numbering(i: int, x: Tensor) -> Tensor:  # base numbering -> stream i's (absent documents: -inf)
        if to_base[i] is None:
            return x
        return torch.cat([x, torch.full((*x.shape[:-1], 1), float("-inf"))], -1)[..., to_base[i]]

    stats, routes, start = {}, {}, 0
    for i in asking:
        rep = fused[i][0].q.shape[0] // kv
        part = slice(start, start + rep)
        start += rep
        shape = (kv * rep, 1, -1)
        stats[i] = (own_numbering(i, doc_max[:, part].reshape(shape)), own_numbering(i, doc_lse[:, part].reshape(shape)),
                    gold_out[:, part].reshape(shape))
    if routing:  # the chunk's documents lo..lo+width-1 in the base numbering
        lo, width = int(route_lo), route_max.shape[-1]
        counts = torch.bincount(base[base >= 0] - lo, minlength=width).float()
        start = 0
        for j, i in enumerate(routing):
            s = fused[i][0]
            rep, n_route = s.q.shape[0] // kv, len(range(s.q.shape[1])[s.route_rows])
            mx = route_max[:, j * rep : (j + 1) * rep].reshape(kv * rep, width)
            sm = route_sum[:, start : start + rep * n_route].reshape(kv * rep, n_route, width)
            start += rep * n_route
            if to_base[i] is None:
                routes[i] = (slice(lo, lo + width), mx, sm, counts)
                continue
            own = _inverse(to_base[i], s.n_docs, n_docs)[lo : lo + width]  # each base document's own index
            keep = (own < s.n_docs).nonzero().squeeze(1)
            routes[i] = (own[keep], mx[:, keep], sm[..., keep], counts[keep])
    for i, ((s, kd), o, ls) in enumerate(zip(fused, out.split(sizes, 1), lse.split(sizes, 1))):
        s._merge_flash(o, ls, keys, values, kd, chunk_stats=stats.get(i), chunk_route=routes.get(i))
    return True


def _to_base(base: Tensor, own: Tensor, n_own: int, n_base: int) -> Tensor:
    """For each of a stream's ``n_own`` documents, its index in the base numbering (``n_base``
    when the chunk does not hold it): the two numberings label the same keys."""
    index = torch.full((n_own,), n_base, dtype=torch.long)
    mask = base >= 0
    index[own[mask]] = base[mask]
    return index


def _inverse(to_base: Tensor, n_own: int, n_base: int) -> Tensor:
    """For each base document, the stream's own index (``n_own`` when not in the chunk)."""
    inverse = torch.full((n_base + 1,), n_own, dtype=torch.long)
    inverse[to_base] = torch.arange(n_own)
    return inverse[:n_base]


def _rows_contiguous(x: Tensor) -> Tensor:
    """[kv_head, C, d] with each key's d values contiguous and rows adjacent (a chunk slice is)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def _flash(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU flash attention, no mask: q [kv_head, rows, d] over keys/values
    [kv_head, C, d] -> (out [kv_head, rows, d], lse [kv_head, rows])."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], keys[None], values[None], 0.0, False, scale=scale)[:2]
    return out[0], lse[0]



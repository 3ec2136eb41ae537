"""Maximum corpus size on this box: a sweep over ~1M tokens of SmolLM2 with bounded memory.

10,000 LIMIT-style documents (~100 tokens each) are prefilled once (bf16) into the disk KV cache
(resumable; a second run reuses and re-verifies it), then K queries x N x interventions run
together layer-major, each layer's KV read from disk once for all streams.  Prints tokens, wall
times, peak RSS (ru_maxrss of this process: it counts the pages of the memory-mapped cache that
were read, which belong to the page cache and are evicted under memory pressure) and the
process's own (anonymous) memory.

    .venv/bin/python experiments/bench_scale.py --docs 10000 --items 28 --queries 4 --n 1000,10000
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def memory_text() -> str:
    """Peak RSS, and where Linux reports it, the anonymous part of the RSS now (the process's own
    memory, without the mapped KV cache's page-cache pages)."""
    text = f"peak RSS {peak_rss_gb():.2f} GB (mapped KV cache pages included)"
    status = Path("/proc/self/status")
    anon = [line.split()[1] for line in status.read_text().splitlines() if line.startswith("RssAnon:")] if status.exists() else []
    return text + (f", anonymous memory now {int(anon[0]) / 1024**2:.2f} GB" if anon else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--items", type=int, default=28)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--n", default="1000,10000")
    parser.add_argument("--intervention", action="append", default=None)
    parser.add_argument("--kv-folder", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bf16 only where the CPU multiplies it natively (lens info)")
    args = parser.parse_args()

    from kernels.spec import parse_intervention
    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    t0 = time.time()
    from lens.backend import resolve_dtype, stamp

    dtype = resolve_dtype(args.dtype)
    print(stamp(dtype))
    model = load_model(args.model, dtype=dtype)
    data = limit_dataset(n_docs=args.docs, items_per_doc=args.items, n_queries=max(args.queries, 1), seed=0)
    runner = BlockSearchRunner(model, data, kv="disk", kv_folder=args.kv_folder)
    pool_tokens = runner.source.n_tokens
    kv_gb = runner.source._layer_bytes() * model.cfg.n_layers / 1e9
    t_cache = time.time() - t0
    print(f"pool: {args.docs} documents, {pool_tokens} tokens, KV cache {kv_gb:.1f} GB on disk at {runner.source.root}")
    print(f"cache ready (build or verify) in {t_cache:.0f}s; {memory_text()}")

    sizes = [int(x) for x in args.n.split(",")]
    specs = args.intervention or ["none", "ssmax:s=0.43", "route:layer=16,B=256"]
    streams = [
        runner.stream(q.id, n, parse_intervention(spec))
        for n in sizes for spec in specs for q in data.queries[: args.queries]
    ]
    t1 = time.time()
    runs = runner.run_streams(streams, desc=f"{len(streams)} streams, layer-major")
    t_sweep = time.time() - t1
    for n in sizes:
        for spec in specs:
            sel = [r for r in runs if r.n_docs == n and r.intervention == parse_intervention(spec).spec()]
            hits = sum(r.correct for r in sel)
            print(f"N={n:<6} {spec:<22} tokens/query {sel[0].n_tokens:>8}  hit@1 {hits}/{len(sel)}")
    print(f"sweep: {len(streams)} streams (largest context {max(r.n_tokens for r in runs)} tokens) in {t_sweep:.0f}s")
    print(f"total wall {time.time() - t0:.0f}s; {memory_text()}")


if __name__ == "__main__":
    main()

"""Sweep throughput: one sweep unit's query work (the queries of a batch under every intervention
at one N, the documents already prefilled), with the dense layers of all its streams batched
(what ``lens sweep`` does) against each stream running its own, timed in turns in one run;
queries x cells per minute and where the time goes.

    .venv/bin/python experiments/bench_sweep.py --n 16,64 --queries 16
"""

from __future__ import annotations

import argparse
import time

import torch

from lens.runtime.timing import Breakdown
from lens.backend import resolve_dtype, stamp

SPECS = ("none", "ssmax:s=0.43", "route:layer=16,B=8", "ssmax:s=0.43+route:layer=16,B=8")


def main() -> None:
    from kernels.spec import parse_intervention
    from lens.data.datasets import load_dataset
    from lens.models.registry import load_model
    from lens.runtime import BlockSearchRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="blocksearch-135m")
    parser.add_argument("--dataset", default="limit-pairs:docs=256,core=16")
    parser.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--kv", default="memory", choices=["memory", "disk"],
                        help="the KV source (disk: the shared distractors read once per layer for every stream)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype = resolve_dtype(args.dtype)
    print(stamp(dtype))
    model = load_model(args.model, dtype=dtype)
    data = load_dataset(args.dataset)
    runner = BlockSearchRunner(model, data, progress=False, kv=args.kv)
    queries = [q.id for q in data.queries[: args.queries]]
    fns = [parse_intervention(s) for s in SPECS]
    t0 = time.perf_counter()
    for n in args.n:
        for q in queries:
            runner.prefill(runner.corpus(q, n)[0])
    print(f"== {args.model} on {args.dataset}, {args.kv} KV: {len(queries)} queries x {len(SPECS)} interventions per unit "
          f"({', '.join(SPECS)}), beam 2; prefill (once, untimed): {time.perf_counter() - t0:.0f}s")
    breakdown = Breakdown(runner)
    for n in args.n:
        times = {False: [], True: []}
        spent = {False: dict.fromkeys(breakdown.spent, 0.0), True: dict.fromkeys(breakdown.spent, 0.0)}
        codes = {}
        for rep in range(args.repeats + 1):  # the first turn warms up, untimed
            for batched in (False, True):
                runner.batch_dense = batched
                streams = [runner.stream(q, n, fn) for fn in fns for q in queries]
                breakdown.reset()
                t1 = time.perf_counter()
                runs = runner.run_streams(streams, beam=2)
                el = time.perf_counter() - t1
                codes[batched] = [r.ranked_codes for r in runs]
                if rep:
                    times[batched].append(el)
                    for k, v in breakdown.spent.items():
                        spent[batched][k] += v
        cells = len(queries) * len(SPECS)
        for batched in (False, True):
            t = sum(times[batched]) / len(times[batched])
            label = "dense layers batched" if batched else "each stream its own"
            print(f"N={n:<5} ({runs[0].n_tokens} tokens) {label:<22} {t:6.1f} s per unit = "
                  f"{cells / t * 60:6.0f} queries x cells per minute; "
                  f"{Breakdown.text(spent[batched], sum(times[batched]))}")
        ratio = sum(times[False]) / sum(times[True])
        same = sum(a == b for a, b in zip(codes[False], codes[True]))
        print(f"    batched is {ratio:.2f}x the speed; ranked codes equal in {same} of {cells} runs")


if __name__ == "__main__":
    main()

"""Document-prefill throughput: lens's block-sparse prefill vs a plain transformers forward.

Both run the same documents in bf16 (AMX on these CPUs) in the same process, alternating,
best of ``--repeats``.  lens does more than the baseline (every document also attends to the
instruction block, and its per-layer KV is stored in the document cache); the baseline is
``model.model`` (no LM head) on the same right-padded batches with SDPA.

    .venv/bin/python experiments/bench_prefill.py --docs 64 --items 20 --repeats 3

``--sizes 1024,2048,8192`` instead times lens alone per size of its fixed prefill batches: the
whole pool, and a first query's prefill at each ``--first-n`` (which also prefills the rest of
the batches its documents fall in), on an empty cache each time, sizes in turns.

    .venv/bin/python experiments/bench_prefill.py --docs 256 --sizes 1024,2048,4096,8192
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--items", type=int, default=20, help="items per LIMIT-style document")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bf16 only where the CPU multiplies it natively (lens info)")
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes (tokens): time lens alone")
    parser.add_argument("--first-n", default="16,64", help="with --sizes: corpus sizes of the first query")
    args = parser.parse_args()
    if args.sizes:
        return batch_sizes(args)

    from transformers import AutoModelForCausalLM

    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model, smollm2_folder

    from lens.backend import resolve_dtype, stamp

    dtype = resolve_dtype(args.dtype)
    print(stamp(dtype))
    torch.set_grad_enabled(False)
    model = load_model(args.model, dtype=dtype)
    dataset = limit_dataset(n_docs=args.docs, items_per_doc=args.items, n_queries=1, seed=0)
    runner = BlockSearchRunner(model, dataset, batch_tokens=args.batch_tokens, progress=False)
    docs = list(range(args.docs))
    n_tokens = sum(len(runner.pool.doc_token_ids[d]) for d in docs)

    folder = smollm2_folder() if args.model == "smollm2-135m" else args.model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
    # The same batches lens forms (its fixed batches: runs of the pool's storage order, up to
    # batch_tokens padded tokens each).
    batches = runner.source.batches
    hf_inputs = []
    for batch in batches:
        width = max(len(runner.pool.doc_token_ids[d]) for d in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, d in enumerate(batch):
            toks = runner.pool.doc_token_ids[d]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        hf_inputs.append((ids, mask))

    def run_lens():
        runner.source.clear()
        runner.prefill(docs)

    def run_hf():
        for ids, mask in hf_inputs:
            hf.model(input_ids=ids, attention_mask=mask, use_cache=False)

    run_lens(), run_hf()  # warm-up
    times = {"lens": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("lens", run_lens), ("transformers", run_hf)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"model {args.model} {args.dtype}, {args.docs} documents, {n_tokens} document tokens, "
          f"{len(batches)} batches, threads {torch.get_num_threads()}")
    for name, t in best.items():
        print(f"{name:<13} {n_tokens / t:10.0f} tok/s  (best of {args.repeats}: {t:.3f}s)")
    print(f"ratio lens / transformers: {best['transformers'] / best['lens']:.2f}x")


def batch_sizes(args) -> None:
    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    from lens.backend import resolve_dtype, stamp

    print(stamp(resolve_dtype(args.dtype)))
    model = load_model(args.model, dtype=resolve_dtype(args.dtype))
    dataset = limit_dataset(n_docs=args.docs, items_per_doc=args.items, n_queries=8, seed=0)
    sizes = [int(x) for x in args.sizes.split(",")]
    first_n = [int(x) for x in args.first_n.split(",")]
    runners = {b: BlockSearchRunner(model, dataset, batch_tokens=b, progress=False) for b in sizes}
    times: dict = {(b, what): [] for b in sizes for what in ["pool", *first_n]}
    docs: dict = {}
    for _ in range(args.repeats):
        for b, runner in runners.items():
            for what in ["pool", *first_n]:
                runner.source.clear()
                corpus = list(range(args.docs)) if what == "pool" else runner.corpus(dataset.queries[0].id, what)[0]
                t0 = time.perf_counter()
                runner.prefill(corpus)
                times[b, what].append(time.perf_counter() - t0)
                docs[b, what] = len(runner.source)
    print(f"model {args.model} {args.dtype}, pool of {args.docs} documents, threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    for b in sizes:
        cells = [f"{'pool' if w == 'pool' else f'first query N={w}'}: {min(times[b, w]):.2f}s ({docs[b, w]} docs)"
                 for w in ["pool", *first_n]]
        print(f"batch_tokens {b:>5} ({len(runners[b].source.batches):>3} batches)  " + "   ".join(cells))


if __name__ == "__main__":
    main()

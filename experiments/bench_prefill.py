"""Document-prefill throughput: lens's block-sparse prefill vs a plain transformers forward.

Both run the same documents in bf16 (AMX on these CPUs) in the same process, alternating,
best of ``--repeats``.  lens does more than the baseline (every document also attends to the
instruction block, and its per-layer KV is stored in the document cache); the baseline is
``model.model`` (no LM head) on the same right-padded batches with SDPA.

    .venv/bin/python experiments/bench_prefill.py --docs 64 --items 20 --repeats 3
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
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from lens.data.datasets import limit_dataset
    from lens.engine import BlockSearchRunner
    from lens.models.registry import load_model, smollm2_folder

    dtype = getattr(torch, args.dtype)
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


if __name__ == "__main__":
    main()

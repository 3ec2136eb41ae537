"""Train BlockSearch-135M: LoRA adapters that make a base model an in-context retriever.

Each step is one corpus in the exact inference layout (instruction, N documents with fresh
random unique four-digit codes) and several queries over it, run through the same code as
inference (block-sparse prefill + corpus attention, lens.training).  The documents never see
the query, so one prefill (and its backward) serves all the step's queries.  Loss: minus the log
probability of decoding a relevant document's four digits (summed over the relevant documents:
LIMIT queries have two), optionally plus a BlockRank-style InfoNCE on the readout token's
per-document attention mass at one layer (--aux-layer).  Data: seeded LIMIT-style corpora (the
other documents are hard negatives: they share many items) and key-value needles, from seeds
>= 1,000,000 (evaluation uses small seeds), or a BEIR folder (--beir).  Mixed N (--n-docs).
Codes sit at the end of each document by default (--code-position; the README says why).
bf16 autocast on CPU; progress bar; a checkpoint every --save-every steps; rerunning the same
command resumes.

    .venv/bin/python experiments/train_blocksearch.py --out lens/adapters/blocksearch-135m
    make train
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

TRAIN_SEED_BASE = 1_000_000  # training corpora use seeds >= this; evaluation uses small seeds


def sample_example(rng: random.Random, step: int, args, tokenizer, layout, beir=None) -> dict:
    """One training corpus and several queries over it.

    LIMIT-style: a fresh corpus of N documents whose every query has two relevant documents in it
    (the others are hard negatives sharing many items); needles: N key-value documents, one
    relevant each; BEIR (``beir``): the judged documents of a few queries plus random others.
    Codes are fresh, random and unique per corpus."""
    from lens.data.datasets import limit_dataset, needle_dataset

    n_docs = rng.choice(args.n_docs)
    seed = TRAIN_SEED_BASE + step
    if beir is not None:
        kind = "beir"
        picked = rng.sample(beir.queries, min(args.queries, len(beir.queries)))
        chosen: list[int] = []  # pool indices
        for q in picked:
            chosen += [d for d in beir.gold(q.id) if d not in chosen]
        taken = set(chosen)
        others = [i for i in range(len(beir.documents)) if i not in taken]
        chosen = chosen[:n_docs] + rng.sample(others, max(0, n_docs - len(chosen)))
        doc_texts = [beir.documents[d].text for d in chosen]
        asked = [(q.text, [chosen.index(d) for d in beir.gold(q.id) if d in chosen]) for q in picked]
    else:
        kind = "needle" if rng.random() < args.needle_fraction else "limit"
        if kind == "limit":
            items = rng.choice(args.items)
            # at most half the item slots go to query items: the generator's random pairing can run
            # out of open documents near full capacity (4 documents x 8 items x 16 queries did)
            data = limit_dataset(n_docs=n_docs, items_per_doc=items, n_queries=min(args.queries, n_docs * items // 4),
                                 seed=seed)
        else:
            data = needle_dataset(n_docs=n_docs, n_queries=min(args.queries, n_docs), seed=seed)
        doc_texts = [d.text for d in data.documents]
        asked = [(q.text, data.gold(q.id)) for q in data.queries]
    order = list(range(len(doc_texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    codes = [f"{c:04d}" for c in rng.sample(range(10_000), len(order))]
    texts = [layout.document_template.format(code=code, title="", text=doc_texts[old])
             for old, code in zip(order, codes)]
    docs = tokenizer(texts, add_special_tokens=False).input_ids
    docs = [d[: layout.max_doc_tokens] for d in docs]
    queries = []
    for text, golds in asked:
        if not golds:
            continue
        ids = tokenizer(layout.query_template.format(query=text), add_special_tokens=False).input_ids
        gold_rows = [where[g] for g in golds]
        queries.append(dict(ids=ids, gold=gold_rows, codes=[[int(c) for c in codes[g]] for g in gold_rows]))
    return dict(docs=docs, queries=queries, kind=kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--out", default="lens/adapters/blocksearch-135m")
    parser.add_argument("--checkpoints", default=None, help="default: $LENS_CACHE/train/<out name>")
    parser.add_argument("--steps", type=int, default=380)
    parser.add_argument("--n-docs", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8, 16, 16])
    parser.add_argument("--items", type=lambda s: [int(x) for x in s.split(",")], default=[8, 12, 16, 20])
    parser.add_argument("--needle-fraction", type=float, default=0.15)
    parser.add_argument("--code-position", default="end", choices=["start", "end"],
                        help="where the code sits in a document (README: code-first did not learn in budget)")
    parser.add_argument("--queries", type=int, default=16,
                        help="queries per corpus (they share its prefill; LIMIT: at most N x items / 4)")
    parser.add_argument("--beir", default=None, help="train on this BEIR folder instead of the generators")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--aux-layer", type=int, default=None, help="BlockRank InfoNCE on attention mass at this layer")
    parser.add_argument("--aux-weight", type=float, default=0.1)
    parser.add_argument("--aux-tau", type=float, default=1.0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from lens.data.layout import LayoutConfig
    from lens.models.registry import load_model
    from lens.paths import cache_dir
    from lens.training import LORA_TARGETS, add_lora, layout_digit_logits, lora_state

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoints) if args.checkpoints else cache_dir() / "train" / out.name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.base, dtype=torch.float32)
    params = add_lora(model, args.rank, args.alpha)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.05, 1 - s / args.steps))
    layout = LayoutConfig(code_position=args.code_position)
    tok = model.tokenizer
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    instruction_ids = tok(layout.instruction, add_special_tokens=False).input_ids
    config = {k: v for k, v in vars(args).items() if k not in ("checkpoints", "threads")}
    log_path = ckpt_dir / "loss_log.jsonl"
    step = 0
    ckpt = ckpt_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != config:
            raise SystemExit(f"{ckpt} was made with other arguments; delete {ckpt_dir} or use the same arguments")
        model.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        print(f"resuming at step {step}")
    beir = None
    if args.beir:
        from lens.data.datasets import load_beir
        beir = load_beir(args.beir, drop_unjudged=True)
    model.train()
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    while step < args.steps:
        rng = random.Random(f"{args.seed}:{step}")
        ex = sample_example(rng, step, args, tok, layout, beir)
        passes = [(q["ids"], code) for q in ex["queries"] for code in q["codes"]]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = layout_digit_logits(model, instruction_ids, ex["docs"], passes, digit_ids,
                                          query_offset=layout.query_offset, mass_layer=args.aux_layer)
        # loss: -log of the probability of decoding any relevant document's code (marginal over golds)
        losses, auxes, first_right, all_right = [], [], 0, 0
        i = 0
        for q in ex["queries"]:
            code_lp, hit = [], False
            for j, code in enumerate(q["codes"]):
                logits, log_mass = outputs[i]
                i += 1
                logp = torch.log_softmax(logits.float(), -1)
                code_lp.append(logp[torch.arange(4), torch.tensor(code)].sum())
                hit |= bool((logits.argmax(-1) == torch.tensor(code)).all())
                if log_mass is not None and j == 0:  # the readout token precedes the code: same for every gold
                    # InfoNCE over documents with logits log(sum over heads of mass) / tau: at tau 1,
                    # minus the log of the gold documents' share of the mass the documents get
                    # (raw mass is ~1e-3 per document here, too flat to be a logit itself)
                    log_doc_mass = torch.logsumexp(log_mass.float(), 0)
                    auxes.append(-torch.log_softmax(log_doc_mass / args.aux_tau, -1)[q["gold"]].logsumexp(0))
            losses.append(-torch.logsumexp(torch.stack(code_lp), 0))
            first_right += int(logits.argmax(-1)[0].item() in {c[0] for c in q["codes"]})
            all_right += int(hit)
        loss = torch.stack(losses).mean()
        aux = torch.stack(auxes).mean() if auxes else torch.tensor(0.0)
        total = loss + args.aux_weight * aux
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        with log_path.open("a") as f:
            f.write(json.dumps(dict(step=step, loss=loss.item(), aux=aux.item(), queries=len(losses),
                                    first_digit_right=first_right, code_right=all_right, kind=ex["kind"],
                                    n_docs=len(ex["docs"]), lr=schedule.get_last_lr()[0],
                                    elapsed_s=round(time.time() - t0, 1))) + "\n")
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(dict(config=config, lora=lora_state(model), optimizer=optimizer.state_dict(),
                            schedule=schedule.state_dict(), step=step), tmp)
            os.replace(tmp, ckpt)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in lora_state(model).items()}, out / "adapter.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(dict(
        base=args.base, r=args.rank, lora_alpha=args.alpha, target_modules=LORA_TARGETS, training=config,
        layout=dict(code_position=args.code_position),
        wall_seconds_this_run=round(time.time() - t0),
    ), indent=1))
    (out / "loss_log.jsonl").write_text(log_path.read_text())
    print(f"adapter written to {out} ({(out / 'adapter.safetensors').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

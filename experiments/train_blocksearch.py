"""Train BlockSearch-135M: LoRA adapters that make a base model an in-context retriever.

Each step is one corpus in the exact inference layout (instruction, N documents with fresh
random unique four-digit codes) and several queries over it, run through the same code as
inference (block-sparse prefill + corpus attention, lens.training).  The documents never see
the query, so one prefill (and its backward) serves all the step's queries.  Loss (--loss):
``marginal``, minus the log probability of decoding any relevant document's four digits (LIMIT
queries have two: their probabilities summed), or ``each``, the mean over the relevant documents
of minus the log probability of decoding that one (which Recall@k, asking for every relevant
document in the top k, rewards: the optimum splits the mass evenly), optionally plus a BlockRank-style InfoNCE on the readout token's
per-document attention mass at one layer (--aux-layer).  Data (--mix): LIMIT's pairs design
from the training half of the vocabulary (every other document a hard negative), the
synthetic-limit generator and key-value needles, from seeds >= 1,000,000 (evaluation uses small
seeds and the evaluation half of the vocabulary), or a BEIR folder (--beir).  Mixed N
(--n-docs), and ``pairs-large``: LIMIT's large-corpus design, the pairs of --large-core documents
among others up to --large-n-docs, so the softmax meets hundreds of documents at the memory of a
64-document pairs corpus.  --ssmax trains one length-aware softmax scale s_L per layer with the adapter;
with --freeze-lora it trains the s_L alone on a trained adapter: the documents' states then carry no
gradient, so their prefill runs once per corpus and serves --corpus-steps steps (different queries
each), which brings corpora of 1,000+ documents within a CPU's reach.
Codes sit at the end of each document by default (--code-position; docs/training.md says why).
bf16 autocast where the CPU multiplies bf16 natively (--dtype); progress bar; a checkpoint
every --save-every steps; rerunning the same command resumes.

    make train         # blocksearch-135m (recipe v2, from the v1 adapter)
    make train-ssmax   # blocksearch-135m-ssmax
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

TRAIN_SEED_BASE = 1_000_000  # training corpora use seeds >= this; evaluation uses small seeds


def sample_example(rng: random.Random, step: int, args, tokenizer, layout, beir=None, n_queries=None) -> dict:
    """One training corpus and several queries over it.

    ``pairs`` (LIMIT's design, lens.data.datasets.limit_pairs_dataset on the training half of the
    vocabulary): every pair of the N documents shares one item nobody else likes, each document
    carries N-1 items and the queries name pair items (two relevant documents); ``pairs-large``:
    the same over --large-core documents among N from --large-n-docs (the others like core-1
    items nobody is asked about); ``limit``: the
    synthetic-limit generator (items per document from --items, hard negatives sharing filler
    items); ``needle``: N key-value documents, one relevant each; BEIR (``beir``): the judged
    documents of a few queries plus random others.  Codes are fresh, random and unique per corpus.
    ``n_queries``: at most this many queries (default --queries)."""
    from lens.data.datasets import limit_dataset, limit_pairs_dataset, needle_dataset

    n_q = n_queries or args.queries

    n_docs = rng.choice(args.n_docs)
    seed = TRAIN_SEED_BASE + step
    if beir is not None:
        kind = "beir"
        picked = rng.sample(beir.queries, min(n_q, len(beir.queries)))
        chosen: list[int] = []  # pool indices
        for q in picked:
            chosen += [d for d in beir.gold(q.id) if d not in chosen]
        taken = set(chosen)
        others = [i for i in range(len(beir.documents)) if i not in taken]
        chosen = chosen[:n_docs] + rng.sample(others, max(0, n_docs - len(chosen)))
        doc_texts = [beir.documents[d].text for d in chosen]
        asked = [(q.text, [chosen.index(d) for d in beir.gold(q.id) if d in chosen]) for q in picked]
    else:
        kinds, weights = zip(*args.mix.items())
        kind = rng.choices(kinds, weights)[0]
        if kind == "pairs":
            data = limit_pairs_dataset(n_docs=n_docs, n_queries=min(n_q, n_docs * (n_docs - 1) // 2),
                                       split="train", seed=seed, order="pairs")
        elif kind == "pairs-large":
            n_docs, core = rng.choice(args.large_n_docs), args.large_core
            data = limit_pairs_dataset(n_docs=n_docs, core=core, n_queries=min(n_q, core * (core - 1) // 2),
                                       split="train", seed=seed, order="pairs")
        elif kind == "limit":
            n_docs = min(n_docs, args.limit_max_docs)
            items = rng.choice(args.items)
            # at most half the item slots go to query items: the generator's random pairing can run
            # out of open documents near full capacity (4 documents x 8 items x 16 queries did)
            data = limit_dataset(n_docs=n_docs, items_per_doc=items, n_queries=min(n_q, n_docs * items // 4),
                                 seed=seed)
        else:
            data = needle_dataset(n_docs=n_docs, n_queries=min(n_q, n_docs), seed=seed)
        doc_texts = [d.text for d in data.documents]
        asked = [(q.text, data.gold(q.id)) for q in data.queries]
    order = list(range(len(doc_texts)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    codes = [f"{c:04d}" for c in rng.sample(range(10_000), len(order))]
    texts = [layout.document_template.format(code=code, title="", text=doc_texts[old])
             for old, code in zip(order, codes)]
    docs = tokenizer(texts, add_special_tokens=False).input_ids
    too_long = [len(d) for d in docs if len(d) > layout.max_doc_tokens]
    if too_long:  # cutting a document would cut its code (it sits at the end): never train on that
        raise SystemExit(f"a {kind} document has {max(too_long)} tokens, more than --max-doc-tokens "
                         f"{layout.max_doc_tokens}; raise it")
    queries = []
    for text, golds in asked:
        if not golds:
            continue
        ids = tokenizer(layout.query_template.format(query=text), add_special_tokens=False).input_ids
        gold_rows = [where[g] for g in golds]
        queries.append(dict(ids=ids, gold=gold_rows, codes=[[int(c) for c in codes[g]] for g in gold_rows]))
    return dict(docs=docs, queries=queries, kind=kind)


def _mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in ("pairs", "pairs-large", "limit", "needle") or not weight:
            raise argparse.ArgumentTypeError(f"--mix {text!r}: expected e.g. pairs=0.7,limit=0.15,needle=0.15")
        out[name] = float(weight)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--out", default="lens/adapters/blocksearch-135m")
    parser.add_argument("--checkpoints", default=None, help="default: $LENS_CACHE/train/<out name>")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-docs", type=lambda s: [int(x) for x in s.split(",")], default=[16, 24, 32, 46, 64])
    parser.add_argument("--mix", type=_mix, default=_mix("pairs=0.7,limit=0.15,needle=0.15"),
                        help="corpus kinds and their weights: pairs (LIMIT design), pairs-large (its large corpus), "
                             "limit (synthetic-limit), needle")
    parser.add_argument("--large-n-docs", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256],
                        help="N of the pairs-large kind")
    parser.add_argument("--large-core", type=int, default=16, help="documents whose pairs the pairs-large queries name")
    parser.add_argument("--loss", default="marginal", choices=["marginal", "each"],
                        help="marginal: -log P(any relevant code); each: mean over relevant codes of -log P(that code)")
    parser.add_argument("--items", type=lambda s: [int(x) for x in s.split(",")], default=[8, 12, 16, 20],
                        help="items per document of the synthetic-limit kind")
    parser.add_argument("--limit-max-docs", type=int, default=16, help="N cap of the synthetic-limit kind")
    parser.add_argument("--max-doc-tokens", type=int, default=512)
    parser.add_argument("--ssmax", action="store_true",
                        help="train a length-aware softmax (one s_L per layer, s_L log N on the query rows) with the adapter")
    parser.add_argument("--ssmax-init-n", type=float, default=None,
                        help="s_L starts at 1/log(this): the identity at this N (default: the geometric mean of --n-docs)")
    parser.add_argument("--ssmax-lr", type=float, default=None, help="learning rate of the s_L (default: --lr)")
    parser.add_argument("--init-adapter", default=None, help="start the LoRA from this adapter folder")
    parser.add_argument("--freeze-lora", action="store_true",
                        help="train the s_L alone (needs --ssmax and --init-adapter): the LoRA stays as given")
    parser.add_argument("--corpus-steps", type=int, default=1,
                        help="with --freeze-lora: steps one corpus serves (its prefill reused, --queries new queries each)")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="prefill each corpus without autograd and run its backward a chunk of documents of at most "
                             "this many tokens at a time (the same gradient at one chunk's memory: corpora of 1,000 "
                             "documents); 0: the whole prefill in the graph")
    parser.add_argument("--code-position", default="end", choices=["start", "end"],
                        help="where the code sits in a document (README: code-first did not learn in budget)")
    parser.add_argument("--queries", type=int, default=32,
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
    parser.add_argument("--stop-after", type=int, default=None,
                        help="write the adapter after this step (the learning-rate schedule stays that of --steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="compute dtype (bf16 autocast over fp32 weights); auto: bf16 only with native bf16 matmuls")
    args = parser.parse_args()
    if args.freeze_lora and not (args.ssmax and args.init_adapter):
        parser.error("--freeze-lora trains the s_L of a trained adapter: give --ssmax and --init-adapter")
    if args.corpus_steps < 1 or (args.corpus_steps > 1 and not args.freeze_lora):
        parser.error("--corpus-steps > 1 reuses a corpus's prefill, which needs a frozen adapter: add --freeze-lora")
    if args.chunk_tokens < 0 or (args.chunk_tokens and args.freeze_lora):
        parser.error("--chunk-tokens T (T >= 1) runs the documents' backward in chunks; a frozen adapter has none")

    from lens.data.layout import LayoutConfig
    from lens.models.registry import load_model
    from lens.paths import cache_dir
    from lens.models.lora import LORA_TARGETS, add_lora, lora_state
    from lens.training import (LearnedSSMax, backward_through_prefill, gradient_leaves, layout_digit_logits,
                               prefill_training_corpus)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_dir = Path(args.checkpoints) if args.checkpoints else cache_dir() / "train" / out.name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(args.base, dtype=torch.float32)
    torch.manual_seed(args.seed)  # the LoRA's initial A (peft draws it at random)
    params = add_lora(model, args.rank, args.alpha)
    if args.init_adapter:
        from safetensors.torch import load_file

        init_tensors = load_file(Path(args.init_adapter) / "adapter.safetensors")
        start = {k: v.float() for k, v in init_tensors.items() if "lora_" in k}
        missing = set(start) - {n for n, _ in model.named_parameters()}
        if missing:
            raise SystemExit(f"{args.init_adapter}: {len(missing)} tensors do not match this model's LoRA")
        model.load_state_dict(start, strict=False)
    if args.freeze_lora:
        for p in params:
            p.requires_grad_(False)
    ssmax = None
    groups = [] if args.freeze_lora else [dict(params=params)]
    if args.ssmax:
        init_n = args.ssmax_init_n or math.exp(sum(map(math.log, args.n_docs)) / len(args.n_docs))
        ssmax = LearnedSSMax(model.cfg.n_layers, init_n)
        if args.init_adapter and "ssmax.s" in init_tensors and args.ssmax_init_n is None:  # continue its s_L
            ssmax.s.data.copy_(init_tensors["ssmax.s"].float())
        groups.append(dict(params=list(ssmax.parameters()), lr=args.ssmax_lr or args.lr))
        params = (params if not args.freeze_lora else []) + list(ssmax.parameters())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.05, 1 - s / args.steps))
    layout = LayoutConfig(code_position=args.code_position, max_doc_tokens=args.max_doc_tokens)
    tok = model.tokenizer
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    instruction_ids = tok(layout.instruction, add_special_tokens=False).input_ids
    from lens.backend import resolve_dtype, stamp

    compute_dtype = resolve_dtype(args.dtype)
    print(stamp(compute_dtype))
    config = {k: v for k, v in vars(args).items() if k not in ("checkpoints", "threads", "dtype", "stop_after")}
    if not args.freeze_lora:  # configs of recipes without these options stay as they were
        config.pop("freeze_lora"), config.pop("corpus_steps")
    if not args.chunk_tokens:
        config.pop("chunk_tokens")
    log_path = ckpt_dir / "loss_log.jsonl"
    step = 0
    ckpt = ckpt_dir / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)  # tensors and plain containers only: never unpickle code
        if state["config"] != config:
            raise SystemExit(f"{ckpt} was made with other arguments; delete {ckpt_dir} or use the same arguments")
        model.load_state_dict(state["lora"], strict=False)
        if ssmax is not None:
            ssmax.load_state_dict(state["ssmax"])
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
    last = min(args.steps, args.stop_after or args.steps)
    if step > last:
        raise SystemExit(f"{ckpt} is at step {step}, past --stop-after {last}")
    bar = tqdm(total=last, initial=step, desc="train", unit="step")
    held = None  # with --freeze-lora: (corpus index, its example, its prefilled states)
    while step < last:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16)
        if args.freeze_lora:  # a corpus prefilled once, without autograd, serves --corpus-steps steps
            c, part = divmod(step, args.corpus_steps)
            if held is None or held[0] != c:
                held = None  # free the last corpus's states before the next prefill
                rng = random.Random(f"{args.seed}:{c}")
                full = sample_example(rng, c, args, tok, layout, beir, n_queries=args.queries * args.corpus_steps)
                bar.set_postfix_str(f"prefill {len(full['docs'])} documents")
                with torch.no_grad(), autocast:
                    held = (c, full, prefill_training_corpus(model, instruction_ids, full["docs"]))
            full, prefilled = held[1], held[2]
            n_q = len(full["queries"])
            picked = [full["queries"][(part * args.queries + i) % n_q] for i in range(min(args.queries, n_q))]
            ex = dict(full, queries=picked)
        else:
            rng = random.Random(f"{args.seed}:{step}")
            ex = sample_example(rng, step, args, tok, layout, beir)
            prefilled = None
            if args.chunk_tokens:  # prefilled without autograd; the passes' gradient lands on these leaves
                with torch.no_grad(), autocast:
                    prefilled = gradient_leaves(prefill_training_corpus(model, instruction_ids, ex["docs"]),
                                                compute_dtype)
        passes = [(q["ids"], code) for q in ex["queries"] for code in q["codes"]]
        with autocast:
            outputs = layout_digit_logits(model, instruction_ids, ex["docs"], passes, digit_ids,
                                          query_offset=layout.query_offset, mass_layer=args.aux_layer, ssmax=ssmax,
                                          checkpoint=sum(map(len, ex["docs"])) > 4000, prefilled=prefilled)
        # loss: -log P(any relevant code) (marginal) or the mean over relevant codes of -log P(code) (each)
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
            code_lp = torch.stack(code_lp)
            losses.append(-code_lp.mean() if args.loss == "each" else -torch.logsumexp(code_lp, 0))
            first_right += int(logits.argmax(-1)[0].item() in {c[0] for c in q["codes"]})
            all_right += int(hit)
        loss = torch.stack(losses).mean()
        aux = torch.stack(auxes).mean() if auxes else torch.tensor(0.0)
        total = loss + args.aux_weight * aux
        optimizer.zero_grad()
        total.backward()
        if args.chunk_tokens:  # ... and goes through the prefill, recomputed a chunk of documents at a time
            with autocast:
                backward_through_prefill(model, instruction_ids, ex["docs"], prefilled, args.chunk_tokens)
            prefilled = None
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        with log_path.open("a") as f:
            f.write(json.dumps(dict(step=step, loss=loss.item(), aux=aux.item(), queries=len(losses),
                                    first_digit_right=first_right, code_right=all_right, kind=ex["kind"],
                                    n_docs=len(ex["docs"]), tokens=sum(map(len, ex["docs"])),
                                    lr=schedule.get_last_lr()[0],
                                    elapsed_s=round(time.time() - t0, 1))) + "\n")
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if step % args.save_every == 0 or step == last:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(dict(config=config, lora=lora_state(model), optimizer=optimizer.state_dict(),
                            schedule=schedule.state_dict(), step=step,
                            ssmax=ssmax.state_dict() if ssmax is not None else {}), tmp)
            os.replace(tmp, ckpt)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in lora_state(model).items()}
    extra = {}
    if args.freeze_lora:  # the LoRA is the given adapter's: say how that was trained
        init_config = json.loads((Path(args.init_adapter) / "adapter_config.json").read_text())
        extra["lora_training"] = init_config.get("lora_training", init_config.get("training"))
    if ssmax is not None:
        tensors["ssmax.s"] = ssmax.s.detach().float().clone()
        extra["ssmax"] = dict(n="docs", s=[round(float(x), 5) for x in ssmax.s.detach()],
                              note="query rows' scores times s_L*log(N documents) at every layer L")
    save_file(tensors, out / "adapter.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(dict(
        base=args.base, r=args.rank, lora_alpha=args.alpha, target_modules=LORA_TARGETS, training=config,
        layout=dict(code_position=args.code_position, max_doc_tokens=args.max_doc_tokens), **extra,
        **(dict(stopped_after_step=last) if last < args.steps else {}),
        wall_seconds_this_run=round(time.time() - t0),
    ), indent=1))
    (out / "loss_log.jsonl").write_text(log_path.read_text())
    print(f"adapter written to {out} ({(out / 'adapter.safetensors').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

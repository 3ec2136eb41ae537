"""Corpus-scale kernel benchmarks; every number is measured in this run.

  tl        end-to-end from text (no cache): per-layer, per-head gold statistics (MaxSim and
            attention mass of every document at the readout token) on SmolLM2, lens vs
            TransformerLens's TransformerBridge ``run_with_cache`` on the attention hooks, both
            fp32; each TL size runs in a subprocess capped at --tl-mem-gb of address space to find
            where it runs out of memory.  Ratio = TL time / lens time at the largest T TL held.
  roof      corpus attention throughput against this box's roof, measured in the same run: the
            bf16 matmul rate (2048^3) and memory bandwidth (1 GB copy); roofline = min(matmul
            rate, arithmetic intensity x bandwidth).
            The decoding shapes (a few rows per KV head) kernel by kernel: PyTorch's flash
            kernel vs lens's compiled decode kernel, without and with the readout statistics.
            Also streams of one query row each, one at a time vs sharing each chunk read
            (update_shared).
  rerun     intervention reruns on a cached 1K-document corpus: seconds per query, one query
            alone and four selected together (as the lab runs them), and what they would cost
            at 100% of the roof measured in the same run.
  overhead  the lab's call on 10 documents, where the corpus costs next to nothing: the dense
            layers and the Python around the kernel by themselves.
  paths     the lab's call on a cached 1K-document corpus on each corpus-attention path, in turns
            in one run (default: the compiled path lens picks here against the PyTorch path;
            --paths names others), with where the time goes (corpus attention, the readout
            statistics, the dense layers and Python).  To time an AVX2-only machine's paths on a
            bigger CPU, also cap PyTorch, oneDNN and MKL at AVX2 (ATEN_CPU_CAPABILITY=avx2
            ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2; the header prints what ran).
  kv        the lab's call in fp32 over KV cached in fp32 or bf16
  ablate    where the compiled kernel's time goes: builds of it with one part of the work left
            out (q.k, the exponentials, p.v, the key transposes; their results are wrong, only
            their time is read), timed against the full kernel in turns, on one layer of
            SmolLM2's shapes.

    .venv/bin/python experiments/bench_kernels.py --part tl,roof,rerun
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch

from lens.backend import resolve_dtype, stamp
from lens.runtime.timing import Breakdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ TL vs lens
def _tl_data(target_tokens: int):
    """The corpus both sides of the TransformerLens comparison get: a LIMIT-format dataset of as
    many documents as make about ``target_tokens`` tokens, and that count (every document is in
    the corpus, so neither side holds documents the other does not see)."""
    from lens.data.datasets import limit_dataset
    from lens.data.layout import build_pool_layout, LayoutConfig
    from lens.models.registry import load_tokenizer, smollm2_folder

    pool = build_pool_layout(limit_dataset(n_docs=200, items_per_doc=28, n_queries=4, seed=0),
                             load_tokenizer(smollm2_folder()), LayoutConfig())
    per_doc = sum(map(len, pool.doc_token_ids)) / len(pool.doc_token_ids)
    n = max(2, round((target_tokens - 60) / per_doc))
    return limit_dataset(n_docs=n, items_per_doc=28, n_queries=4, seed=0), n


def tl_worker(target_tokens: int) -> None:
    """One TransformerLens measurement (run in a memory-capped subprocess): prints JSON."""
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    from lens.data.layout import build_pool_layout, corpus_for_query, dense_layout, LayoutConfig
    from lens.models.registry import load_tokenizer, smollm2_folder

    torch.set_grad_enabled(False)
    folder = smollm2_folder()
    tok = load_tokenizer(folder)
    data, n = _tl_data(target_tokens)
    pool = build_pool_layout(data, tok, LayoutConfig())
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tok, device="cpu"
    )
    t_load = time.perf_counter() - t0
    corpus, gold = corpus_for_query(data, "q0", n, 0)
    query_ids = tok(pool.config.query_template.format(query=data.queries[0].text), add_special_tokens=False).input_ids
    layout = dense_layout(pool, corpus, query_ids)
    mask = torch.zeros(layout.mask.shape).masked_fill(~layout.mask, torch.finfo(torch.float32).min)[None, None]
    t0 = time.perf_counter()
    _, cache = bridge.run_with_cache(
        layout.tokens[None], attention_mask=mask, position_ids=layout.positions[None],
        names_filter=lambda name: name.endswith("hook_attn_scores") or name.endswith("hook_pattern"),
    )
    readout = layout.query_slice.stop - 1
    gold_mass, gold_maxsim = [], []
    for layer in range(hf.config.num_hidden_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, readout]  # [head, T]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, :, readout]
        in_gold = torch.isin(layout.key_doc, torch.tensor(gold))
        gold_mass.append(pattern[:, in_gold].sum(-1))
        gold_maxsim.append(scores[:, in_gold].amax(-1))
    t_run = time.perf_counter() - t0
    print(json.dumps({
        "tokens": int(layout.tokens.shape[0]), "n_docs": n, "load_s": t_load, "run_s": t_run,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "gold_mass_l15": torch.stack(gold_mass)[15].tolist(),
    }))


def lens_stats(target_tokens: int, dtype: torch.dtype) -> dict:
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_model("smollm2-135m", dtype=dtype)
    data, n = _tl_data(target_tokens)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = BlockSearchRunner(model, data, progress=False)
    run = runner.run_query("q0", n)  # prefill + query pass + decoding, recording every layer
    mass = [l.document_mass(0)[:, run.gold_positions].sum(-1) for l in run.layers]
    t_run = time.perf_counter() - t0
    return {"tokens": run.n_tokens, "n_docs": n, "load_s": t_load, "run_s": t_run,
            "gold_mass_l15": mass[15].tolist()}


def part_tl(args) -> None:
    print("== lens vs TransformerLens: per-layer, per-head gold statistics from text (SmolLM2; TransformerLens in fp32; "
          "both sides given the same corpus, a dataset of exactly its documents)")
    results = {}
    for target in args.tl_tokens:
        cmd = [sys.executable, __file__, "--tl-worker", str(target)]
        limit = int(args.tl_mem_gb * 1024**3)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )
        line = next((l for l in proc.stdout.splitlines() if l.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            oom = "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr or proc.returncode < 0
            why = "out of memory" if oom else f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
            print(f"TransformerLens target T~{target}: {why} under a {args.tl_mem_gb:g} GB cap")
            if oom:
                results[target] = None
                break
            continue
        res = json.loads(line)
        results[target] = res
        print(f"TransformerLens T={res['tokens']:>5}: {res['run_s']:.2f}s run_with_cache+stats "
              f"(+{res['load_s']:.1f}s load), peak RSS {res['peak_rss_gb']:.1f} GB")
    held = [r for r in results.values() if r]
    if not held:
        print("TransformerLens held no size; nothing to compare")
        return
    best = max(held, key=lambda r: r["tokens"])
    target = next(t for t, r in results.items() if r is best)
    for dtype in (torch.float32, torch.bfloat16):
        ours = lens_stats(target, dtype)
        print(f"lens {str(dtype).split('.')[-1]:<8} T={ours['tokens']:>5}: {ours['run_s']:.2f}s prefill+query+stats "
              f"(+{ours['load_s']:.1f}s load)  -> {best['run_s'] / ours['run_s']:.1f}x faster than TransformerLens")
        if dtype is torch.float32:
            diff = max(abs(a - b) for a, b in zip(ours["gold_mass_l15"], best["gold_mass_l15"]))
            print(f"  gold mass at layer 15, lens vs TransformerLens, max abs diff over heads: {diff:.2e}")


# ------------------------------------------------------------------------------------ roofline
def part_roof(args) -> None:
    from kernels.corpus_attention import corpus_attention

    torch.manual_seed(0)
    print("== corpus attention vs this box's roof (bf16, SmolLM2 shapes: 9 query heads over 3 KV heads, d=64)")
    print("   (the roof is re-measured just before each line, best of 3 like the kernel's time: this box's")
    print("   speed moves by up to 3x within minutes, so a roof measured once at the start misleads)")
    measure_roof = Roof()
    peak, bandwidth = measure_roof()
    print(f"measured at the start: bf16 matmul {peak / 1e9:.0f} GFLOP/s, memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    seen = []  # (peak, bandwidth) per line, for the summary

    def roof_now() -> str:
        nonlocal peak, bandwidth
        peak, bandwidth = measure_roof()
        seen.append((peak, bandwidth))
        return f"[roof {peak / 1e9:.0f} GFLOP/s, {bandwidth / 1e9:.1f} GB/s]"

    t, h, kv, d = args.roof_tokens, 9, 3, 64
    keys = torch.randn(kv, t, d, dtype=torch.bfloat16)
    values = torch.randn(kv, t, d, dtype=torch.bfloat16)
    key_doc = torch.arange(t) // 100  # documents of 100 tokens
    n_docs = int(key_doc.max()) + 1
    for n_q in args.roof_queries:
        q = torch.randn(h, n_q, d, dtype=torch.bfloat16)
        self_k, self_v = keys[:, :n_q].clone(), values[:, :n_q].clone()
        for stats in (False, True):
            kwargs = dict(layer=0, scale=d**-0.5, stats=stats, stats_rows="last", gold_docs=[3] if stats else None)
            corpus_attention(q, keys, values, key_doc, n_docs, self_k, self_v, **kwargs)
            measured = roof_now()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                corpus_attention(q, keys, values, key_doc, n_docs, self_k, self_v, **kwargs)
                times.append(time.perf_counter() - t0)
            el = min(times)
            flops = 4 * h * n_q * t * d
            bytes_ = 2 * kv * t * d * 2
            roof = min(peak, flops / bytes_ * bandwidth)
            print(f"T={t} Q={n_q:<3} stats={'on ' if stats else 'off'}: {el * 1e3:7.1f} ms, {flops / el / 1e9:6.1f} GFLOP/s, "
                  f"{bytes_ / el / 1e9:5.1f} GB/s of KV; roofline {roof / 1e9:.0f} GFLOP/s -> {flops / el / roof:.0%} of roof {measured}")

    # The decoding shapes kernel by kernel: a few rows per KV head (a digit token's 3 heads per KV
    # head, times the streams sharing the read).  PyTorch's flash kernel (output and lse only; the
    # readout statistics then need another pass) vs lens's compiled kernel (kernels/native.py),
    # without and with the readout rows' per-document statistics and gold part.
    from kernels.fused import _flash
    from kernels.native import decode_kernel

    native = decode_kernel()
    bytes_ = 2 * kv * t * d * 2
    empty = torch.empty(0, dtype=torch.long)
    for rows in args.roof_rows:
        q = torch.randn(kv, rows, d, dtype=torch.bfloat16)
        stat_rows = torch.arange(rows - 3, rows) if rows >= 3 else torch.arange(rows)
        gold = torch.zeros(len(stat_rows), n_docs, dtype=torch.bool)
        gold[:, 3] = True
        calls = {"pytorch flash": lambda: _flash(q, keys, values, d**-0.5)}
        if native is not None:
            calls["lens kernel"] = lambda: native.decode_attention(q, keys, values, d**-0.5, empty, 0, empty, empty)
            calls["lens kernel + stats"] = lambda: native.decode_attention(
                q, keys, values, d**-0.5, key_doc, n_docs, stat_rows, gold)
        for name, call in calls.items():
            call()
            measured = roof_now()
            el = min(_timed(call) for _ in range(3))
            flops = 4 * kv * rows * t * d
            roof = min(peak, flops / bytes_ * bandwidth)
            print(f"T={t} {rows:>2} rows/KV head, {name:<20}: {el * 1e3:7.1f} ms, KV read at {bytes_ / el / 1e9:5.1f} GB/s "
                  f"-> {flops / el / roof:.0%} of roof {measured}")
    if native is None:
        print("(lens's compiled kernel unavailable here: no AVX-512 BF16 or no compiler)")

    # Decoding steps: one query row per stream (a digit token), memory-bound.  Streams over the
    # same documents (a beam's hypotheses, queries over one pool) share each chunk read.
    from kernels.corpus_attention import CorpusAttentionStream, iter_chunks, update_shared

    for n_streams in args.roof_streams:
        qs = [torch.randn(h, 1, d, dtype=torch.bfloat16) for _ in range(n_streams)]
        for shared in (False, True):
            def run():
                streams = [CorpusAttentionStream(q, n_docs, n_corpus_keys=t, n_docs_attended=n_docs, n_self=1,
                                                 layer=0, scale=d**-0.5, stats=False, stats_rows="last") for q in qs]
                for chunk in iter_chunks(keys, values, key_doc, 65536):
                    if shared:
                        update_shared(streams, *chunk[:2], [chunk[2]] * len(streams))
                    else:
                        for st in streams:
                            st.update(*chunk)
                for st in streams:
                    st.finish(keys[:, :1], values[:, :1])

            run()
            measured = roof_now()
            el = min(_timed(run) for _ in range(3))
            flops = 4 * h * n_streams * t * d
            read = bytes_ * (1 if shared else n_streams)
            roof = min(peak, flops / read * bandwidth)
            print(f"T={t} decode {n_streams} stream(s) x 1 row, {'shared chunks' if shared else 'one at a time'}: "
                  f"{el * 1e3:7.1f} ms ({el * 1e3 / n_streams:6.1f} ms/stream), KV read at {read / el / 1e9:5.1f} GB/s; "
                  f"roofline {roof / 1e9:.0f} GFLOP/s -> {flops / el / roof:.0%} of roof {measured}")
    peaks, bands = [p for p, _ in seen], [b for _, b in seen]
    print(f"the roof over this run: bf16 matmul {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s, "
          f"memory bandwidth {min(bands) / 1e9:.1f}-{max(bands) / 1e9:.1f} GB/s")


class Roof:
    """This box's roof, measured on call: the matmul rate in ``dtype`` (2048^3; bf16 unless told)
    and the memory bandwidth (a 1 GB copy, read + write), each the best of 3 like the kernels' times."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.a = torch.randn(2048, 2048, dtype=dtype)
        self.b = torch.randn(2048, 2048, dtype=dtype)
        self.src = torch.empty(1 << 29, dtype=torch.int16)
        self.dst = torch.empty_like(self.src)
        self.a @ self.b
        self.dst.copy_(self.src)

    def __call__(self) -> tuple[float, float]:
        peak = 2 * 2048**3 / min(_timed(lambda: self.a @ self.b) for _ in range(3))
        bandwidth = 2 * self.src.numel() * 2 / min(_timed(lambda: self.dst.copy_(self.src)) for _ in range(3))
        return peak, bandwidth


class FlopCount:
    """The multiply-adds of corpus attention (q.k and p.v, 4 flops per query row, key and head
    dim) that go through the fused path, counted by wrapping it while the object lives."""

    def __init__(self):
        import kernels.corpus_attention as ca

        self.total, inner = 0, ca.update_fused_streams

        def counted(fused, keys, values):
            kv, c, d = keys.shape
            self.total += sum(4 * s.q.shape[0] * s.q.shape[1] * c * d for s, _ in fused)
            return inner(fused, keys, values)

        ca.update_fused_streams = counted

    def reset(self) -> None:
        self.total = 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ rerun
def part_rerun(args) -> None:
    from kernels.spec import parse_intervention
    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    print(f"== intervention rerun on a cached {args.rerun_docs}-document corpus (SmolLM2 bf16)")
    model = load_model("smollm2-135m", dtype=resolve_dtype(args.dtype))
    data = limit_dataset(n_docs=args.rerun_docs, items_per_doc=28, n_queries=8, seed=0)
    runner = BlockSearchRunner(model, data, progress=True)
    t0 = time.perf_counter()
    runner.prefill(list(range(args.rerun_docs)))
    print(f"prefill (once): {time.perf_counter() - t0:.0f}s")
    # As in the intervention lab: a query's corpus is already cached (its plain run came first);
    # the intervention reruns only the query side.  "lab, 4 queries" is the lab's call with four
    # queries selected: at N = the pool their corpora hold the same documents, so the decoding
    # steps read each chunk once for all of them; its time is divided by 4.  "drafted" rows are
    # the API's speculative decoding, which the lab does not use (it did not pay here): the plain
    # runs' ranked codes ride along in the query pass, and a decoding step they answer costs no
    # pass over the corpus; how many they answered is printed (it depends on how much the
    # intervention changes the codes).
    specs = ("ssmax:s=0.43", "sink:b=4", "route:layer=16,B=256")
    n = args.rerun_docs
    queries = [q.id for q in data.queries[:4]]
    plain = {}
    for q in queries:  # warm: the plain runs, untimed (the lab's before, whose codes are the drafts)
        runner.run_query(q, n)
        plain[q] = runner.run_streams([runner.stream(q, n, route_scores=False)], beam=2)[0].ranked_codes
    ways = {
        "run_query (greedy, full record)": (lambda qs, fn: [runner.run_query(qs[0], n, intervention=fn)], 1),
        "lab, 1 query (beam 2)": (lambda qs, fn: runner.run_streams(
            [runner.stream(qs[0], n, fn, route_scores=False)], beam=2), 1),
        "lab, 1 query (beam 2, drafted)": (lambda qs, fn: runner.run_streams(
            [runner.stream(qs[0], n, fn, route_scores=False)], beam=2, drafts=[plain[qs[0]]]), 1),
        "lab, 4 queries (beam 2)": (lambda qs, fn: runner.run_streams(
            [runner.stream(q, n, fn, route_scores=False) for q in qs], beam=2), 4),
        "lab, 4 queries (beam 2, drafted)": (lambda qs, fn: runner.run_streams(
            [runner.stream(q, n, fn, route_scores=False) for q in qs], beam=2, drafts=[plain[q] for q in qs]), 4),
    }
    times = {(way, spec): [] for way in ways for spec in specs}
    answered = {(way, spec): [0, 0] for way in ways for spec in specs}
    for rep in range(2):
        for way, (call, n_q) in ways.items():
            for spec in specs:
                picked = queries if n_q == 4 else [queries[rep]]
                t0 = time.perf_counter()
                runs = call(picked, parse_intervention(spec))
                times[way, spec].append((time.perf_counter() - t0) / n_q)
                answered[way, spec][0] += runner.draft_counts["drafted"]
                answered[way, spec][1] += runner.draft_counts["drafted"] + runner.draft_counts["computed"]
    for (way, spec), ts in times.items():
        drafted, steps = answered[way, spec]
        note = f"; drafts answered {drafted}/{steps} decoding steps" if "drafted" in way else ""
        print(f"{way:<36} {spec:<22} N={n} ({runs[0].n_tokens} tokens): {sum(ts) / len(ts):.2f} s/query "
              f"(min {min(ts):.2f}, max {max(ts):.2f}; 2 repeats, all layers recorded, 4 digits decoded{note})")

    # What these calls would cost at 100% of this box's roof, measured now: per decoding step,
    # max(attention FLOPs / bf16 matmul rate, KV bytes / bandwidth) over every layer, plus the
    # dense layers' weights read once per step.  The query pass has all the query tokens' rows;
    # each digit step one row per hypothesis (beam 2 for the lab, 1 for greedy), and queries over
    # one pool share every KV read.
    peak, bandwidth = Roof()()
    cfg = model.cfg
    n_tokens = runs[0].n_tokens
    query_tokens = len(runner.stream(queries[0], n).query_ids)
    kv_bytes = 2 * cfg.n_kv_heads * n_tokens * cfg.d_head * 2 * cfg.n_layers
    weight_bytes = sum(p.numel() * p.element_size() for p in model.blocks.parameters())

    def floor(n_q: int, beam: int) -> float:
        total = 0.0
        for rows in [query_tokens] + [beam] * 3:
            flops = 4 * cfg.n_heads * rows * n_q * n_tokens * cfg.d_head * cfg.n_layers
            total += max(flops / peak, kv_bytes / bandwidth) + weight_bytes / bandwidth
        return total / n_q

    print(f"roof now: bf16 matmul {peak / 1e9:.0f} GFLOP/s, memory bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"KV {kv_bytes / 1e9:.2f} GB per pass, {query_tokens} query tokens")
    for way, n_q, beam in (("run_query (greedy, full record)", 1, 1), ("lab, 1 query (beam 2)", 1, 2),
                           ("lab, 4 queries (beam 2)", 4, 2)):
        best = min(min(times[way, spec]) for spec in specs[:2])  # routing reads fewer keys: left out
        print(f"{way:<36} at 100% of roof: {floor(n_q, beam):.2f} s/query; fastest unrouted measured "
              f"{best:.2f} s/query -> {floor(n_q, beam) / best:.0%} of roof")

    # How firm the decoded codes are: the same plain runs with the corpus fed in chunks of 2^18
    # keys instead of 2^16.  Only fp32 summation order changes; the bf16 model then rounds a few
    # values the other way, and at this N that can reorder the top codes.
    from lens.workbench import code_margin

    feed = runner.source.feed
    for q in queries[:2]:
        runs = {}
        for chunk in (65536, 262144):
            runner.source.feed = functools.partial(feed, chunk_size=chunk)
            runs[chunk] = runner.run_streams([runner.stream(q, n, route_scores=False)], beam=2)[0]
        runner.source.feed = feed
        first = [torch.log_softmax(r.readout_logits[runner.digit_ids].float(), -1) for r in runs.values()]
        attn = [r.attn_out[0] for r in runs.values()]
        print(f"{q} plain, chunks of 2^16 vs 2^18 keys: codes {runs[65536].ranked_codes} vs {runs[262144].ranked_codes}, "
              f"margins {code_margin(runs[65536]):.3f} vs {code_margin(runs[262144]):.3f}; layer 0 attention output "
              f"differs by {float((attn[0] - attn[1]).abs().max() / attn[0].abs().max()):.0e} of its max, "
              f"first-digit log-probs by up to {float((first[0] - first[1]).abs().max()):.3f}")


# ------------------------------------------------------------------------------------ paths
def part_paths(args) -> None:
    from kernels.native import chosen_path
    from kernels.spec import parse_intervention
    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    dtype = resolve_dtype(args.dtype)
    paths = args.paths or [chosen_path(dtype), "pytorch"]
    print(f"== the lab's call on each corpus-attention path: {args.model} {dtype}, PyTorch dispatch "
          f"{torch.backends.cpu.get_cpu_capability()}, paths {', '.join(paths)} (timed in turns)")
    model = load_model(args.model, dtype=dtype)
    data = limit_dataset(n_docs=args.rerun_docs, items_per_doc=28, n_queries=8, seed=0)
    runner = BlockSearchRunner(model, data, progress=True)
    n = args.rerun_docs
    t0 = time.perf_counter()
    runner.prefill(list(range(n)))
    print(f"prefill (once): {time.perf_counter() - t0:.0f}s")
    breakdown = Breakdown(runner)
    flops = FlopCount()
    queries = [q.id for q in data.queries[:4]]
    plain = {}
    for q in queries:  # the lab's plain runs come first (untimed); their ranked codes are the lab's drafts
        plain[q] = runner.run_streams([runner.stream(q, n, route_scores=False)], beam=2)[0].ranked_codes
    # the lab's rerun verifies the plain run's codes in the query pass (app/pages/lab.py); the
    # undrafted call is the one the lab made before it did
    ways = {"lab, 1 query (beam 2, drafted)": 1, "lab, 1 query (beam 2)": 1, "lab, 4 queries (beam 2)": 4}
    answered = {w: [0, 0] for w in ways}
    specs = ("ssmax:s=0.43", "sink:b=4")
    times = {(p, w, sp): [] for p in paths for w in ways for sp in specs}
    spent = {(p, w): dict.fromkeys(breakdown.spent, 0.0) for p in paths for w in ways}
    codes, work = {}, {}
    roof, roofs = Roof(dtype), {w: [] for w in ways}
    saved = os.environ.get("LENS_KERNEL")
    try:
        for rep in range(args.repeats + 1):  # the first turn warms each path (builds, caches), untimed
            for way, n_q in ways.items():
                for spec in specs:
                    for path in paths:
                        os.environ["LENS_KERNEL"] = path
                        picked = queries if n_q == 4 else [queries[rep % 4]]
                        breakdown.reset()
                        flops.reset()
                        t0 = time.perf_counter()
                        drafts = [plain[q] for q in picked] if "drafted" in way else None
                        runs = runner.run_streams([runner.stream(q, n, parse_intervention(spec), route_scores=False)
                                                   for q in picked], beam=2, drafts=drafts)
                        el = time.perf_counter() - t0
                        if rep and drafts:
                            answered[way][0] += runner.draft_counts["drafted"]
                            answered[way][1] += runner.draft_counts["drafted"] + runner.draft_counts["computed"]
                        work[path, way, spec] = flops.total
                        codes.setdefault((way, spec, rep), {})[path] = [r.ranked_codes for r in runs]
                        if rep:
                            times[path, way, spec].append(el / n_q)
                            for k, v in breakdown.spent.items():
                                spent[path, way][k] += v
                    if rep:  # the roof in the same turn: this box's speed drifts within minutes
                        roofs[way].append(roof()[0] / 1e9)
    finally:
        if saved is None:
            os.environ.pop("LENS_KERNEL", None)
        else:
            os.environ["LENS_KERNEL"] = saved
    tokens = runs[0].n_tokens
    for way in ways:
        for spec in specs:
            cells = [f"{p} {sum(times[p, way, spec]) / len(times[p, way, spec]):.2f}" for p in paths]
            print(f"{way:<26} {spec:<14} N={n} ({tokens} tokens), s/query: " + ", ".join(cells))
        base = paths[-1]
        for p in paths[:-1]:
            ratio = sum(sum(times[base, way, sp]) for sp in specs) / sum(sum(times[p, way, sp]) for sp in specs)
            print(f"    {way}: {p} is {ratio:.2f}x the speed of {base} (mean over {', '.join(specs)}, "
                  f"{args.repeats} repeats each)")
        if "drafted" in way:
            print(f"    drafts answered {answered[way][0]} of {answered[way][1]} decoding steps (all paths)")
        for p in paths:
            total = sum(sum(times[p, way, sp]) for sp in specs) * ways[way]
            print(f"    {p:<14} where the time goes: {Breakdown.text(spent[p, way], total)}")
        # the ceiling the matmul roof puts on the ratio: corpus attention at the roof, the rest as measured
        calls = args.repeats * len(specs)
        gflop = sum(work[paths[0], way, sp] for sp in specs) / len(specs) / 1e9
        peak = sorted(roofs[way])[len(roofs[way]) // 2]
        ours = spent[paths[0], way]["corpus attention"] / calls
        rest = sum(sum(times[paths[0], way, sp]) for sp in specs) * ways[way] / calls - ours
        theirs = sum(sum(times[base, way, sp]) for sp in specs) * ways[way] / calls
        print(f"    roof: corpus attention is {gflop:.0f} GFLOP per call ({str(dtype).split('.')[-1]} q.k and p.v); "
              f"{paths[0]} runs it at {gflop / ours:.0f} GFLOP/s = {gflop / ours / peak:.0%} of this box's "
              f"{peak:.0f} GFLOP/s {str(dtype).split('.')[-1]} matmul; at that roof the call would take "
              f"{rest + gflop / peak:.2f} s (the rest as measured), at most {theirs / (rest + gflop / peak):.2f}x "
              f"the speed of {base} (matmul measured in each timed turn: {', '.join(f'{r:.0f}' for r in roofs[way])} "
              f"GFLOP/s, the median used)")
    if len(paths) > 1:  # the lab as it runs now against the lab's undrafted call on the last path
        now, before = "lab, 1 query (beam 2, drafted)", "lab, 1 query (beam 2)"
        ratio = (sum(sum(times[paths[-1], before, sp]) for sp in specs)
                 / sum(sum(times[paths[0], now, sp]) for sp in specs))
        print(f"the lab's rerun ({now}, {paths[0]}) is {ratio:.2f}x the speed of the undrafted call on {paths[-1]}")
    same = sum(len(set(map(str, c.values()))) == 1 for c in codes.values())
    print(f"ranked codes equal across paths in {same} of {len(codes)} calls (paths differ in fp32 summation order)")


# ------------------------------------------------------------------------------------ kv
def part_kv(args) -> None:
    """The lab's call in fp32 with the corpus's KV cached in fp32 or in bf16 (the compiled fp32
    kernel reads bf16 KV, halving the bytes each layer reads), and PyTorch's path over fp32 KV,
    timed in turns in one run."""
    from kernels.native import chosen_path
    from kernels.spec import parse_intervention
    from lens.data.datasets import limit_dataset
    from lens.models.registry import load_model
    from lens.runtime import BlockSearchRunner
    from lens.runtime.records import DocumentKV

    torch.set_grad_enabled(False)
    path, n = chosen_path(torch.float32), args.rerun_docs
    print(f"== the lab's call in fp32, KV cached in fp32 or bf16: SmolLM2, PyTorch dispatch "
          f"{torch.backends.cpu.get_cpu_capability()}, compiled path {path} (timed in turns)")
    model = load_model("smollm2-135m", dtype=torch.float32)
    data = limit_dataset(n_docs=n, items_per_doc=28, n_queries=8, seed=0)
    runners = {"fp32": BlockSearchRunner(model, data, progress=True),
               "bf16": BlockSearchRunner(model, data, progress=False, kv_dtype=torch.bfloat16)}
    t0 = time.perf_counter()
    runners["fp32"].prefill(list(range(n)))
    print(f"prefill (once): {time.perf_counter() - t0:.0f}s")
    # the bf16 cache holds the fp32 prefill's KV rounded, which is what its own prefill stores
    runners["bf16"].source._store = {k: DocumentKV(v.keys.bfloat16(), v.values.bfloat16())
                                     for k, v in runners["fp32"].source._store.items()}
    ways = [(path, "fp32"), (path, "bf16"), ("pytorch", "fp32")]
    queries = [q.id for q in data.queries[:4]]
    fn = parse_intervention("ssmax:s=0.43")
    times, codes, saved = {w: [] for w in ways}, {}, os.environ.get("LENS_KERNEL")
    try:
        for rep in range(args.repeats + 1):  # the first turn warms each way (plain runs, corpus concatenation)
            for way in ways:
                os.environ["LENS_KERNEL"] = way[0]
                runner = runners[way[1]]
                q = queries[rep % 4]
                if rep == 0:
                    runner.run_streams([runner.stream(q, n, route_scores=False)], beam=2)
                t0 = time.perf_counter()
                run = runner.run_streams([runner.stream(q, n, fn, route_scores=False)], beam=2)[0]
                if rep:
                    times[way].append(time.perf_counter() - t0)
                codes.setdefault(rep, []).append(run.ranked_codes)
    finally:
        if saved is None:
            os.environ.pop("LENS_KERNEL", None)
        else:
            os.environ["LENS_KERNEL"] = saved
    mean = {w: sum(t) / len(t) for w, t in times.items()}
    for w in ways:
        print(f"lab, 1 query (beam 2, ssmax:s=0.43), N={n} ({run.n_tokens} tokens): {w[0]} over {w[1]} KV "
              f"{mean[w]:.2f} s ({', '.join(f'{t:.2f}' for t in times[w])})")
    print(f"    {path} over bf16 KV is {mean[path, 'fp32'] / mean[path, 'bf16']:.2f}x its speed over fp32 KV and "
          f"{mean['pytorch', 'fp32'] / mean[path, 'bf16']:.2f}x the PyTorch path's over fp32 KV ({args.repeats} repeats)")
    same = sum(len(set(map(str, c))) == 1 for c in codes.values())
    print(f"ranked codes equal across the three in {same} of {len(codes)} turns")


# ------------------------------------------------------------------------------------ overhead
def part_overhead(args) -> None:
    """The lab's call where the corpus costs next to nothing: what the dense layers and the
    Python around the kernel take by themselves."""
    from kernels.spec import parse_intervention
    from lens.data.datasets import limit_dataset
    from lens.runtime import BlockSearchRunner
    from lens.models.registry import load_model

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", dtype=resolve_dtype(args.dtype))
    data = limit_dataset(n_docs=10, items_per_doc=28, n_queries=8, seed=0)
    runner = BlockSearchRunner(model, data, progress=False)
    fn = parse_intervention("ssmax:s=0.43")
    def call():
        return runner.run_streams([runner.stream("q0", 10, fn, route_scores=False)], beam=2)

    runner.run_streams([runner.stream("q0", 10, route_scores=False)], beam=2)
    call()
    times = [_timed(call) for _ in range(5)]
    print(f"== overhead: the lab's call (beam 2, ssmax:s=0.43, all layers recorded) on 10 documents "
          f"({call()[0].n_tokens} tokens): best {min(times):.2f} s, median {sorted(times)[2]:.2f} s of 5")


# ------------------------------------------------------------------------------------ ablate
def part_ablate(args) -> None:
    from kernels.native import build, runnable_paths

    if "native-avx512" not in runnable_paths():
        print("== ablate: builds of native-avx512, which needs AVX-512 BF16; skipped")
        return
    t, kv, d = args.ablate_tokens, 3, 64
    print(f"== where the compiled kernel's time goes: T={t}, {kv} KV heads, d={d}, no statistics; "
          f"best of 7, variants timed in turns")
    variants = {"full": 0, "no q.k": 1, "no exp": 2, "no p.v": 4, "no transposes": 8, "stream only": 7}
    kernels = {name: build("native-avx512", bits) for name, bits in variants.items()}
    torch.manual_seed(0)
    keys = (torch.randn(kv, t, d) * 2).bfloat16()
    values = torch.randn(kv, t, d).bfloat16()
    key_doc = torch.arange(t) // 100
    empty, empty_b = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for rows in args.ablate_rows:
        q = torch.randn(kv, rows, d).bfloat16()
        best = dict.fromkeys(kernels, float("inf"))
        best_matmul = float("inf")
        for _ in range(7):
            for name, kernel in kernels.items():
                el = _timed(lambda k=kernel, q=q: k.decode_attention(q, keys, values, d**-0.5, key_doc, 0, empty, empty_b))
                best[name] = min(best[name], el)
            best_matmul = min(best_matmul, _timed(lambda: a @ b))
        full = best["full"]
        parts = ", ".join(f"{name} {best[name] * 1e3:.2f} ms (saves {(full - best[name]) * 1e3:+.2f})"
                          for name in variants if name != "full")
        print(f"{rows:>3} rows/KV head: full {full * 1e3:.2f} ms; {parts}")
        pv = full - best["no p.v"]
        if pv > 0:  # p.v accumulates in fp32 FMAs: compare with the fp32 matmul rate, timed in the same turns
            fp32 = 2 * 2048**3 / best_matmul
            rate = 2 * rows * t * kv * d / pv
            print(f"    p.v: {rate / 1e9:.0f} GFLOP/s, {rate / fp32:.0%} of this box's fp32 matmul rate ({fp32 / 1e9:.0f} GFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="tl,roof,rerun")
    parser.add_argument("--tl-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 2000, 3000, 4000, 6000])
    parser.add_argument("--tl-mem-gb", type=float, default=20.0)
    parser.add_argument("--roof-tokens", type=int, default=1 << 20)
    parser.add_argument("--roof-queries", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--roof-rows", type=lambda s: [int(x) for x in s.split(",")], default=[3, 6, 12, 24])
    parser.add_argument("--roof-streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--rerun-docs", type=int, default=1000)
    parser.add_argument("--ablate-tokens", type=int, default=102400)
    parser.add_argument("--ablate-rows", type=lambda s: [int(x) for x in s.split(",")], default=[3, 6, 36])
    parser.add_argument("--paths", type=lambda s: s.split(","), default=None,
                        help="paths for --part paths (LENS_KERNEL values; default: lens's choice here, pytorch)")
    parser.add_argument("--repeats", type=int, default=2, help="timed turns per path in --part paths")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model of --part paths (a trained one, e.g. blocksearch-135m, lets more drafts stand)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="the model's dtype in the rerun and overhead parts (auto: lens info)")
    parser.add_argument("--tl-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tl_worker is not None:
        tl_worker(args.tl_worker)
        return
    print(stamp(resolve_dtype(args.dtype)))
    for part in args.part.split(","):
        {"tl": part_tl, "roof": part_roof, "rerun": part_rerun, "ablate": part_ablate,
         "overhead": part_overhead, "paths": part_paths, "kv": part_kv}[part](args)


if __name__ == "__main__":
    main()

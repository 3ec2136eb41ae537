"""The ``lens`` command line.  Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys
import time
from typing import Annotated, Optional

import typer

from lens.errors import LensError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lens: in-context retrieval at corpus scale")


def _clean_errors(fn):
    """Turn LensError (and spec errors) into one line on stderr, exit 2: no traceback as the message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kernels.spec import InterventionSpecError

        try:
            return fn(*args, **kwargs)
        except (LensError, InterventionSpecError) as err:
            typer.echo(f"lens: error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"lens {version('lens')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="print lens's version and exit")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="errors only: no notes, no progress bars")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug messages too")] = False,
):
    """lens: in-context retrieval at corpus scale."""
    from lens.log import set_verbosity

    set_verbosity(quiet=quiet, verbose=verbose)


@app.command()
@_clean_errors
def models(json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False):
    """List the registered models: architecture, layers, heads, whether weights are present."""
    from lens.models.registry import REGISTRY

    if json_out:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps([dict(name=e.name, description=e.description, weights_present=e.weights_present(),
                                    config=asdict(e.config())) for e in REGISTRY.values()], indent=1))
        return

    width = max(len(name) for name in REGISTRY)
    typer.echo(f"{'name':<{width}} {'arch':<6} {'layers':>6} {'heads':>6} {'kv':>3} {'d_model':>7}  weights  description")
    for entry in REGISTRY.values():
        cfg = entry.config()
        present = "yes" if entry.weights_present() else "no"
        typer.echo(
            f"{entry.name:<{width}} {cfg.architecture:<6} {cfg.n_layers:>6} {cfg.n_heads:>6} {cfg.n_kv_heads:>3} "
            f"{cfg.d_model:>7}  {present:<7}  {entry.description}"
        )
    typer.echo("(any local HF checkpoint folder of a llama or qwen3 model also works as --model PATH)")


@app.command()
@_clean_errors
def info(
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
):
    """What lens detected on this machine (CPU, features) and what it chose (dtype, kernel path)."""
    import json

    from lens.backend import describe

    facts = describe(dtype)
    if json_out:
        typer.echo(json.dumps(facts, indent=1))
        return
    for key, value in facts.items():
        if key == "features":
            value = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in value.items())
        typer.echo(f"{key:<22} {value}")


# the options demo and sweep share (lens.options.RunOptions)
Positions = Annotated[str, typer.Option(help="shared | restart | sequential")]
CodePosition = Annotated[Optional[str], typer.Option(help="start | end (default: the model's own)")]
MaxDocTokens = Annotated[Optional[int], typer.Option(help="longest document in tokens (default: the model's own, else 256)")]
Truncate = Annotated[bool, typer.Option(help="cut documents longer than --max-doc-tokens")]
DropUnjudged = Annotated[bool, typer.Option(help="leave out BEIR queries with no qrels")]
Split = Annotated[Optional[str], typer.Option(help="a BEIR folder's qrels split, qrels/<split>.tsv (default: test)")]
Dtype = Annotated[str, typer.Option(help="auto | float32 | bfloat16 (auto: bf16 only where the CPU multiplies it natively)")]
Interventions = Annotated[Optional[list[str]], typer.Option(help="intervention spec (docs/interventions.md); repeatable")]


@app.command()
@_clean_errors
def demo(
    model: Annotated[str, typer.Option(help="registry name or HF folder")] = "smollm2-135m",
    dataset: Annotated[str, typer.Option(help="synthetic-limit[:docs=..,items=..], needle, or a BEIR folder")] = "synthetic-limit:docs=64,items=10,queries=8",
    n: Annotated[str, typer.Option(help="corpus sizes N, comma-separated")] = "64",
    queries: Annotated[int, typer.Option(help="number of queries")] = 4,
    intervention: Interventions = None,
    positions: Positions = "shared", code_position: CodePosition = None, max_doc_tokens: MaxDocTokens = None,
    truncate: Truncate = False, drop_unjudged: DropUnjudged = False, dtype: Dtype = "auto", split: Split = None,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Run a model on a generated corpus and print the decoded codes per query (a small sweep)."""
    from kernels.spec import parse_intervention
    from lens.models.registry import load_model
    from lens.options import RunOptions, check_queries, check_sizes, parse_sizes
    from lens.runtime import BlockSearchRunner

    options = RunOptions(dtype=dtype, seed=seed, positions=positions, code_position=code_position,
                         max_doc_tokens=max_doc_tokens, truncate=truncate, drop_unjudged=drop_unjudged, split=split)
    sizes = parse_sizes(n)
    score_fns = [parse_intervention(s) for s in (intervention or ["none"])]
    torch_dtype = options.torch_dtype()
    data = options.dataset(dataset)
    check_queries(queries, data)
    check_sizes(sizes, data, label="--n ")
    t0 = time.time()
    lm = load_model(model, dtype=torch_dtype)
    typer.echo(f"model {model} loaded in {time.time() - t0:.1f}s; dataset {data.name}: "
               f"{len(data.documents)} documents, {len(data.queries)} queries")
    layout = options.layout(lm)
    runner = BlockSearchRunner(lm, data, layout, seed=seed)
    if runner.pool.truncated:
        typer.echo(f"note: {runner.pool.truncated} documents truncated to {layout.max_doc_tokens} tokens (--truncate)")
    for size in sizes:
        for fn in score_fns:
            hits, t0 = 0, time.time()
            for query in data.queries[:queries]:
                run = runner.run_query(query.id, size, intervention=fn, record=False)
                hits += run.correct
                typer.echo(
                    f"N={size:<5} {fn.spec():<24} {query.id:<6} decoded {run.decoded}  gold {','.join(run.gold_codes)}"
                    f"  {'hit' if run.correct else 'miss'}  ({run.n_tokens} tokens)  {query.text[:60]}"
                )
            typer.echo(f"N={size:<5} {fn.spec():<24} hit@1 {hits}/{queries}  ({time.time() - t0:.1f}s)")


@app.command()
@_clean_errors
def sweep(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="registry name or HF folder")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="synthetic-limit[:docs=..,items=..], needle[:docs=..], or a BEIR folder")] = None,
    n: Annotated[Optional[str], typer.Option(help="corpus sizes N, comma-separated, e.g. 16,64,256")] = None,
    out: Annotated[Optional[str], typer.Option(help="records folder (resumable)")] = None,
    queries: Annotated[int, typer.Option(help="number of queries")] = 16,
    intervention: Interventions = None,
    baseline: Annotated[Optional[str], typer.Option(help="dense baseline: minilm")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    beam: Annotated[int, typer.Option(help="codes ranked by a beam over the corpus's codes (Recall@k for k <= beam)")] = 2,
    ranking: Annotated[str, typer.Option(help="beam: the beam's order | exclude: each next code decoded with the "
                                              "documents ranked before it hidden (beam query passes; docs/records.md)")] = "beam",
    positions: Positions = "shared", code_position: CodePosition = None, max_doc_tokens: MaxDocTokens = None,
    truncate: Truncate = False, drop_unjudged: DropUnjudged = False, dtype: Dtype = "auto", split: Split = None,
    kv: Annotated[str, typer.Option(help="memory | disk (a verified on-disk KV cache, for corpora beyond RAM)")] = "memory",
    batch: Annotated[int, typer.Option(help="queries per committed unit")] = 8,
    backend: Annotated[str, typer.Option(help="lens (its own engine: Llama, Qwen3, to ~1M tokens) | nnsight (any "
                                              "transformers causal LM, dense, up to 8,192 tokens)")] = "lens",
    ray: Annotated[Optional[str], typer.Option(help="run the units on Ray: local (a cluster on this machine), auto, "
                                                    "or HOST:PORT / ray://HOST:10001 (pip install 'lens[ray]')")] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Ray actors (default: the cluster's CPUs / threads)")] = None,
    config: Annotated[Optional[str], typer.Option(help="a TOML file of these options (flag names as keys); "
                                                       "flags given on the command line win")] = None,
):
    """Run every (N, intervention) for K queries; write DIR/records.parquet and DIR/summary.json."""
    from lens.options import parse_sizes, read_config
    from lens.sweep import SweepConfig, run_sweep

    given = {k: v for k, v in locals().items() if k in ctx.params}
    if config:  # a file's value for each option left at its default
        for key, value in read_config(config, set(ctx.params) - {"config"}).items():
            if getattr(ctx.get_parameter_source(key), "name", "DEFAULT") == "DEFAULT":
                given[key] = value
    missing = [f"--{k}" for k in ("model", "dataset", "n", "out") if given[k] is None]
    if missing:
        raise LensError(f"{', '.join(missing)} missing: give them as flags or in --config")
    model, dataset, n, out, queries, intervention, baseline, seed, beam, ranking, positions, code_position, \
        max_doc_tokens, truncate, drop_unjudged, dtype, kv, batch, ray, ray_workers, split, backend = (given[k] for k in (
            "model", "dataset", "n", "out", "queries", "intervention", "baseline", "seed", "beam", "ranking", "positions",
            "code_position", "max_doc_tokens", "truncate", "drop_unjudged", "dtype", "kv", "batch", "ray", "ray_workers",
            "split", "backend"))

    cfg = SweepConfig(
        model=model, dataset=dataset, n=parse_sizes(n), queries=queries, interventions=intervention or ["none"],
        baseline=baseline, seed=seed, beam=beam, ranking=ranking, positions=positions, code_position=code_position,
        max_doc_tokens=max_doc_tokens,
        truncate=truncate, drop_unjudged=drop_unjudged, dtype=dtype, kv=kv, batch=batch, split=split,
        backend=None if backend == "lens" else backend,
    )
    summary = run_sweep(cfg, out, ray=None if ray is None else dict(address=ray, workers=ray_workers))
    from lens.stats import format_rate

    for run in summary["runs"]:
        cells = [f"hit@1 {format_rate(run['hit_at_k'].get('1'), run['hit_at_k_ci'].get('1'), run['queries'])}"]
        cells += [f"R@{k} {format_rate(v, run['recall_at_k_ci'].get(k), run['queries'])}"
                  for k, v in run["recall_at_k"].items() if k != "1"]
        typer.echo(f"N={run['n_docs']:<6} {run['intervention']:<28} tokens {run['tokens']:>8}  " + "  ".join(cells))
    if summary.get("layout", {}).get("truncated_documents"):
        typer.echo(f"note: {summary['layout']['truncated_documents']} documents had their text cut to "
                   f"{summary['layout']['max_doc_tokens']} tokens (--truncate; codes kept)")
    if "baseline" in summary:
        base = summary["baseline"]
        for size, values in base["recall_at_k"].items():
            count = base["queries"][size]
            cells = [f"hit@1 {format_rate(base['hit_at_k'][size].get('1'), base['hit_at_k_ci'][size].get('1'), count)}"]
            cells += [f"R@{k} {format_rate(v, base['recall_at_k_ci'][size].get(k), count)}" for k, v in values.items()
                      if k in ("1", "2")]
            typer.echo(f"N={size:<6} {base['model']:<28} " + "  ".join(cells))
    typer.echo(f"records: {out}/records.parquet, summary: {out}/summary.json")


@app.command()
@_clean_errors
def report(
    folder: Annotated[str, typer.Argument(help="a records folder written by `lens sweep`")],
    layer: Annotated[Optional[int], typer.Option(help="layer for per-layer tables (default: highest R_any at the smallest N)")] = None,
    n: Annotated[Optional[int], typer.Option(help="N for the per-layer profile (default: smallest)")] = None,
):
    """Render the paper's figures and tables that apply to a records folder into FOLDER/report."""
    from lens.report import render_report

    for path in render_report(folder, layer, n):
        typer.echo(str(path))


@app.command()
@_clean_errors
def export(
    model: Annotated[str, typer.Argument(help="registry name (an adapter for --format peft) or HF folder")],
    out: Annotated[str, typer.Argument(help="a new folder")],
    format: Annotated[str, typer.Option(help="merged: a transformers checkpoint; peft: the adapter in peft's format")] = "merged",
):
    """Write MODEL for other tools: a merged checkpoint AutoModelForCausalLM loads, or a peft adapter."""
    from lens.models.export import export as write

    folder = write(model, out, format)
    typer.echo(f"wrote {folder}" + (" (with lens_ssmax.json: the model's own softmax, see its 'how')"
                                    if (folder / "lens_ssmax.json").is_file() else ""))


@app.command()
@_clean_errors
def trec(
    folder: Annotated[str, typer.Argument(help="a records folder written by `lens sweep`")],
    out: Annotated[str, typer.Argument(help="folder for qrels.txt and one .run file per (intervention, N)")],
):
    """Write a sweep's rankings as TREC run files and qrels (for trec_eval / ir-measures)."""
    from lens.trec import write_trec

    for path in write_trec(folder, out):
        typer.echo(str(path))


def main():  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

"""The paper's figures and tables from a records folder (``lens sweep`` output), as plotly
figures (HTML, and PNG where Chromium is installed for kaleido) and CSV tables.

Every function reads ``records.parquet`` / ``summary.json`` and computes nothing the metrics
module does not already define: aggregation here is means over queries (and heads).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kernels.interventions import PAPER_SSMAX_S
from lens.errors import LensError
from lens.log import log
from lens.stats import rate_interval
from lens.metrics import REDUCES, ROUTERS, read_records, routing_cols, ssmax_predicted_gold_mass


_RUN_KEYS = ("n_docs", "intervention", "queries", "hit_at_k", "recall_at_k", "layers")


def load_records(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """A records folder's records and summary, checked: a damaged or foreign folder is a LensError
    naming what is wrong, never a traceback in a figure."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LensError(f"{folder}: is a file; give the records folder a `lens sweep --out` wrote")
    if not (folder / "records.parquet").is_file() or not (folder / "summary.json").is_file():
        raise LensError(f"{folder}: no records.parquet / summary.json; run `lens sweep --out {folder}` first")
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise LensError(f"{folder / 'summary.json'}: not valid JSON; rerun the sweep command to rewrite it") from None
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) and all(k in r for k in _RUN_KEYS)
                                                          and isinstance(r["layers"], list) for r in runs):
        raise LensError(f"{folder / 'summary.json'}: no runs, or runs without {', '.join(_RUN_KEYS)}; "
                        "rerun the sweep command to rewrite it")
    try:
        records = read_records(folder / "records.parquet")
    except Exception:  # pyarrow raises several types for a damaged file
        raise LensError(f"{folder / 'records.parquet'}: unreadable (damaged?); rerun the sweep command to rewrite it") from None
    if "level" not in records.columns:
        raise LensError(f"{folder / 'records.parquet'}: not lens records (no level column)")
    return records, summary


def _base_intervention(summary: dict) -> str:
    names = [r["intervention"] for r in summary["runs"]]
    return "none" if "none" in names else names[0]


def retrieval_layer(summary: dict) -> int:
    """Default layer for per-layer tables: at the smallest N without intervention, the layer
    where some head most often ranks a gold document first (R_any), ties broken by GoldShare.
    (Peak gold mass alone would pick layer 0, whose attention is near-uniform.)"""
    base = _base_intervention(summary)
    runs = [r for r in summary["runs"] if r["intervention"] == base]
    first = min(runs, key=lambda r: r["n_docs"])
    return max(first["layers"], key=lambda l: ((l["r_any"] or 0), (l["gold_share"] or 0)))["layer"]


def _error_bars(values: list, intervals: list) -> dict:
    """plotly error_y for rates with their 95% intervals (missing intervals draw no bar)."""
    plus = [None if v is None or ci is None else ci[1] - v for v, ci in zip(values, intervals)]
    minus = [None if v is None or ci is None else v - ci[0] for v, ci in zip(values, intervals)]
    return dict(type="data", array=plus, arrayminus=minus, visible=True, thickness=1)


def fig_recall_vs_n(summary: dict) -> go.Figure:
    """fig1: hit@1 and Recall@1 vs N per intervention, with the dense baseline."""
    fig = go.Figure()
    for name in dict.fromkeys(r["intervention"] for r in summary["runs"]):
        runs = sorted((r for r in summary["runs"] if r["intervention"] == name), key=lambda r: r["n_docs"])
        hits = [r["hit_at_k"].get("1") for r in runs]
        fig.add_scatter(x=[r["n_docs"] for r in runs], y=hits, mode="lines+markers",
                        error_y=_error_bars(hits, [r.get("hit_at_k_ci", {}).get("1") for r in runs]),
                        name=f"{name} hit@1", customdata=[[r["tokens"], r["queries"]] for r in runs],
                        hovertemplate="N=%{x}<br>%{customdata[0]} tokens, %{customdata[1]} queries<br>hit@1 %{y:.2f}")
    if "baseline" in summary:
        base = summary["baseline"]
        sizes = sorted(base["hit_at_k"], key=int)
        hits = [base["hit_at_k"][n].get("1") for n in sizes]
        fig.add_scatter(x=[int(n) for n in sizes], y=hits,
                        error_y=_error_bars(hits, [base.get("hit_at_k_ci", {}).get(n, {}).get("1") for n in sizes]),
                        mode="lines+markers", line=dict(dash="dash"), name=f"{base['model']} hit@1 (dense)")
    fig.update_layout(title=f"{summary['model']} on {summary['dataset']}: retrieval vs corpus size",
                      xaxis=dict(title="documents N", type="log"), yaxis=dict(title="hit@1", range=[0, 1.02]))
    return fig


def fig_layer_profile(summary: dict, n_docs: int | None = None) -> go.Figure:
    """fig2: per-layer R_sum and logit-lens first-digit accuracy at one N."""
    base = _base_intervention(summary)
    runs = [r for r in summary["runs"] if r["intervention"] == base]
    run = next((r for r in runs if r["n_docs"] == n_docs), None) or min(runs, key=lambda r: r["n_docs"])
    layers = [l["layer"] for l in run["layers"]]
    fig = go.Figure()
    for key, label in (("r_sum", "R_sum"), ("r_any", "R_any"), ("first_digit_acc", "logit-lens first-digit acc")):
        values = [l[key] for l in run["layers"]]
        fig.add_scatter(x=layers, y=values, mode="lines+markers", name=label,
                        error_y=_error_bars(values, [l.get(f"{key}_ci") for l in run["layers"]]))
    fig.update_layout(title=f"per-layer retrieval signal at N={run['n_docs']} ({base}; {run['queries']} queries, 95% intervals)",
                      xaxis_title="layer", yaxis=dict(range=[0, 1.02]))
    return fig


def fig_rsum_rany_across_n(summary: dict) -> go.Figure:
    """fig3: R_sum^L (left) and R_any^L (right) per layer, one line per N."""
    base = _base_intervention(summary)
    runs = sorted((r for r in summary["runs"] if r["intervention"] == base), key=lambda r: r["n_docs"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("R_sum per layer", "R_any per layer"), shared_yaxes=True)
    for i, run in enumerate(runs):
        layers = [l["layer"] for l in run["layers"]]
        color = f"hsl({int(240 - 240 * i / max(len(runs) - 1, 1))},70%,45%)"
        for col, key in ((1, "r_sum"), (2, "r_any")):
            values = [l[key] for l in run["layers"]]
            fig.add_scatter(x=layers, y=values, name=f"N={run['n_docs']} ({run['queries']} q)", line=dict(color=color),
                            error_y=_error_bars(values, [l.get(f"{key}_ci") for l in run["layers"]]),
                            showlegend=col == 1, row=1, col=col)
    fig.update_yaxes(range=[0, 1.02])
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=f"{summary['model']}: attention dilution across N ({base})")
    return fig


def fig_routing_recall(records: pd.DataFrame, summary: dict, layer: int) -> go.Figure:
    """fig5: routing recall@B vs B at one layer, at the largest N, for every router (QK-MaxSim and
    mean key, heads reduced by max and by mean), with 95% intervals."""
    base = _base_intervention(summary)
    rows = records[(records.level == "layer") & (records.intervention == base) & (records.layer == layer)]
    n = int(rows.n_docs.max())
    rows = rows[rows.n_docs == n]
    fig = go.Figure()
    names = {"maxsim": "QK-MaxSim", "meankey": "mean key", "chunkmean": "chunk mean"}
    for router in ROUTERS:
        for reduce in REDUCES:
            cols = [(b, c) for b, c in routing_cols(rows.columns, router, reduce) if rows[c].notna().any()]
            if not cols:
                continue
            hits = [rows[c].dropna().astype(bool) for _, c in cols]
            rates = [float(h.mean()) for h in hits]
            cis = [rate_interval(h.astype(float)) or (r, r) for h, r in zip(hits, rates)]
            fig.add_scatter(x=[b for b, _ in cols], y=rates, mode="lines+markers",
                            name=f"{names[router]}, heads reduced by {reduce} (n={len(hits[0])})",
                            error_y=dict(type="data", symmetric=False, array=[hi - r for r, (_, hi) in zip(rates, cis)],
                                         arrayminus=[r - lo for r, (lo, _) in zip(rates, cis)]))
    fig.update_layout(title=f"routing recall@B at layer {layer}, N={n}", xaxis=dict(title="B", type="log"),
                      yaxis=dict(title="recall@B", range=[0, 1.02]))
    return fig


def table_gold_share(summary: dict, layer: int) -> pd.DataFrame:
    """table1: GoldShare, ||W_O a^G|| and ||W_O a|| per N at one layer (no intervention)."""
    base = _base_intervention(summary)
    rows = []
    for run in sorted((r for r in summary["runs"] if r["intervention"] == base), key=lambda r: r["n_docs"]):
        item = next(l for l in run["layers"] if l["layer"] == layer)
        rows.append(dict(n_docs=run["n_docs"], tokens=run["tokens"], layer=layer, gold_share=item["gold_share"],
                         gold_mass=item["gold_mass"], r_sum=item["r_sum"], r_sum_ci=_ci_text(item.get("r_sum_ci")),
                         r_any=item["r_any"], r_any_ci=_ci_text(item.get("r_any_ci")), queries=run["queries"]))
    return pd.DataFrame(rows)


def table_norms(records: pd.DataFrame, summary: dict, layer: int) -> pd.DataFrame:
    base = _base_intervention(summary)
    rows = records[(records.level == "layer") & (records.intervention == base) & (records.layer == layer)]
    return rows.groupby("n_docs")[["attn_norm", "gold_attn_norm", "gold_share"]].mean().reset_index()


def _ci_text(ci) -> str | None:
    return None if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table_interventions(summary: dict) -> pd.DataFrame:
    """The intervention table: hit@1 (and Recall@1) per intervention across N."""
    rows = []
    for name in dict.fromkeys(r["intervention"] for r in summary["runs"]):
        row = {"intervention": name}
        for run in sorted((r for r in summary["runs"] if r["intervention"] == name), key=lambda r: r["n_docs"]):
            n = run["n_docs"]
            row[f"hit@1 N={n}"] = run["hit_at_k"].get("1")
            row[f"hit@1 N={n} ci"] = _ci_text(run.get("hit_at_k_ci", {}).get("1"))
            row[f"R@1 N={n}"] = run["recall_at_1"]
            row[f"queries N={n}"] = run["queries"]
        rows.append(row)
    if "baseline" in summary:
        base = summary["baseline"]
        row = {"intervention": f"{base['model']} (dense)"}
        for n in sorted(base["hit_at_k"], key=int):
            row[f"hit@1 N={n}"] = base["hit_at_k"][n].get("1")
            row[f"hit@1 N={n} ci"] = _ci_text(base.get("hit_at_k_ci", {}).get(n, {}).get("1"))
            row[f"R@1 N={n}"] = base["recall_at_1"][n]
            row[f"queries N={n}"] = base.get("queries", {}).get(n)
        rows.append(row)
    return pd.DataFrame(rows)


def fig_theory(summary: dict, layer: int, s: float = PAPER_SSMAX_S) -> go.Figure:
    """Measured vs predicted gold mass across N at one layer; the SSMax form uses the
    no-intervention gap Delta with s."""
    fig = go.Figure()
    base = _base_intervention(summary)
    for name in dict.fromkeys(r["intervention"] for r in summary["runs"]):
        runs = sorted((r for r in summary["runs"] if r["intervention"] == name), key=lambda r: r["n_docs"])
        items = [next(l for l in r["layers"] if l["layer"] == layer) for r in runs]
        ns = [r["n_docs"] for r in runs]
        fig.add_scatter(x=ns, y=[i["gold_mass"] for i in items], mode="lines+markers", name=f"{name}: measured")
        fig.add_scatter(x=ns, y=[i["pred_gold_mass"] for i in items], mode="lines", line=dict(dash="dot"),
                        name=f"{name}: 1/(1+(N-1)e^-Δ)")
        if name == base:
            fig.add_scatter(x=ns, y=[ssmax_predicted_gold_mass(i["delta"], n, s) for i, n in zip(items, ns)],
                            mode="lines", line=dict(dash="dash"), name=f"SSMax form s={s:g}: 1/(1+(N-1)N^(-sΔ))")
    fig.update_layout(title=f"gold attention mass at layer {layer}: measured vs theory (head and query means)",
                      xaxis=dict(title="documents N", type="log"), yaxis=dict(title="gold mass", type="log"))
    return fig


def save_figure(fig: go.Figure, path_stem: Path) -> list[Path]:
    """HTML always; PNG when kaleido finds a Chromium (Debian's chromium is used if installed)."""
    written = [path_stem.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs=True)  # embedded: the figure renders offline
    if not os.environ.get("BROWSER_PATH") and shutil.which("chromium"):
        os.environ["BROWSER_PATH"] = shutil.which("chromium")
    try:
        fig.write_image(path_stem.with_suffix(".png"), width=1000, height=520, scale=1)
        written.append(path_stem.with_suffix(".png"))
    except Exception as err:  # kaleido needs a Chromium; the HTML is the figure
        log.warning(f"{path_stem.name}.png not written ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                    "install Debian's chromium for PNGs")
    return written


def _table1(records, summary, layer, out):
    norms = table_norms(records, summary, layer)[["n_docs", "attn_norm", "gold_attn_norm"]]
    path = out / "table1_gold_share.csv"
    table_gold_share(summary, layer).merge(norms, on="n_docs").to_csv(path, index=False)
    return [path]


def _table_interventions(records, summary, layer, out):
    path = out / "table_interventions.csv"
    table_interventions(summary).to_csv(path, index=False)
    return [path]


# name -> render(records, summary, layer, out, n=None, s=PAPER_SSMAX_S) -> written paths.  The experiment
# scripts and `lens report` both go through this table.
REPORT_ITEMS = {
    "fig1_recall_vs_n": lambda r, sm, layer, out, **kw: save_figure(fig_recall_vs_n(sm), out / "fig1_recall_vs_n"),
    "fig2_layer_profile": lambda r, sm, layer, out, n=None, **kw: save_figure(
        fig_layer_profile(sm, n), out / "fig2_layer_profile"),
    "fig3_rsum_rany": lambda r, sm, layer, out, **kw: save_figure(
        fig_rsum_rany_across_n(sm), out / "fig3_rsum_rany_across_n"),
    "fig5_routing_recall": lambda r, sm, layer, out, **kw: save_figure(
        fig_routing_recall(r, sm, layer), out / "fig5_routing_recall")
    if routing_cols(r.columns) else [],
    "table1_gold_share": lambda r, sm, layer, out, **kw: _table1(r, sm, layer, out),
    "table_interventions": lambda r, sm, layer, out, **kw: _table_interventions(r, sm, layer, out),
    "theory_overlay": lambda r, sm, layer, out, s=PAPER_SSMAX_S, **kw: save_figure(
        fig_theory(sm, layer, s), out / "theory_gold_mass"),
}


def render_report(folder: str | Path, layer: int | None = None, n_docs: int | None = None,
                  items: list[str] | None = None, s: float = PAPER_SSMAX_S) -> list[Path]:
    """Everything that applies to a records folder (or just ``items``), into ``folder/report``."""
    records, summary = load_records(folder)
    sizes = sorted({r["n_docs"] for r in summary["runs"]})
    if n_docs is not None and n_docs not in sizes:
        raise LensError(f"--n {n_docs}: the records hold N = {', '.join(map(str, sizes))}; choose one of them")
    n_layers = max((len(r["layers"]) for r in summary["runs"]), default=0)
    if layer is not None and not 0 <= layer < n_layers:
        raise LensError(f"--layer {layer}: the records hold layers 0..{n_layers - 1}")
    out = Path(folder).expanduser() / "report"
    out.mkdir(exist_ok=True)
    layer = retrieval_layer(summary) if layer is None else layer
    written: list[Path] = []
    for name in items or list(REPORT_ITEMS):
        written += REPORT_ITEMS[name](records, summary, layer, out, n=n_docs, s=s)
    return written


def run_script(doc: str, item: str) -> None:
    """The command line every experiment script shares: RECORDS [--layer L] [--n N] [--s S]."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("records", help="a records folder written by `lens sweep`")
    parser.add_argument("--layer", type=int, default=None, help="default: highest R_any at the smallest N")
    parser.add_argument("--n", type=int, default=None, help="N for per-layer profiles (default: smallest)")
    parser.add_argument("--s", type=float, default=PAPER_SSMAX_S, help="SSMax s for the theory curve")
    args = parser.parse_args()
    for path in render_report(args.records, args.layer, args.n, [item], args.s):
        print(path)

def fig_layer_metric_across_n(summary: dict, key: str, title: str, intervention: str | None = None) -> go.Figure:
    """One per-layer summary metric (gold_share, first_digit_acc, ...), one line per N."""
    name = intervention or _base_intervention(summary)
    fig = go.Figure()
    for run in sorted((r for r in summary["runs"] if r["intervention"] == name), key=lambda r: r["n_docs"]):
        fig.add_scatter(x=[l["layer"] for l in run["layers"]], y=[l[key] for l in run["layers"]],
                        mode="lines+markers", name=f"N={run['n_docs']}")
    fig.update_layout(title=f"{title} ({name})", xaxis_title="layer", yaxis_title=key)
    return fig


def fig_gold_mass_heatmap(summary: dict, intervention: str | None = None) -> go.Figure:
    """Gold attention mass (head and query mean) as a layer x N heatmap."""
    name = intervention or _base_intervention(summary)
    runs = sorted((r for r in summary["runs"] if r["intervention"] == name), key=lambda r: r["n_docs"])
    z = [[l["gold_mass"] for l in r["layers"]] for r in runs]
    fig = go.Figure(go.Heatmap(z=list(map(list, zip(*z))), x=[str(r["n_docs"]) for r in runs],
                               y=[l["layer"] for l in runs[0]["layers"]], colorscale="Viridis",
                               colorbar=dict(title="gold mass")))
    fig.update_layout(title=f"gold attention mass, layer x N ({name})", xaxis_title="N", yaxis_title="layer")
    return fig


def fig_head_heatmap(records: pd.DataFrame, n_docs: int, metric: str = "gold_mass", intervention: str = "none") -> go.Figure:
    """A per-head metric (gold_mass, gold_rank, gold_maxsim, delta) as a layer x head heatmap at one N."""
    rows = records[(records.level == "head") & (records.n_docs == n_docs) & (records.intervention == intervention)]
    if rows.empty:
        raise LensError(f"no head records for N={n_docs}, intervention {intervention!r}")
    table = rows.groupby(["layer", "head"])[metric].mean().unstack("head")
    fig = go.Figure(go.Heatmap(z=table.values, x=[str(h) for h in table.columns], y=table.index,
                               colorscale="Viridis_r" if metric == "gold_rank" else "Viridis",
                               colorbar=dict(title=metric)))
    fig.update_layout(title=f"{metric} per layer and head at N={n_docs} ({intervention}, mean over queries)",
                      xaxis_title="head", yaxis_title="layer")
    return fig

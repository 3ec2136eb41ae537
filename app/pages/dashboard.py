"""Dilution dashboard: run (or open) a sweep over N and see attention dilution."""

import os
from pathlib import Path

import streamlit as st

from app.common import app_dtype, chart, model_and_dataset, parse_sizes
from kernels.score_functions import INTERVENTIONS
from kernels.spec import InterventionSpecError
from lens.errors import LensError
from lens.report import (
    fig_gold_mass_heatmap, fig_head_heatmap, fig_layer_metric_across_n, fig_recall_vs_n, fig_rsum_rany_across_n,
    fig_theory, load_records, retrieval_layer,
)
from lens.stats import format_rate
from lens.sweep import SweepConfig, run_sweep
from lens.workbench import DEFAULT_N, records_folder

st.title("Attention dilution across corpus size")
model, dataset, runner = model_and_dataset("dash")
sizes_text = st.sidebar.text_input("N grid", os.environ.get("LENS_APP_N", DEFAULT_N), key="dash-n")
queries = st.sidebar.number_input("queries", 1, 256, int(os.environ.get("LENS_APP_QUERIES", 4)), key="dash-q")
interventions = st.sidebar.multiselect(
    "interventions", ["none", *(cls.example for cls in INTERVENTIONS.values()),
                      f"{INTERVENTIONS['ssmax'].example}+{INTERVENTIONS['route'].example}"],
    default=["none"], key="dash-interventions")
if runner is None:
    st.stop()
sizes = parse_sizes(sizes_text, runner.dataset)
if sizes is None:
    st.stop()
default_folder = records_folder(model, dataset, sizes, int(queries), app_dtype())
if os.environ.get("LENS_APP_RECORDS"):  # the browser test keeps its records apart
    default_folder = Path(os.environ["LENS_APP_RECORDS"]) / default_folder.name
folder = Path(st.sidebar.text_input("records folder", str(default_folder), key="dash-folder"))
run_clicked = st.sidebar.button("run / resume sweep", key="dash-run")

# the first visit fills lens's own records folder by itself; a folder the user typed is written only on a click
auto = folder == default_folder and not (folder.exists() and any(folder.iterdir()))
if run_clicked or (auto and not (folder / "summary.json").is_file()):
    bar = st.progress(0.0, text="sweep: starting (prefilling documents)")
    cfg = SweepConfig(model=model, dataset=dataset, n=sizes, queries=int(queries),
                      interventions=interventions or ["none"], beam=2, batch=int(queries), dtype=app_dtype())
    try:
        run_sweep(cfg, folder, progress=False,
                  on_unit=lambda done, total: bar.progress(done / total, text=f"sweep: {done}/{total} units"))
    except (LensError, InterventionSpecError) as err:
        st.error(str(err))
        st.stop()
    bar.empty()

if not run_clicked and not (folder / "summary.json").is_file():
    st.info(f"{folder} holds no finished sweep: press 'run / resume sweep' to run (or resume) one there")
    st.stop()
try:
    records, summary = load_records(folder)
except LensError as err:
    st.error(str(err))
    st.stop()

names = list(dict.fromkeys(r["intervention"] for r in summary["runs"]))
largest = max(r["n_docs"] for r in summary["runs"])
cols = st.columns(len(names) + 1)
for col, name in zip(cols, names):
    run = next(r for r in summary["runs"] if r["intervention"] == name and r["n_docs"] == largest)
    hit = run["hit_at_k"].get("1")
    col.metric(f"hit@1 at N={largest} ({name})", "n/a" if hit is None else f"{hit:.2f}")
    col.caption(format_rate(hit, run.get("hit_at_k_ci", {}).get("1"), run["queries"]) + ", 95% interval")
layer = retrieval_layer(summary)
cols[-1].metric("retrieval layer (R_any, then GoldShare)", layer)

chart(fig_rsum_rany_across_n(summary), "fig-rsum")
left, right = st.columns(2)
chart(fig_gold_mass_heatmap(summary), "fig-heat", left)
chart(fig_recall_vs_n(summary), "fig-recall", right)
n_pick = st.select_slider("N for the layer x head heatmap", options=sorted({r["n_docs"] for r in summary["runs"]}),
                          key="dash-npick")
metric = st.radio("head metric", ["gold_mass", "gold_rank", "gold_maxsim", "delta"], horizontal=True, key="dash-metric")
chart(fig_head_heatmap(records, n_pick, metric, names[0]), "fig-heads")
left, right = st.columns(2)
chart(fig_layer_metric_across_n(summary, "gold_share", "GoldShare per layer"), "fig-share", left)
chart(fig_layer_metric_across_n(summary, "first_digit_acc", "logit-lens first-digit accuracy"), "fig-digit", right)
chart(fig_theory(summary, layer), "fig-theory")
st.caption(f"records: {folder}")
left, right = st.columns(2)
left.download_button("records.parquet", (folder / "records.parquet").read_bytes(), file_name="records.parquet",
                     key="dash-records-download")
right.download_button("summary.json", (folder / "summary.json").read_text(), file_name="summary.json",
                      mime="application/json", key="dash-summary-download")

"""Intervention lab: change the softmax live on the cached corpus, before vs after."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app.common import chart, model_and_dataset, parse_sizes, table_download
from app.controls import default_grid, intervention_controls
from kernels.score_functions import Intervention
from kernels.spec import InterventionSpecError, parameter_fields, parse_intervention
from lens.errors import LensError
from lens.workbench import compare_runs

st.title("Intervention lab")
model, dataset, runner = model_and_dataset("lab")
if runner is None:
    st.stop()
n_layers, n_heads = runner.model.cfg.n_layers, runner.model.cfg.n_heads
pool = len(runner.dataset.documents)
with st.sidebar:
    st.subheader("softmax controls")
    intervention = intervention_controls(n_layers, n_heads)
st.markdown(f"**intervention:** `{intervention.spec()}`")
n_docs = st.number_input("N", 1, pool, min(64, pool), key="lab-n")
ids = [q.id for q in runner.dataset.queries]
chosen = st.multiselect("queries", ids, default=ids[:2], key="lab-queries")
if not chosen:
    st.info("choose at least one query")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=64)
def _runs(model_name, dataset_name, query_ids, n, intervention, drafts=None):
    """``drafts``: per query, codes verified in the query pass (the plain run's), so a decoding step
    they answer costs no pass over the corpus; the decoded codes do not depend on them."""
    streams = [runner.stream(q, n, intervention, route_scores=False) for q in query_ids]  # routing recall not shown here
    return runner.run_streams(streams, beam=2, drafts=[list(d) for d in drafts] if drafts else None)


try:
    before = _runs(model, dataset, tuple(chosen), int(n_docs), Intervention())
    after = before if intervention.spec() == "none" else _runs(
        model, dataset, tuple(chosen), int(n_docs), intervention, tuple(tuple(r.ranked_codes) for r in before))
except (LensError, InterventionSpecError) as err:
    st.error(str(err))
    st.stop()
cmp = compare_runs(before, after)
c1, c2 = st.columns(2)
c1.metric("hit@1 before", f"{cmp['before']['hit_at_1']:.2f}")
c2.metric("hit@1 after", f"{cmp['after']['hit_at_1']:.2f}",
          delta=f"{cmp['after']['hit_at_1'] - cmp['before']['hit_at_1']:+.2f}")
layers = cmp["layers"]
peak = int(layers.gold_mass_before.idxmax())
c1.metric(f"gold mass at layer {peak} before", f"{layers.gold_mass_before[peak]:.4f}")
c2.metric(f"gold mass at layer {peak} after", f"{layers.gold_mass_after[peak]:.4f}")
chart(px.line(layers, x="layer", y=["gold_mass_before", "gold_mass_after"], log_y=True,
              title="gold attention mass per layer (head and query mean)"), "lab-mass")
chart(px.line(layers, x="layer", y=["r_sum_hit_before", "r_sum_hit_after", "r_any_hit_before", "r_any_hit_after"],
              title="R_sum / R_any per layer"), "lab-r")
st.dataframe(pd.DataFrame(
    [dict(query=q, gold=g, decoded_before=d) for q, d, g in cmp["before"]["decoded"]]
).assign(decoded_after=[d for _, d, _ in cmp["after"]["decoded"]],
         margin_before=cmp["before"]["margin"], margin_after=cmp["after"]["margin"]), hide_index=True, key="lab-decoded")
table_download(layers, "lab-layers-before-after", "lab-layers-download")
st.caption("margin: log-probability gap between the two codes the beam kept. On a model not trained for the task "
           "the digit distributions are flat and bf16 rounding alone moves them by up to ~0.1 nats a digit, enough "
           "to reorder codes: read a changed code together with the gold mass and R_sum/R_any curves above.")

st.subheader("sweep an intervention parameter")
fields = parameter_fields()
names = [f"{name} {key}" for name, key in fields]
param = st.selectbox("parameter", names, index=names.index("ssmax s"), key="lab-sweep-param")
name, key = param.split(" ")
grid_text = st.text_input("values", default_grid(fields[name, key]), key="lab-sweep-grid")
sizes_text = st.text_input("N grid", "16,64", key="lab-sweep-n")
if st.button("run parameter sweep", key="lab-sweep-run"):
    sizes = parse_sizes(sizes_text, runner.dataset)
    try:  # each value through the spec grammar: its bounds and checks are the CLI's
        grid = [(text.strip(), parse_intervention(f"{name}:{key}={text.strip()}")) for text in grid_text.split(",")]
    except InterventionSpecError as err:
        st.error(str(err))
        st.stop()
    if sizes:
        bar, rows = st.progress(0.0, text="parameter sweep"), []
        total = len(grid) * len(sizes)
        for i, ((text, fn), n) in enumerate([(g, n) for g in grid for n in sizes]):
            runs = _runs(model, dataset, tuple(chosen), n, fn)
            res = compare_runs(runs, runs)
            rows.append(dict(value=float(text), N=n, hit_at_1=res["after"]["hit_at_1"],
                             peak_gold_mass=float(res["layers"].gold_mass_after.max())))
            bar.progress((i + 1) / total, text=f"parameter sweep {i + 1}/{total}")
        frame = pd.DataFrame(rows)
        left, right = st.columns(2)
        chart(px.line(frame, x="value", y="hit_at_1", color="N", markers=True, title=f"hit@1 vs {param}"),
              "lab-sweep-hit", left)
        chart(px.line(frame, x="value", y="peak_gold_mass", color="N", markers=True, log_y=True,
                      title=f"peak gold mass vs {param}"), "lab-sweep-mass", right)
        st.dataframe(frame, hide_index=True, key="lab-sweep-table")
        table_download(frame, f"parameter-sweep-{name}-{key}", "lab-sweep-download")

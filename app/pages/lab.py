"""Intervention lab: change the softmax live on the cached corpus, before vs after."""

import math

import pandas as pd
import plotly.express as px
import streamlit as st

from app.common import model_and_dataset, parse_sizes
from kernels.score_functions import PARAMETER_BOUNDS, InterventionSpecError
from lens.errors import LensError
from lens.workbench import Controls, compare_runs

st.title("Intervention lab")
model, dataset, runner = model_and_dataset("lab")
if runner is None:
    st.stop()
n_layers, n_heads = runner.model.cfg.n_layers, runner.model.cfg.n_heads
pool = len(runner.dataset.documents)
with st.sidebar:
    st.subheader("softmax controls")
    temperature = st.slider("temperature t (s -> s/t)", 0.1, 4.0, 1.0, 0.05, key="lab-t")
    ssmax_s = st.slider("SSMax s (0 = off)", 0.0, 1.5, 0.0, 0.01, key="lab-s")
    ssmax_range = st.slider("SSMax layers", 0, n_layers - 1, (0, n_layers - 1), key="lab-s-layers")
    ssmax_n = st.radio("SSMax n", ["keys", "docs"], horizontal=True, key="lab-s-n")
    sink_on = st.checkbox("additive sink", key="lab-sink-on")
    sink_b = st.slider("sink b", -10.0, 20.0, 4.0, 0.5, key="lab-sink", disabled=not sink_on)
    route_on = st.checkbox("top-B routing", key="lab-route-on")
    route_layer = st.slider("route layer", 0, n_layers - 2, min(16, n_layers - 2), key="lab-route-layer", disabled=not route_on)
    route_b = st.number_input("B", 1, 100_000, 16, key="lab-route-b", disabled=not route_on)
    route_reduce = st.radio("head reduction", ["max", "mean"], horizontal=True, key="lab-route-reduce", disabled=not route_on)
    scale_layer = st.slider("scale heads: layer", 0, n_layers - 1, 0, key="lab-scale-layer")
    scale_heads = st.multiselect("heads", list(range(n_heads)), key="lab-scale-heads")
    scale_factor = st.slider("factor", 0.0, 4.0, 1.0, 0.05, key="lab-scale-factor")

controls = Controls(
    temperature=temperature, ssmax_s=ssmax_s, ssmax_layers=tuple(ssmax_range), ssmax_n=ssmax_n,
    sink_b=sink_b if sink_on else None, route_layer=route_layer if route_on else None, route_b=int(route_b),
    route_reduce=route_reduce, scale_layer=scale_layer, scale_heads=tuple(scale_heads), scale_factor=scale_factor,
)
score_fn = controls.score_function()
st.markdown(f"**intervention:** `{score_fn.spec() if score_fn else 'none'}`")
n_docs = st.number_input("N", 1, pool, min(64, pool), key="lab-n")
ids = [q.id for q in runner.dataset.queries]
chosen = st.multiselect("queries", ids, default=ids[:2], key="lab-queries")
if not chosen:
    st.info("choose at least one query")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=64)
def _runs(model_name, dataset_name, query_ids, n, spec):
    from kernels.score_functions import parse_intervention

    fn = None if spec == "none" else parse_intervention(spec)
    streams = [runner.stream(q, n, fn, route_scores=False) for q in query_ids]  # routing recall not shown here
    return runner.run_streams(streams, beam=2)


try:
    before = _runs(model, dataset, tuple(chosen), int(n_docs), "none")
    after = _runs(model, dataset, tuple(chosen), int(n_docs), score_fn.spec() if score_fn else "none")
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
st.plotly_chart(px.line(layers, x="layer", y=["gold_mass_before", "gold_mass_after"], log_y=True,
                        title="gold attention mass per layer (head and query mean)"), key="lab-mass")
st.plotly_chart(px.line(layers, x="layer", y=["r_sum_hit_before", "r_sum_hit_after", "r_any_hit_before", "r_any_hit_after"],
                        title="R_sum / R_any per layer"), key="lab-r")
st.dataframe(pd.DataFrame(
    [dict(query=q, gold=g, decoded_before=d) for q, d, g in cmp["before"]["decoded"]]
).assign(decoded_after=[d for _, d, _ in cmp["after"]["decoded"]],
         margin_before=cmp["before"]["margin"], margin_after=cmp["after"]["margin"]), hide_index=True, key="lab-decoded")
st.caption("margin: log-probability gap between the two codes the beam kept. On a model not trained for the task "
           "the digit distributions are flat and bf16 rounding alone moves them by up to ~0.1 nats a digit, enough "
           "to reorder codes: read a changed code together with the gold mass and R_sum/R_any curves above.")

st.subheader("sweep an intervention parameter")
param = st.selectbox("parameter", ["SSMax s", "temperature t", "sink b"], key="lab-sweep-param")
grid_text = st.text_input("values", {"SSMax s": "0.2,0.3,0.43,0.6", "temperature t": "0.25,0.5,1,2",
                                     "sink b": "0,4,8,12"}[param], key="lab-sweep-grid")
sizes_text = st.text_input("N grid", "16,64", key="lab-sweep-n")
if st.button("run parameter sweep", key="lab-sweep-run"):
    sizes = parse_sizes(sizes_text, pool)
    try:
        values = [float(v) for v in grid_text.split(",")]
    except ValueError:
        st.error(f"values {grid_text!r}: expected comma-separated numbers")
        st.stop()
    key = {"SSMax s": "s", "temperature t": "t", "sink b": "b"}[param]
    low, high = PARAMETER_BOUNDS[key]
    bad = [v for v in values if not (math.isfinite(v) and low <= v <= high) or (key in ("s", "t") and v <= 0)]
    if bad:
        st.error(f"{param} = {bad[0]:g}: values must be finite and in {low:g}..{high:g}"
                 + (" and above 0" if key in ("s", "t") else ""))
        st.stop()
    if sizes:
        bar, rows = st.progress(0.0, text="parameter sweep"), []
        total = len(values) * len(sizes)
        for i, (value, n) in enumerate([(v, n) for v in values for n in sizes]):
            c = Controls(**{"SSMax s": dict(ssmax_s=value), "temperature t": dict(temperature=value),
                            "sink b": dict(sink_b=value)}[param])
            fn = c.score_function()
            runs = _runs(model, dataset, tuple(chosen), n, fn.spec() if fn else "none")
            res = compare_runs(runs, runs)
            rows.append(dict(value=value, N=n, hit_at_1=res["after"]["hit_at_1"],
                             peak_gold_mass=float(res["layers"].gold_mass_after.max())))
            bar.progress((i + 1) / total, text=f"parameter sweep {i + 1}/{total}")
        frame = pd.DataFrame(rows)
        left, right = st.columns(2)
        left.plotly_chart(px.line(frame, x="value", y="hit_at_1", color="N", markers=True, title=f"hit@1 vs {param}"),
                          key="lab-sweep-hit")
        right.plotly_chart(px.line(frame, x="value", y="peak_gold_mass", color="N", markers=True, log_y=True,
                                   title=f"peak gold mass vs {param}"), key="lab-sweep-mass")
        st.dataframe(frame, hide_index=True, key="lab-sweep-table")

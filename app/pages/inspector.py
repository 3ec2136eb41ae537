"""Query inspector: one query at one N, layer by layer."""

import plotly.express as px
import streamlit as st

from app.common import chart, model_and_dataset, table_download
from lens.errors import LensError
from lens.workbench import layer_table, maxsim_distribution, ranked_by_exclusion, top_documents

st.title("Query inspector")
model, dataset, runner = model_and_dataset("insp")
if runner is None:
    st.stop()
queries = runner.dataset.queries
query = st.selectbox("query", [q.id for q in queries], format_func=lambda q: f"{q}: {runner.dataset.queries[[x.id for x in queries].index(q)].text}",
                     key="insp-query")
n_docs = st.number_input("N (documents in the corpus)", 1, 100_000, min(64, len(runner.dataset.documents)), key="insp-n")


@st.cache_data(show_spinner="running the query", max_entries=32)
def _run(model_name, dataset_name, query_id, n):  # the runner is this (model, dataset)'s
    return runner.run_query(query_id, n, beam=2)


@st.cache_data(show_spinner="asking again with the first code's document hidden", max_entries=32)
def _excluded(model_name, dataset_name, query_id, n):
    return ranked_by_exclusion(runner, query_id, n, k=2)


try:
    run = _run(model, dataset, query, int(n_docs))
except LensError as err:
    st.error(str(err))
    st.stop()

table = layer_table(run)
c1, c2, c3, c4 = st.columns(4)
c1.metric("decoded", run.decoded)
c2.metric("gold", ", ".join(run.gold_codes))
c3.metric("hit@1", "yes" if run.correct else "no")
c4.metric("context tokens", run.n_tokens)
gold = set(run.gold_codes)
mark = lambda codes: ", ".join(f"{c} ({'relevant' if c in gold else 'not relevant'})" for c in codes)  # noqa: E731
st.markdown(f"**the beam's two codes**: {mark(run.ranked_codes)}")
if st.checkbox("rank by exclusion: decode again with the first code's document hidden (one more pass)",
               key="insp-exclude"):
    st.markdown(f"**by exclusion**: {mark(_excluded(model, dataset, query, int(n_docs)))}")
band = table[table.r_any_hit]
st.markdown(f"**retrieval band** (layers where some head ranks a gold document first): "
            f"{', '.join(map(str, band.layer.tolist())) or 'none'}")
chart(px.line(table, x="layer", y=["gold_mass", "best_head_gold_mass", "gold_share"],
              title="gold attention mass and GoldShare per layer"), "insp-band")
layer = st.slider("layer", 0, runner.model.cfg.n_layers - 1, int(table.gold_mass.idxmax()), key="insp-layer")
dist = maxsim_distribution(run, layer)
left, right = st.columns(2)
chart(px.strip(dist, x="head", y="maxsim", color="gold", title=f"MaxSim per document, layer {layer}"),
      "insp-maxsim", left)
chart(px.strip(dist, x="head", y="mass", color="gold", log_y=True, title=f"attention mass per document, layer {layer}"),
      "insp-mass", right)
st.subheader(f"documents with the highest attention mass at layer {layer}")
top = top_documents(runner, run, layer)
st.dataframe(top, hide_index=True, key="insp-top")
table_download(top, f"top-documents-{query}-n{int(n_docs)}-layer{layer}", "insp-top-download")
st.dataframe(table, hide_index=True, key="insp-table")
table_download(table, f"layers-{query}-n{int(n_docs)}", "insp-table-download")

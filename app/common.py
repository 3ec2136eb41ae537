"""Shared, cached resources for the pages: models and runners are built once per session
(st.cache_resource) and reused by every page and every rerun."""

from __future__ import annotations

import os

import streamlit as st
from lens.backend import resolve_dtype
from lens.data.datasets import load_dataset
from lens.runtime import BlockSearchRunner
from lens import options
from lens.errors import LensError
from lens.models.registry import REGISTRY, load_model
from lens.workbench import DEFAULT_DATASET, default_model


def app_dtype() -> str:
    """The dtype the app's models and sweeps run in: ``LENS_DTYPE``, else ``auto`` (lens.backend)."""
    return os.environ.get("LENS_DTYPE", "auto")


def cached_model(name: str):
    """The model ``name`` in the app's dtype, loaded once per (name, dtype)."""
    return _cached_model(name, app_dtype())


@st.cache_resource(show_spinner="loading model")
def _cached_model(name: str, dtype: str):
    return load_model(name, dtype=resolve_dtype(dtype))


def cached_runner(model_name: str, dataset: str) -> BlockSearchRunner:
    """The runner over ``dataset`` with the app's model, built once per (model, dataset, dtype)."""
    return _cached_runner(model_name, dataset, app_dtype())


@st.cache_resource(show_spinner="preparing corpus")
def _cached_runner(model_name: str, dataset: str, dtype: str) -> BlockSearchRunner:
    return BlockSearchRunner(_cached_model(model_name, dtype), load_dataset(dataset), progress=False)


def model_and_dataset(key: str):
    """Sidebar choice of model and dataset, shared across pages; returns (model, dataset, runner)
    or (.., None) with the problem shown in the page."""
    names = list(REGISTRY)
    # LENS_APP_MODEL / LENS_APP_DATASET override the defaults (used by the browser test)
    first_model = st.session_state.get("model", os.environ.get("LENS_APP_MODEL") or default_model())
    if first_model not in names:
        st.warning(f"model {first_model!r} is not registered (see `lens models`); showing {default_model()} instead")
        first_model = default_model()
    model = st.sidebar.selectbox("model", names, index=names.index(first_model), key=f"{key}-model")
    dataset = st.sidebar.text_input("dataset (generated spec or BEIR folder)",
                                    st.session_state.get("dataset", os.environ.get("LENS_APP_DATASET") or DEFAULT_DATASET),
                                    key=f"{key}-dataset")
    st.session_state["model"], st.session_state["dataset"] = model, dataset
    try:
        return model, dataset, cached_runner(model, dataset)
    except LensError as err:
        st.error(str(err))
        return model, dataset, None


def parse_sizes(text: str, data) -> list[int] | None:
    """The N grid's sizes over ``data`` (sorted, each once), or None with the problem shown in the page."""
    try:
        sizes = sorted(set(options.parse_sizes(text, what="N grid")))
        options.check_sizes(sizes, data)
    except LensError as err:
        st.error(str(err))
        return None
    return sizes


def chart(fig, key: str, where=st) -> None:
    """A plotly figure, its PNG download (the camera in the figure's toolbar, rendered in the
    browser, named after the figure) and a button that downloads it as a self-contained HTML file."""
    where.plotly_chart(fig, key=key, config={"displaylogo": False, "toImageButtonOptions": dict(
        format="png", filename=key, scale=2)})
    where.download_button("figure (HTML)", fig.to_html(include_plotlyjs=True), file_name=f"{key}.html",
                          mime="text/html", key=f"{key}-download")


def table_download(frame, name: str, key: str, where=st) -> None:
    """A button that downloads a table as CSV."""
    where.download_button(f"{name} (CSV)", frame.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv",
                          key=key)

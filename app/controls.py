"""The lab's intervention controls, generated from the intervention registry's fields: a switch
per registered intervention, a widget per field (kind, range, default and help from its
:func:`~kernels.score_functions.param`)."""

from __future__ import annotations

import dataclasses

import streamlit as st

from kernels.score_functions import INTERVENTIONS, Intervention, Route
from lens.workbench import intervention_from_controls


def _widget(name: str, f: dataclasses.Field, n_layers: int, n_heads: int, off: bool):
    meta, key = f.metadata, f"lab-{name}-{f.name}"
    kind, label, help_ = meta.get("kind"), f"{name} {f.name}", meta.get("help")
    default = None if f.default is dataclasses.MISSING else f.default
    if kind in ("number", "per_layer", "per_head"):
        low, high, step = meta["control"]
        start = default if default is not None else (0.0 if kind == "per_head" else 1.0)
        if kind == "per_head":  # one value for every head in the lab
            return (float(st.slider(label + " (every head)", float(low), float(high), float(start), float(step),
                                    key=key, help=help_, disabled=off)),) * n_heads
        return float(st.slider(label, float(low), float(high), float(min(max(start, low), high)), float(step),
                               key=key, help=help_, disabled=off))
    if kind == "int":
        low, high, step = meta["control"]
        high = n_layers - (2 if name == "route" else 1) if high is None else high
        if high - low > 1000:
            return int(st.number_input(label, low, high, 16, key=key, help=help_, disabled=off))
        return int(st.slider(label, low, high, min(16, high), step, key=key, help=help_, disabled=off))
    if kind == "ints":
        return tuple(st.multiselect(label, list(range(n_heads)), key=key, help=help_, disabled=off))
    if kind == "choice":
        return st.radio(label, list(meta["choices"]), horizontal=True, key=key, help=help_, disabled=off)
    first, last = st.slider(label, 0, n_layers - 1, (0, n_layers - 1), key=key, help=help_, disabled=off)
    return None if (first, last) == (0, n_layers - 1) else tuple(range(first, last + 1))  # layers


def intervention_controls(n_layers: int, n_heads: int) -> Intervention:
    """The sidebar's controls; the intervention they describe (an error shown and none applied
    when the values do not make one)."""
    chosen = {}
    order = sorted(INTERVENTIONS.items(), key=lambda item: item[1] is Route)  # score functions, then routing
    for name, cls in order:
        on = st.checkbox(name, key=f"lab-{name}", help=(cls.__doc__ or "").strip().splitlines()[0])
        values = {f.name: _widget(name, f, n_layers, n_heads, not on) for f in dataclasses.fields(cls)}
        empty = [k for k, v in values.items() if v == ()]  # e.g. no heads chosen: nothing to apply yet
        if on and empty:
            st.caption(f"{name}: choose its {', '.join(empty)} to apply it")
        elif on:
            chosen[name] = values
    try:
        return intervention_from_controls(chosen)
    except ValueError as err:
        st.error(str(err))
        return Intervention()


def default_grid(f: dataclasses.Field) -> str:
    """Four values across a parameter's control range (the parameter sweep's starting grid)."""
    low, high, step = f.metadata["control"]
    values = [low + (high - low) * x for x in (0.1, 0.3, 0.5, 0.8)]
    return ",".join(f"{round(v / step) * step:g}" for v in values)

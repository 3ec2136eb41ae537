"""The intervention spec grammar, read off the registry's fields.

``name:key=value,...`` joined with ``+``; per-layer values as ``s=0.4|0.5|...`` (by layer) or
``s=16:0.5|17:0.6`` (layer:value); ``layers=16|17`` restricts.  Every key, default and bound comes
from the registered dataclass's :func:`~kernels.score_functions.param` fields.
"""

from __future__ import annotations

import dataclasses
import math

from kernels.score_functions import INTERVENTIONS, Intervention, Route, as_intervention


class InterventionSpecError(ValueError):
    """A malformed intervention spec string."""


def spec_help() -> str:
    examples = ", ".join(f"'{cls.example}'" for cls in INTERVENTIONS.values())
    return (f"expected e.g. 'none', {examples}, joined with '+'; per-layer values as 's=0.4|0.5|...' (by layer) "
            "or 's=16:0.5|17:0.6' (layer:value); 'layers=16|17' restricts")


def parameter_fields() -> dict[str, dataclasses.Field]:
    """(intervention name, field name) -> field, for every parameter one number sets for the whole
    model (the lab's sweep)."""
    return {(name, f.name): f for name, cls in INTERVENTIONS.items() for f in dataclasses.fields(cls)
            if f.metadata.get("kind") in ("number", "per_layer")}


def _number(key: str, text: str, spec: str, meta: dict | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text!r} is not a number; {spec_help()}") from None
    if not math.isfinite(value):
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text!r} is not a finite number")
    meta = meta or {}
    if meta.get("positive") and value <= 0:
        raise InterventionSpecError(f"intervention {spec!r}: {key} must be > 0, got {text}")
    low, high = meta.get("bounds") or (-math.inf, math.inf)
    if not low <= value <= high:
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text} is outside {low:g}..{high:g}, "
                                    "where scores stay finite and meaningful")
    return value


def _ints(key: str, text: str, spec: str) -> tuple[int, ...]:
    values = [_number(key, item, spec) for item in text.split("|")]
    if any(v != int(v) for v in values):
        raise InterventionSpecError(f"intervention {spec!r}: {key} must be integers, got {text!r}")
    return tuple(int(v) for v in values)


def _per_layer(key: str, text: str, spec: str, meta: dict):
    if "|" not in text and ":" not in text:
        return _number(key, text, spec, meta)
    items = text.split("|")
    if all(":" in item for item in items):
        return {_ints("layer", layer, spec)[0]: _number(key, value, spec, meta)
                for layer, value in (item.split(":", 1) for item in items)}
    return tuple(_number(key, item, spec, meta) for item in items)


def parse_value(f: dataclasses.Field, text: str, spec: str):
    """One field's value from its spec text, by the field's kind."""
    kind, meta = f.metadata.get("kind", "number"), f.metadata
    if kind == "number":
        return _number(f.name, text, spec, meta)
    if kind == "per_layer":
        return _per_layer(f.name, text, spec, meta)
    if kind == "per_head":
        return tuple(_number(f.name, item, spec, meta) for item in text.split("|"))
    if kind == "int":
        return _ints(f.name, text, spec)[0]
    if kind in ("ints", "layers"):
        return _ints(f.name, text, spec)
    return text  # choice: the type's own check names the choices


def _build(name: str, args: dict[str, str], spec: str):
    cls = INTERVENTIONS.get(name)
    if name == "none":
        return None
    if cls is None:
        raise InterventionSpecError(f"intervention {spec!r}: unknown intervention {name!r}; {spec_help()}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(args) - set(fields)
    if unknown:
        raise InterventionSpecError(f"intervention {spec!r}: {name} takes {sorted(fields)}, not {sorted(unknown)}")
    missing = {n for n, f in fields.items() if f.default is dataclasses.MISSING} - set(args)
    if missing:
        raise InterventionSpecError(f"intervention {spec!r}: {name} needs {sorted(missing)}, e.g. {cls.example}")
    values = {key: parse_value(fields[key], text, spec) for key, text in args.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise InterventionSpecError(f"intervention {spec!r}: {err}") from None


def parse_intervention(spec: str) -> Intervention:
    """Parse one intervention spec string (``a+b+...``) into an :class:`Intervention`."""
    spec = spec.strip()
    if not spec:
        raise InterventionSpecError(f"empty intervention spec; {spec_help()}")
    parts = []
    for part in spec.split("+"):
        name, _, arg_text = part.strip().partition(":")
        args: dict[str, str] = {}
        for item in filter(None, arg_text.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise InterventionSpecError(f"intervention {spec!r}: {item!r} is not key=value; {spec_help()}")
            args[key.strip()] = value.strip()
        parts.append(_build(name.strip(), args, spec))
    if sum(isinstance(p, Route) for p in parts) > 1:
        raise InterventionSpecError(f"intervention {spec!r}: at most one route per intervention")
    out = Intervention()
    for p in parts:
        out = out + p
    return out


def _check_layers(what: str, layers, n_layers: int) -> None:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InterventionSpecError(f"{what}: layer {bad[0]} does not exist; this model has layers 0..{n_layers - 1}")


def validate_for_model(intervention, n_layers: int, n_heads: int) -> None:
    """Refuse an intervention that names layers or heads the model does not have (it would be a
    silent no-op under the intervention's label).  A route's layer is checked by the runner,
    which says why it must be below the last."""
    score = as_intervention(intervention).score
    if score is None:
        return
    for part in getattr(score, "parts", (score,)):
        if not dataclasses.is_dataclass(part):
            continue
        what = f"intervention {part.spec()!r}"
        for f in dataclasses.fields(part):
            value, kind = getattr(part, f.name), f.metadata.get("kind")
            if value is None:
                continue
            if kind == "layers" or (kind == "int" and f.name == "layer"):
                _check_layers(what, value if kind == "layers" else [value], n_layers)
            elif kind == "per_layer" and isinstance(value, dict):
                _check_layers(what, value, n_layers)
            elif kind == "per_layer" and isinstance(value, tuple) and len(value) > n_layers:
                raise InterventionSpecError(f"{what}: {len(value)} per-layer values for a {n_layers}-layer model")
            elif kind == "per_head" and len(value) > n_heads:
                raise InterventionSpecError(f"{what}: {len(value)} per-head values for layers of {n_heads} heads")
            elif kind == "ints" and f.name == "heads":
                bad = [h for h in value if not 0 <= h < n_heads]
                if bad:
                    raise InterventionSpecError(f"{what}: head {bad[0]} does not exist; layers have heads 0..{n_heads - 1}")

"""Interventions as small pure functions over pre-softmax attention scores.

A score function maps scores (scaled q.k, before the mask) to new scores, FlexAttention
`score_mod`-style, given a :class:`ScoreContext` saying where it is applied.  Scores have the
head axis third from the end: ``[..., head, query, key]``.  A score function may also add a
*sink*: an extra softmax-denominator term ``exp(b)`` that has no value vector.

The same objects drive the hooked model (dense path), the corpus kernels, the CLI and the app.
They compose with ``+`` (applied left to right); sinks of a composition add up in the
denominator (their logits combine by logaddexp) and are not transformed by the other
functions: ``b`` is in the units of the final scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScoreContext:
    """Where a score function is being applied.

    ``n_keys`` is the number of keys each query row attends to (mask included), shaped to
    broadcast against ``[..., head, query, key]`` scores (e.g. ``[1, Q, 1]``) or a plain int.
    ``key_doc`` gives the document index of each key in view (-1: instruction or query
    tokens); ``None`` where there are no documents (an ordinary causal prompt).
    """

    layer: int
    n_heads: int
    n_keys: Tensor | int
    n_docs: int = 0
    key_doc: Tensor | None = None


def _layer_value(value: float | Sequence[float] | dict, layer: int) -> float | None:
    """A per-layer parameter: one float for every layer, a sequence indexed by layer or a
    {layer: value} dict (layers missing from the dict are left alone)."""
    if isinstance(value, dict):
        return value.get(layer)
    if isinstance(value, (list, tuple)):
        return value[layer] if layer < len(value) else None
    return float(value)


class ScoreFunction:
    """Identity; the base of every intervention."""

    name = "none"

    def __call__(self, scores: Tensor, ctx: ScoreContext) -> Tensor:
        return scores

    def sink_logit(self, ctx: ScoreContext) -> Tensor | None:
        """Log of the extra denominator term per head, ``[head, 1, 1]``, or None."""
        return None

    def row_scale(self, ctx: ScoreContext) -> Tensor | None:
        """If this function only multiplies each (head, query row)'s scores by one number, that
        number as ``[head, Q, 1]`` (so kernels can fold it into the query and use a fused
        attention kernel); None otherwise.  Subclasses that change scores must override it."""
        return torch.ones(ctx.n_heads, 1, 1) if type(self) is ScoreFunction else None

    def first_layer(self) -> int:
        """The first layer whose attention this function may change: the layers before it run as
        without it (the engine reuses a plain run's states for them).  Subclasses that touch only
        some layers say which; the default, 0, is always safe."""
        return 0

    def __add__(self, other: "ScoreFunction") -> "ScoreFunction":
        return Compose([self, other])

    def __repr__(self) -> str:
        return self.spec()

    def spec(self) -> str:
        return self.name


@dataclass(repr=False)
class Compose(ScoreFunction):
    parts: list[ScoreFunction] = field(default_factory=list)

    def __post_init__(self):
        flat: list[ScoreFunction] = []
        for part in self.parts:
            flat.extend(part.parts if isinstance(part, Compose) else [part])
        self.parts = [p for p in flat if type(p) is not ScoreFunction]

    def __call__(self, scores, ctx):
        for part in self.parts:
            scores = part(scores, ctx)
        return scores

    def row_scale(self, ctx):
        out = torch.ones(ctx.n_heads, 1, 1)
        for part in self.parts:
            scale = part.row_scale(ctx)
            if scale is None:
                return None
            out = out * scale
        return out

    def sink_logit(self, ctx):
        logits = [s for s in (p.sink_logit(ctx) for p in self.parts) if s is not None]
        if not logits:
            return None
        out = logits[0]
        for s in logits[1:]:
            out = torch.logaddexp(out, s)
        return out

    def first_layer(self):
        return min((p.first_layer() for p in self.parts), default=0)

    def spec(self):
        return "+".join(p.spec() for p in self.parts) or "none"


@dataclass(repr=False)
class Temperature(ScoreFunction):
    """s -> s / t."""

    t: float
    layers: tuple[int, ...] | None = None
    name = "temperature"

    def __post_init__(self):
        if not self.t > 0:
            raise ValueError(f"temperature t must be > 0, got {self.t}")

    def __call__(self, scores, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return scores
        return scores / self.t

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return _first_of(self.layers, None)

    def spec(self):
        return f"temperature:t={_number_spec(self.t)}" + _layers_spec(self.layers)


@dataclass(repr=False)
class SSMax(ScoreFunction):
    """Scalable softmax: s -> s_L * log(n) * s.

    ``s`` is one float, a per-layer sequence or a {layer: s_L} dict.  ``n`` is the number of
    keys each query row attends (``n="keys"``) or the number of documents N (``n="docs"``).
    """

    s: float | Sequence[float] | dict = 0.43
    n: str = "keys"
    layers: tuple[int, ...] | None = None
    name = "ssmax"

    def __post_init__(self):
        if self.n not in ("keys", "docs"):
            raise ValueError(f"ssmax n must be 'keys' or 'docs', got {self.n!r}")

    def __call__(self, scores, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return scores
        s_layer = _layer_value(self.s, ctx.layer)
        if s_layer is None:
            return scores
        if self.n == "docs":
            if ctx.n_docs < 1:
                return scores  # no documents in view (an ordinary prompt): nothing to scale by
            log_n = math.log(ctx.n_docs)
        else:
            n = ctx.n_keys
            log_n = torch.log(n.to(scores.dtype)) if isinstance(n, Tensor) else math.log(n)
        return scores * (s_layer * log_n)

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return _first_of(self.layers, self.s)

    def spec(self):
        return f"ssmax:s={_value_spec(self.s)},n={self.n}" + _layers_spec(self.layers)


@dataclass(repr=False)
class Sink(ScoreFunction):
    """Additive sink: an extra exp(b_L) in the softmax denominator, with no value."""

    b: float | Sequence[float] | dict = 0.0
    layers: tuple[int, ...] | None = None
    name = "sink"

    def sink_logit(self, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return None
        b = _layer_value(self.b, ctx.layer)
        if b is None:
            return None
        return torch.full((ctx.n_heads, 1, 1), float(b))

    def row_scale(self, ctx):
        return torch.ones(ctx.n_heads, 1, 1)

    def first_layer(self):
        return _first_of(self.layers, self.b)

    def spec(self):
        return f"sink:b={_value_spec(self.b)}" + _layers_spec(self.layers)


@dataclass(repr=False)
class HeadScale(ScoreFunction):
    """Multiply the scores of chosen (layer, head) pairs by ``factor``.

    factor > 1 sharpens those heads' patterns, < 1 flattens them, 0 makes them uniform."""

    layer: int
    heads: tuple[int, ...]
    factor: float
    name = "scale-heads"

    def __call__(self, scores, ctx):
        if ctx.layer != self.layer:
            return scores
        bad = [h for h in self.heads if not 0 <= h < ctx.n_heads]
        if bad:
            raise ValueError(f"scale-heads: heads {bad} out of range for a layer of {ctx.n_heads} heads")
        factor = torch.ones(ctx.n_heads, dtype=scores.dtype, device=scores.device)
        factor[list(self.heads)] = self.factor
        return scores * factor.view(-1, 1, 1)

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return self.layer

    def spec(self):
        return f"scale-heads:layer={self.layer},heads={'|'.join(map(str, self.heads))},factor={_number_spec(self.factor)}"


@dataclass(repr=False)
class Route(ScoreFunction):
    """Top-B document routing.  At ``layer`` each document is scored by QK-MaxSim (the max over
    its tokens of the scaled q.k, before other interventions), reduced over the query tokens by
    max and over heads by ``reduce`` (max or mean); layers after ``layer`` attend only to the
    top ``B`` documents (plus instruction and query).  Not a change of scores: the engine reads
    it off the score function (``find_route``) and passes the kept documents to the kernel."""

    layer: int
    B: int
    reduce: str = "max"
    name = "route"

    def __post_init__(self):
        if self.B < 1:
            raise ValueError(f"route B must be >= 1, got {self.B}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"route reduce must be 'max' or 'mean', got {self.reduce!r}")

    def row_scale(self, ctx):
        return torch.ones(ctx.n_heads, 1, 1)

    def scores(self, route_max: Tensor) -> Tensor:
        """Document routing scores [N] from raw per-document maxima over query tokens [head, N]."""
        return route_max.amax(0) if self.reduce == "max" else route_max.mean(0)

    def first_layer(self):
        return self.layer  # decides there, from that layer's (unchanged) scores

    def spec(self):
        return f"route:layer={self.layer},B={self.B}" + ("" if self.reduce == "max" else f",reduce={self.reduce}")


def find_route(score_fn: ScoreFunction | None) -> Route | None:
    parts = score_fn.parts if isinstance(score_fn, Compose) else [score_fn]
    routes = [p for p in parts if isinstance(p, Route)]
    if len(routes) > 1:
        raise ValueError("only one route per intervention")
    return routes[0] if routes else None


def _first_of(layers, value) -> int:
    """First layer touched given a ``layers`` restriction and a value that may be per layer: a
    {layer: value} dict touches only its keys; anything else every layer it is not restricted from."""
    firsts = []
    if layers is not None:
        firsts.append(min(layers, default=0))
    if isinstance(value, dict):
        firsts.append(min(value, default=0))
    return max(firsts, default=0)


def _number_spec(value: float) -> str:
    """``%g`` without a '+' (the composition separator): 1e+09 -> 1e09, which parses back."""
    return f"{value:g}".replace("e+", "e")


def _value_spec(value) -> str:
    if isinstance(value, dict):
        return "|".join(f"{k}:{_number_spec(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "|".join(_number_spec(v) for v in value)
    return _number_spec(value)


def _layers_spec(layers):
    return "" if layers is None else ",layers=" + "|".join(map(str, layers))


def apply_score_function(
    scores: Tensor, score_fn: ScoreFunction | None, ctx: ScoreContext
) -> tuple[Tensor, Tensor | None]:
    """Scores after the intervention, and its sink logit (or None)."""
    if score_fn is None:
        return scores, None
    return score_fn(scores, ctx), score_fn.sink_logit(ctx)


class InterventionSpecError(ValueError):
    """A malformed intervention spec string."""


_SPEC_HELP = (
    "expected e.g. 'none', 'temperature:t=0.5', 'ssmax:s=0.43[,n=keys|docs]', 'sink:b=4', "
    "'scale-heads:layer=19,heads=3|7,factor=2', 'route:layer=16,B=256[,reduce=max|mean]', joined with '+'; per-layer values as "
    "'s=0.4|0.5|...' (by layer) or 's=16:0.5|17:0.6' (layer:value); 'layers=16|17' restricts"
)


# the largest magnitudes a parameter may take: beyond them scores overflow (exp) or every row is
# flat or one-hot to the last bit, so a result would be an artefact of the number format
PARAMETER_BOUNDS = {"t": (1e-3, 1e3), "s": (0.0, 100.0), "b": (-1e30, 1e30), "factor": (-1e3, 1e3)}


def _parse_number(key: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text!r} is not a number; {_SPEC_HELP}") from None
    if not math.isfinite(value):
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text!r} is not a finite number")
    low, high = PARAMETER_BOUNDS.get(key, (-math.inf, math.inf))
    if key in ("t", "s") and value <= 0:
        raise InterventionSpecError(f"intervention {spec!r}: {key} must be > 0, got {text}")
    if not low <= value <= high:
        raise InterventionSpecError(f"intervention {spec!r}: {key}={text} is outside {low:g}..{high:g}, "
                                    "where scores stay finite and meaningful")
    return value


def _parse_per_layer(key: str, text: str, spec: str):
    if "|" not in text and ":" not in text:
        return _parse_number(key, text, spec)
    items = text.split("|")
    if all(":" in item for item in items):
        out = {}
        for item in items:
            layer, value = item.split(":", 1)
            out[_parse_int_list("layer", layer, spec)[0]] = _parse_number(key, value, spec)
        return out
    return tuple(_parse_number(key, item, spec) for item in items)


def _parse_int_list(key: str, text: str, spec: str) -> tuple[int, ...]:
    values = [_parse_number(key, item, spec) for item in text.split("|")]
    if any(v != int(v) for v in values):
        raise InterventionSpecError(f"intervention {spec!r}: {key} must be integers, got {text!r}")
    return tuple(int(v) for v in values)


def parse_intervention(spec: str) -> ScoreFunction:
    """Parse one intervention spec string (``a+b+...``) into a composed score function."""
    spec = spec.strip()
    if not spec:
        raise InterventionSpecError(f"empty intervention spec; {_SPEC_HELP}")
    parts = []
    for part in spec.split("+"):
        name, _, arg_text = part.strip().partition(":")
        args: dict[str, str] = {}
        for item in filter(None, arg_text.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not value:
                raise InterventionSpecError(f"intervention {spec!r}: {item!r} is not key=value; {_SPEC_HELP}")
            args[key.strip()] = value.strip()
        parts.append(_build(name.strip(), args, spec))
    if sum(isinstance(p, Route) for p in parts) > 1:
        raise InterventionSpecError(f"intervention {spec!r}: at most one route per intervention")
    return parts[0] if len(parts) == 1 else Compose(parts)


def _check_layers(what: str, layers, n_layers: int) -> None:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InterventionSpecError(f"{what}: layer {bad[0]} does not exist; this model has layers 0..{n_layers - 1}")


def validate_for_model(score_fn: ScoreFunction | None, n_layers: int, n_heads: int) -> None:
    """Refuse an intervention that names layers or heads the model does not have (it would be a
    silent no-op under the intervention's label)."""
    if score_fn is None:
        return
    for part in score_fn.parts if isinstance(score_fn, Compose) else [score_fn]:
        what = f"intervention {part.spec()!r}"
        if getattr(part, "layers", None) is not None:
            _check_layers(what, part.layers, n_layers)
        for name in ("s", "b"):
            value = getattr(part, name, None)
            if isinstance(value, dict):
                _check_layers(what, value, n_layers)
            elif isinstance(value, (list, tuple)) and len(value) > n_layers:
                raise InterventionSpecError(f"{what}: {len(value)} per-layer values for a {n_layers}-layer model")
        if isinstance(part, HeadScale):
            _check_layers(what, [part.layer], n_layers)
            bad = [h for h in part.heads if not 0 <= h < n_heads]
            if bad:
                raise InterventionSpecError(f"{what}: head {bad[0]} does not exist; layers have heads 0..{n_heads - 1}")
        # a route's layer is checked by the engine, which says why it must be below the last


def _build(name: str, args: dict[str, str], spec: str) -> ScoreFunction:
    allowed = {
        "none": set(), "temperature": {"t", "layers"}, "ssmax": {"s", "n", "layers"},
        "sink": {"b", "layers"}, "scale-heads": {"layer", "heads", "factor"}, "route": {"layer", "B", "reduce"},
    }
    if name not in allowed:
        raise InterventionSpecError(f"intervention {spec!r}: unknown intervention {name!r}; {_SPEC_HELP}")
    unknown = set(args) - allowed[name]
    if unknown:
        raise InterventionSpecError(
            f"intervention {spec!r}: {name} takes {sorted(allowed[name]) or 'no arguments'}, not {sorted(unknown)}"
        )
    layers = _parse_int_list("layers", args["layers"], spec) if "layers" in args else None
    try:
        if name == "none":
            return ScoreFunction()
        if name == "temperature":
            return Temperature(_parse_number("t", args.get("t", "1"), spec), layers=layers)
        if name == "ssmax":
            return SSMax(_parse_per_layer("s", args.get("s", "0.43"), spec), n=args.get("n", "keys"), layers=layers)
        if name == "sink":
            return Sink(_parse_per_layer("b", args.get("b", "0"), spec), layers=layers)
        if name == "route":
            missing = {"layer", "B"} - set(args)
            if missing:
                raise InterventionSpecError(f"intervention {spec!r}: route needs {sorted(missing)}, e.g. route:layer=16,B=256")
            return Route(_parse_int_list("layer", args["layer"], spec)[0], _parse_int_list("B", args["B"], spec)[0],
                         args.get("reduce", "max"))
        missing = {"layer", "heads", "factor"} - set(args)
        if missing:
            raise InterventionSpecError(f"intervention {spec!r}: scale-heads needs {sorted(missing)}")
        return HeadScale(
            layer=_parse_int_list("layer", args["layer"], spec)[0],
            heads=_parse_int_list("heads", args["heads"], spec),
            factor=_parse_number("factor", args["factor"], spec),
        )
    except ValueError as err:
        if isinstance(err, InterventionSpecError):
            raise
        raise InterventionSpecError(f"intervention {spec!r}: {err}") from None

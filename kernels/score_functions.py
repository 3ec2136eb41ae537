"""Interventions as small pure functions over pre-softmax attention scores, and routing beside them.

A score function maps scores (scaled q.k, before the mask) to new scores, FlexAttention
`score_mod`-style, given a :class:`ScoreContext` saying where it is applied.  Scores have the
head axis third from the end: ``[..., head, query, key]``.  A score function may also add a
*sink*: an extra softmax-denominator term ``exp(b)`` that has no value vector.

Score functions are frozen dataclasses (hashable: the app caches on them) registered by name
with :func:`register`; their fields, declared with :func:`param`, are the spec grammar
(:mod:`kernels.spec`), the defaults, the help text and the app's controls.  The types live in
:mod:`kernels.interventions`.  They compose with ``+`` (applied left to right); sinks of a
composition add up in the denominator (their logits combine by logaddexp) and are not
transformed by the other functions: ``b`` is in the units of the final scores.

Routing (:class:`Route`, top-B documents) is not a change of scores: it is a policy beside the
score function, and an :class:`Intervention` holds one of each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

INTERVENTIONS: dict[str, type] = {}  # spec name -> type, in registration order (the app shows them so)


def register(name: str, example: str):
    """Class decorator: a frozen dataclass score function (or the route) under spec ``name``;
    ``example`` is a spec that parses (help texts show it)."""
    def wrap(cls):
        cls.name, cls.example = name, example
        INTERVENTIONS[name] = cls
        return cls
    return wrap


def param(default: Any = dataclasses.MISSING, *, help: str, kind: str = "number", bounds: tuple | None = None,
          positive: bool = False, choices: tuple | None = None, control: tuple | None = None, quiet: bool = False):
    """A field of an intervention: its spec key is the field name.  ``kind``: number, per_layer
    (one float, per-layer values 'a|b|...' or 'layer:value|...'), per_head (floats 'a|b|...', one
    per head), int, ints ('3|7'), choice, or layers (an optional restriction to some layers).  ``bounds``: where scores stay finite and
    meaningful; ``control``: the app's (low, high, step) for a slider; ``quiet``: left out of
    the label while at its default."""
    meta = dict(help=help, kind=kind, bounds=bounds, positive=positive, choices=choices, control=control, quiet=quiet)
    return field(default=default, metadata=meta)


class LayerValues(dict):
    """A {layer: value} parameter, immutable and hashable (a score function is)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _refuse(self, *args, **kwargs):
        raise TypeError("per-layer values are immutable")

    __setitem__ = __delitem__ = update = pop = clear = setdefault = _refuse


def freeze(value):
    """Lists become tuples and dicts :class:`LayerValues`: what a frozen field may hold."""
    if isinstance(value, dict) and not isinstance(value, LayerValues):
        return LayerValues(value)
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class ScoreContext:
    """Where a score function is being applied.

    ``n_keys`` is the number of keys each query row attends to (mask included), shaped to
    broadcast against ``[..., head, query, key]`` scores (e.g. ``[1, Q, 1]``) or a plain int.
    ``key_doc`` gives the document index of each key in view (-1: instruction or query
    tokens); ``None`` where there are no documents (an ordinary causal prompt).  ``mask`` (dense
    paths: which keys each row attends, broadcasting against the scores) and ``row_entropy``
    (streaming paths: each row's attention entropy, ``[head, Q, 1]``, from a first pass) serve
    score functions that depend on the whole row (adaptive temperature).
    """

    layer: int
    n_heads: int
    n_keys: Tensor | int
    n_docs: int = 0
    key_doc: Tensor | None = None
    mask: Tensor | None = None
    row_entropy: Tensor | None = None


def layer_value(value: float | Sequence[float] | dict, layer: int) -> float | None:
    """A per-layer parameter: one float for every layer, a sequence indexed by layer or a
    {layer: value} dict (layers missing from the dict are left alone)."""
    if isinstance(value, dict):
        return value.get(layer)
    if isinstance(value, (list, tuple)):
        return value[layer] if layer < len(value) else None
    return float(value)


def first_of(layers, value) -> int:
    """First layer touched given a ``layers`` restriction and a value that may be per layer: a
    {layer: value} dict touches only its keys; anything else every layer it is not restricted from."""
    firsts = []
    if layers is not None:
        firsts.append(min(layers, default=0))
    if isinstance(value, dict):
        firsts.append(min(value, default=0))
    return max(firsts, default=0)


def format_number(value: float) -> str:
    """``%g`` without a '+' (the composition separator): 1e+09 -> 1e09, which parses back."""
    return f"{value:g}".replace("e+", "e")


def format_value(value, kind: str = "number") -> str:
    """A field's value as the spec writes it (numbers by :func:`format_number`, ints plainly)."""
    number = format_number if kind in ("number", "per_layer", "per_head") else str
    if isinstance(value, dict):
        return "|".join(f"{k}:{number(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "|".join(map(number, value))
    return number(value)


class Spec:
    """The label of a registered dataclass, from its fields: ``name:key=value,...``."""

    name = "none"

    def spec(self) -> str:
        if not dataclasses.is_dataclass(self):
            return self.name
        items = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.metadata.get("quiet") and value == f.default):
                continue
            items.append(f"{f.name}={format_value(value, f.metadata.get('kind', 'number'))}")
        return self.name + (":" + ",".join(items) if items else "")

    def __repr__(self) -> str:
        return self.spec()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, freeze(getattr(self, f.name)))


class ScoreFunction(Spec):
    """Identity; the base of every intervention."""

    needs_entropy = False  # True: needs each row's entropy (streaming paths run a first pass for it)

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

    def __add__(self, other):
        if isinstance(other, (Route, Intervention)):
            return as_intervention(self) + other
        return Compose((self, other))

    # the identity is equal to any identity; a subclass that is not a dataclass, to itself
    def __eq__(self, other):
        return type(self) is type(other) if type(self) is ScoreFunction else self is other

    def __hash__(self):
        return hash(type(self)) if type(self) is ScoreFunction else id(self)


@dataclass(frozen=True, repr=False)
class Compose(ScoreFunction):
    parts: tuple = ()

    def __post_init__(self):
        flat: list[ScoreFunction] = []
        for part in self.parts:
            flat.extend(part.parts if isinstance(part, Compose) else [part])
        object.__setattr__(self, "parts", tuple(p for p in flat if type(p) is not ScoreFunction))

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

    @property
    def needs_entropy(self):
        return any(p.needs_entropy for p in self.parts)

    def spec(self):
        return "+".join(p.spec() for p in self.parts) or "none"


def entropy_probe(fn: ScoreFunction | None, layer: int) -> ScoreFunction | None:
    """For a score function that needs each row's entropy at ``layer``: the function whose row
    entropy it needs (the parts composed before it; the identity when it comes first).  None when
    nothing needs it at this layer."""
    parts = fn.parts if isinstance(fn, Compose) else (() if fn is None else (fn,))
    for i, part in enumerate(parts):
        if part.needs_entropy and part.applies_at(layer):
            return Compose(parts[:i]) if i else ScoreFunction()
    return None


@register("route", "route:layer=16,B=256")
@dataclass(frozen=True, repr=False)
class Route(Spec):
    """Top-B document routing.  At ``layer`` each document is scored by QK-MaxSim (the max over
    its tokens of the scaled q.k, before other interventions) or, ``by="mean-key"``, by q times
    the mean of its keys (MoBA-style block selection), reduced over the query tokens by max, or,
    ``by="chunk-mean"``, by the best of its chunks of ``chunk`` keys, each scored by the readout
    token's q times the chunk's mean key; then over heads by ``reduce`` (max or mean); layers
    after ``layer`` attend only to the top ``B`` documents (plus instruction and query)."""

    layer: int = param(help="the layer whose scores choose the documents", kind="int", control=(0, None, 1))
    B: int = param(help="documents kept", kind="int", control=(1, 100_000, 1))
    reduce: str = param("max", help="reduction over heads", kind="choice", choices=("max", "mean"), quiet=True)
    by: str = param("maxsim", help="document score: maxsim (max of q.k over its keys), mean-key (q . mean K, MoBA) "
                    "or chunk-mean (best q . mean K over chunks of `chunk` keys, the readout token's q)",
                    kind="choice", choices=("maxsim", "mean-key", "chunk-mean"), quiet=True)
    chunk: int = param(16, help="keys per chunk (by=chunk-mean)", kind="int", control=(1, 512, 1), quiet=True)

    def __post_init__(self):
        super().__post_init__()
        if self.B < 1:
            raise ValueError(f"route B must be >= 1, got {self.B}")
        if self.reduce not in ("max", "mean"):
            raise ValueError(f"route reduce must be 'max' or 'mean', got {self.reduce!r}")
        if self.by not in ("maxsim", "mean-key", "chunk-mean"):
            raise ValueError(f"route by must be 'maxsim', 'mean-key' or 'chunk-mean', got {self.by!r}")
        if self.chunk < 1:
            raise ValueError(f"route chunk must be >= 1 keys, got {self.chunk}")
        if self.chunk != 16 and self.by != "chunk-mean":
            raise ValueError(f"route chunk={self.chunk} applies to by=chunk-mean only (by={self.by})")

    def scores(self, route_max: Tensor) -> Tensor:
        """Document routing scores [N] from raw per-document maxima over query tokens [head, N]."""
        return route_max.amax(0) if self.reduce == "max" else route_max.mean(0)

    def keep(self, route_max: Tensor, n_docs: int) -> Tensor:
        """bool [N]: the top-B documents by :meth:`scores` of per-head document scores [head, N]
        (the statistic ``by`` names: ``result.route_max`` or ``result.route_mean``)."""
        keep = torch.zeros(n_docs, dtype=torch.bool)
        keep[self.scores(route_max).topk(min(self.B, n_docs)).indices] = True
        return keep

    def document_scores(self, result) -> Tensor:
        """The per-head document scores this route ranks by, from a corpus-attention result."""
        if self.by == "chunk-mean":
            return result.route_chunk[self.chunk]
        return result.route_max if self.by == "maxsim" else result.route_mean

    def first_layer(self) -> int:
        return self.layer  # decides there, from that layer's (unchanged) scores

    def __add__(self, other):
        return as_intervention(self) + other


@dataclass(frozen=True)
class Intervention:
    """What a query runs under: a score function and a routing policy, either may be absent."""

    score: ScoreFunction | None = None
    route: Route | None = None

    def spec(self) -> str:
        parts = ([self.score.spec()] if self.score is not None else []) + ([self.route.spec()] if self.route else [])
        return "+".join(parts) or "none"

    def first_layer(self) -> int:
        firsts = ([self.score.first_layer()] if self.score is not None else []) + ([self.route.layer] if self.route else [])
        return min(firsts, default=0)

    def __add__(self, other) -> "Intervention":
        other = as_intervention(other)
        if self.route is not None and other.route is not None:
            raise ValueError("only one route per intervention")
        score = self.score if other.score is None else other.score if self.score is None else Compose((self.score, other.score))
        return Intervention(score, self.route or other.route)

    def __bool__(self) -> bool:
        return self.score is not None or self.route is not None

    def __repr__(self) -> str:
        return self.spec()


def as_intervention(value) -> Intervention:
    """None, a score function, a route or an intervention, as an :class:`Intervention`."""
    if value is None or isinstance(value, Intervention):
        return value or Intervention()
    if isinstance(value, Route):
        return Intervention(route=value)
    if isinstance(value, ScoreFunction):
        if type(value) is ScoreFunction or (isinstance(value, Compose) and not value.parts):
            return Intervention()
        return Intervention(score=value)
    raise TypeError(f"not an intervention: {value!r}")


def apply_score_function(
    scores: Tensor, score_fn: ScoreFunction | None, ctx: ScoreContext
) -> tuple[Tensor, Tensor | None]:
    """Scores after the intervention, and its sink logit (or None)."""
    if score_fn is None:
        return scores, None
    return score_fn(scores, ctx), score_fn.sink_logit(ctx)

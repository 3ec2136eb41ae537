"""The score-function interventions, one registered frozen dataclass each.

Adding one is this file plus its test: a ``@register``-ed dataclass whose ``param`` fields give
its spec keys, defaults, bounds, help and app controls, a ``__call__`` (and ``row_scale`` when it
only scales each query row, so kernels take the fused path), and ``first_layer`` when it leaves
the first layers alone.  The CLI's grammar, the sweep, the lab's controls and the docs' table
read it from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from kernels.score_functions import ScoreFunction, first_of, layer_value, param, register

PAPER_SSMAX_S = 0.43  # the BlockSearch paper's SSMax s (the default here and of the theory curves)
LAYERS = dict(help="restrict to these layers ('16|17'); all when absent", kind="layers")


def _log_n(ctx, dtype):
    """log of the keys each row attends: a tensor broadcasting over rows, or a float."""
    n = ctx.n_keys
    return torch.log(n.to(dtype)) if isinstance(n, torch.Tensor) else math.log(n)


@register("temperature", "temperature:t=0.5")
@dataclass(frozen=True, repr=False)
class Temperature(ScoreFunction):
    """s -> s / t."""

    t: float = param(1.0, help="temperature (s -> s/t)", bounds=(1e-3, 1e3), positive=True, control=(0.1, 4.0, 0.05))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    def __post_init__(self):
        super().__post_init__()
        if not self.t > 0:
            raise ValueError(f"temperature t must be > 0, got {self.t}")

    def __call__(self, scores, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return scores
        return scores / self.t

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return first_of(self.layers, None)


@register("ssmax", f"ssmax:s={PAPER_SSMAX_S}")
@dataclass(frozen=True, repr=False)
class SSMax(ScoreFunction):
    """Scalable softmax (arXiv 2501.19399): s -> s_L * log(n) * s.

    ``s`` is one float, a per-layer sequence or a {layer: s_L} dict.  ``n`` is the number of
    keys each query row attends (``n="keys"``) or the number of documents N (``n="docs"``).
    """

    s: float | Sequence[float] | dict = param(PAPER_SSMAX_S, help="s_L: one value, 'a|b|...' by layer or 'layer:value|...'",
                                              kind="per_layer", bounds=(0.0, 100.0), positive=True,
                                              control=(0.01, 1.5, 0.01))
    n: str = param("keys", help="n: keys attended or documents N", kind="choice", choices=("keys", "docs"))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    def __post_init__(self):
        super().__post_init__()
        if self.n not in ("keys", "docs"):
            raise ValueError(f"ssmax n must be 'keys' or 'docs', got {self.n!r}")

    def __call__(self, scores, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return scores
        s_layer = layer_value(self.s, ctx.layer)
        if s_layer is None:
            return scores
        if self.n == "docs":
            if ctx.n_docs < 1:
                return scores  # no documents in view (an ordinary prompt): nothing to scale by
            log_n = math.log(ctx.n_docs)
        else:
            log_n = _log_n(ctx, scores.dtype)
        return scores * (s_layer * log_n)

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return first_of(self.layers, self.s)


@register("sink", "sink:b=4")
@dataclass(frozen=True, repr=False)
class Sink(ScoreFunction):
    """Additive sink: an extra exp(b_L) in the softmax denominator, with no value."""

    b: float | Sequence[float] | dict = param(0.0, help="sink logit b_L (one value or per layer)", kind="per_layer",
                                              bounds=(-1e30, 1e30), control=(-10.0, 20.0, 0.5))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    def sink_logit(self, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return None
        b = layer_value(self.b, ctx.layer)
        if b is None:
            return None
        return torch.full((ctx.n_heads, 1, 1), float(b))

    def row_scale(self, ctx):
        return torch.ones(ctx.n_heads, 1, 1)

    def first_layer(self):
        return first_of(self.layers, self.b)


@register("scale-heads", "scale-heads:layer=19,heads=3|7,factor=2")
@dataclass(frozen=True, repr=False)
class HeadScale(ScoreFunction):
    """Multiply the scores of chosen (layer, head) pairs by ``factor``.

    factor > 1 sharpens those heads' patterns, < 1 flattens them, 0 makes them uniform."""

    layer: int = param(help="the layer", kind="int", control=(0, None, 1))
    heads: tuple[int, ...] = param(help="heads ('3|7')", kind="ints")
    factor: float = param(help="score factor", bounds=(-1e3, 1e3), control=(0.0, 4.0, 0.05))

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


@register("log-n", "log-n:train=512")
@dataclass(frozen=True, repr=False)
class LogN(ScoreFunction):
    """Qwen's log-n attention scaling: s -> s * max(1, log(n) / log(train)), n the keys a row
    attends and ``train`` the context length the model was trained at.  The identity up to
    ``train`` keys; beyond it, the longer the context the sharper the softmax."""

    train: float = param(4096.0, help="training context length L_train (keys)", bounds=(2.0, 1e9),
                         control=(2.0, 8192.0, 1.0))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    def __post_init__(self):
        super().__post_init__()
        if not self.train >= 2:
            raise ValueError(f"log-n train must be >= 2, got {self.train}")

    def __call__(self, scores, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return scores
        factor = _log_n(ctx, scores.dtype) / math.log(self.train)
        factor = factor.clamp(min=1.0) if isinstance(factor, torch.Tensor) else max(1.0, factor)
        return scores * factor

    def row_scale(self, ctx):
        return self(torch.ones(ctx.n_heads, 1, 1), ctx)

    def first_layer(self):
        return first_of(self.layers, None)


@register("head-sink", "head-sink:b=0|1|2")
@dataclass(frozen=True, repr=False)
class HeadSink(ScoreFunction):
    """A sink per head (gpt-oss style, off-by-one at b = 0): the softmax over [scores, b_h] with
    the sink column dropped, i.e. an extra exp(b_h) in head h's denominator, with no value.
    ``b`` gives one logit per head ('b0|b1|...'); heads beyond the list get none."""

    b: tuple[float, ...] = param(help="sink logit per head ('0|1.5|...'; 0: softmax1)", kind="per_head",
                                 bounds=(-1e30, 1e30), control=(-10.0, 20.0, 0.5))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.b, tuple):
            object.__setattr__(self, "b", (float(self.b),))

    def sink_logit(self, ctx):
        if self.layers is not None and ctx.layer not in self.layers:
            return None
        out = torch.full((ctx.n_heads, 1, 1), float("-inf"))
        n = min(len(self.b), ctx.n_heads)
        out[:n, 0, 0] = torch.tensor(self.b[:n], dtype=torch.float32)
        return out

    def row_scale(self, ctx):
        return torch.ones(ctx.n_heads, 1, 1)

    def first_layer(self):
        return first_of(self.layers, None)


# "Softmax is not enough" (arXiv 2410.01104), fig. 5: beta as a polynomial of the row's entropy,
# highest degree first (their fit, over the entropies of their tasks' attention rows)
ADAPTIVE_POLY = (-0.037, 0.481, -2.3, 4.917, -1.791)


def row_entropy(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Entropy (nats) of softmax over the last axis, keys outside ``mask`` left out: [..., 1]."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    p = torch.exp(scores - lse)
    return lse - torch.where(p > 0, p * scores, torch.zeros_like(scores)).sum(-1, keepdim=True)


@register("adaptive", "adaptive:h=0.5")
@dataclass(frozen=True, repr=False)
class AdaptiveTemperature(ScoreFunction):
    """Adaptive temperature (Velickovic et al., "Softmax is not enough", arXiv 2410.01104): a row
    whose attention entropy H exceeds ``h`` has its scores multiplied by beta = max(poly(H), 1)
    (``ADAPTIVE_POLY``, the paper's fit; never above the row's own temperature), else left alone.
    H is the row's entropy under the scores this function receives (the parts composed before it),
    over the keys the row attends; a streaming run takes it from a first pass over the corpus at
    each layer it applies to, so those layers read the corpus twice.  The fit's polynomial falls
    below 1 past H ~ 5.6 nats, so rows that flat (a corpus of thousands of documents) are left
    alone: the published function's own range."""

    h: float = param(0.5, help="entropy threshold (nats); rows at or below it are left alone", bounds=(0.0, 1e3),
                     control=(0.0, 6.0, 0.1))
    layers: tuple[int, ...] | None = param(None, **LAYERS)

    needs_entropy = True

    def applies_at(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def beta(self, entropy: Tensor) -> Tensor:
        poly = torch.zeros_like(entropy)
        for c in ADAPTIVE_POLY:
            poly = poly * entropy + c
        return torch.where(entropy > self.h, poly.clamp(min=1.0), torch.ones_like(entropy))

    def _entropy(self, scores, ctx):
        if ctx.row_entropy is not None:
            return ctx.row_entropy
        if ctx.mask is None:
            raise ValueError("adaptive temperature needs each row's entropy: give ScoreContext a mask (dense) "
                             "or row_entropy (streaming)")
        return row_entropy(scores.float(), ctx.mask)

    def __call__(self, scores, ctx):
        if not self.applies_at(ctx.layer):
            return scores
        return scores * self.beta(self._entropy(scores, ctx)).to(scores.dtype)

    def row_scale(self, ctx):
        if not self.applies_at(ctx.layer):
            return torch.ones(ctx.n_heads, 1, 1)
        return None if ctx.row_entropy is None else self.beta(ctx.row_entropy)

    def first_layer(self):
        return first_of(self.layers, None)

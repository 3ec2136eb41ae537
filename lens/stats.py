"""95% intervals for rates measured over queries.

A rate of yes/no outcomes (hit@k, R_sum, R_any, first-digit accuracy, routing recall) gets the
Wilson score interval; a mean of fractions (Recall@k with two gold documents takes 0, 0.5, 1) a
percentile bootstrap over queries with a fixed seed, so the same records always give the same
interval.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_mean(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if len(values) == 0:
        return (math.nan, math.nan)
    if np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    res = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                    method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def rate_interval(values: Iterable) -> tuple[float, float] | None:
    """The 95% interval of the mean of per-query values (NaN/None left out); None if none."""
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    if len(arr) == 0:
        return None
    if np.all((arr == 0) | (arr == 1)):
        return wilson(int(arr.sum()), len(arr))
    return bootstrap_mean(arr)


def format_rate(mean: float | None, interval: tuple[float, float] | None, n: int) -> str:
    """``0.62 [0.50, 0.73] (n=64)``: a rate with its interval and query count."""
    if mean is None or interval is None:
        return f"n/a (n={n})"
    return f"{mean:.2f} [{interval[0]:.2f}, {interval[1]:.2f}] (n={n})"

"""Intervals: Wilson against its closed form, the bootstrap deterministic, summaries carry both."""

import math

import numpy as np

from lens.stats import format_rate, rate_interval, wilson


def wilson_closed_form(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_equals_its_closed_form():
    for k, n in [(0, 8), (8, 10), (50, 100), (64, 64), (1, 3)]:
        assert np.allclose(wilson(k, n), wilson_closed_form(k, n), atol=1e-9)


def test_rates_of_fractions_use_a_seeded_bootstrap():
    values = [0, 0.5, 1, 1, 0.5, 0, 1, 0.5] * 8
    a, b = rate_interval(values), rate_interval(values)
    assert a == b and a[0] < np.mean(values) < a[1]
    assert rate_interval([1, 0, 1, None, float("nan")]) == wilson(2, 3)
    assert rate_interval([]) is None
    assert format_rate(0.5, (0.25, 0.75), 8) == "0.50 [0.25, 0.75] (n=8)"

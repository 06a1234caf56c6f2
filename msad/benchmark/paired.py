"""Paired comparisons over seeds: each seed trains both models, so the spread that the seed puts
into both (data order, initialisation, the CPU's rounding) cancels in their difference.

``paired_difference`` gives the mean difference, its sample std and a two-sided Student-t
interval; the t quantile is computed here (no SciPy) from the closed form of the t distribution's
CDF for whole degrees of freedom (Abramowitz & Stegun 26.7.3-4).
"""
import math
import statistics
from typing import Dict, Sequence


def t_cdf_central(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with `dof` (a whole number >= 1) degrees of freedom."""
    if dof < 1 or dof != int(dof):
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof == 1:
        return 2 * theta / math.pi
    # The series of 26.7.3 (odd dof) and 26.7.4 (even dof): (dof - 2) // 2 terms after the first.
    term, total = 1.0, 1.0
    start = 2 if dof % 2 else 1  # the ratios 2/3, 4/5, ... (odd) or 1/2, 3/4, ... (even)
    for k in range(start, dof - 1, 2):
        term *= k / (k + 1) * c * c
        total += term
    if dof % 2:
        return 2 / math.pi * (theta + s * c * total)
    return s * total


def t_quantile(confidence: float, dof: int) -> float:
    """The t such that P(|T| < t) = `confidence` (0.95 -> 2.776 for 4 degrees of freedom)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_cdf_central(hi, dof) < confidence:
        hi *= 2
    for _ in range(200):  # bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_central(mid, dof) < confidence else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: Sequence[float], b: Sequence[float], confidence=0.95) -> Dict:
    """Mean, sample std and `confidence` t-interval of a[i] - b[i] over the pairs.

    Returns ``{"n", "mean", "std", "low", "high", "differences"}``; with one pair, std and the
    interval are None (nothing to estimate the spread from).
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no pairs to compare")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    out = {"n": len(diffs), "mean": mean, "std": None, "low": None, "high": None,
           "differences": diffs}
    if len(diffs) > 1:
        std = statistics.stdev(diffs)
        half = t_quantile(confidence, len(diffs) - 1) * std / math.sqrt(len(diffs))
        out.update(std=std, low=mean - half, high=mean + half)
    return out


def verdict(summary: Dict) -> str:
    """How the interval reads: 'above 0', 'below 0' or 'includes 0' ('one seed' without one)."""
    if summary["low"] is None:
        return "one seed"
    if summary["low"] > 0:
        return "above 0"
    if summary["high"] < 0:
        return "below 0"
    return "includes 0"

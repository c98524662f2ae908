"""Accuracy against cost: which points are on the Pareto frontier, and the area under each
method's accuracy-FLOPs curve over a common FLOP window (docs/reproducing.md, Pareto).

A point is dominated when another costs no more and is no less accurate, and is strictly
better in one of the two. The area of a method is the integral of its accuracy, as a step
function of FLOPs (at each cost, the best accuracy the method reaches at that cost or
less), over the window ``[lo, hi]``, divided by the window's width: a mean accuracy over
the window, comparable between methods whatever their number of points.
"""
from __future__ import annotations

from collections.abc import Sequence


TIE = 1e-9  # accuracies closer than this are equal (means over seeds round differently)


def on_frontier(costs: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """For each point, whether no other point dominates it (lower cost is better)."""
    points = [(c, round(a / TIE) * TIE) for c, a in zip(costs, accuracies, strict=True)]
    flags = []
    for c, a in points:
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)
        flags.append(not dominated)
    return flags


def common_window(curves: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The FLOP range every curve covers: from the largest of the curves' cheapest costs
    to the smallest of their dearest; None when the ranges do not overlap."""
    curves = [c for c in curves if len(c)]
    if not curves:
        return None
    lo, hi = max(min(c) for c in curves), min(max(c) for c in curves)
    return (lo, hi) if lo < hi else None


def mean_accuracy_over(costs: Sequence[float], accuracies: Sequence[float],
                       window: tuple[float, float]) -> float | None:
    """The area under the best-accuracy-so-far step curve over ``window``, divided by the
    window's width; None when the method has no point at or below the window's start."""
    lo, hi = window
    order = sorted(zip(costs, accuracies, strict=True))
    if not order or order[0][0] > lo:
        return None
    area, best, x = 0.0, float("-inf"), lo
    for c, a in order:
        if c > lo:
            if c >= hi:
                break
            area += best * (c - x)
            x = c
        best = max(best, a)
    area += best * (hi - x)
    return area / (hi - lo)

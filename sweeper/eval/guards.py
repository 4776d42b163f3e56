"""The guards on a trial's evaluation: ``sweep.constraints``, the bounds its reported metrics must
keep (for Optuna's constrained samplers, TPESampler / GPSampler, through ``Trial.set_constraint``;
and for `sweeper best`), and the verdicts each evaluation leaves on the trial's MLflow run
(:func:`guard_tags`); and the collapse guard, the twin of the memorisation guard: an evaluation
whose samples are less varied than ``sweep.collapse`` allows (default ``diversity_px`` below 0.35,
:mod:`sweeper.eval.diversity`) marks the trial collapsed.

    collapse_text({"diversity_px": 0.16}, {"metric": "diversity_px", "min": 0.35})
    # 'diversity_px 0.16 < min 0.35'; '' when it holds; None when the metric was not reported

    constraints = {"memorized_frac": {"max": 0.2}}
    violations({"memorized_frac": 0.35}, constraints)   # [0.15]: > 0 violates, <= 0 holds
    violation_text({"memorized_frac": 0.35}, constraints)  # 'memorized_frac 0.35 > max 0.2'

One value per bound, in the order of the metric names (sorted), then ``max`` before ``min`` (named
``<metric>.<bound>`` for Optuna: :func:`sweeper.config.optuna_catalog.constraint_names`). A metric a
trial did not report violates its bounds (inf).

Why 0.35: the demo's collapsed trials (every sample the same blurred mean face) read pixel
diversity 0.14-0.18, and a retrained winner drawing visibly different faces 0.72 (issue 22's
measurements on 256 samples): 0.35 is about their geometric mean, twice the collapse and half the
varied. Pixels, not Inception features, because at 32 px Inception calls the mean face 0.59-0.77 as
varied as the data.
"""

from __future__ import annotations

import math
from typing import Any

from sweeper.keys import COLLAPSED_TAG, VIOLATES

BOUNDS = ("max", "min")


def _bounds(constraints: dict[str, dict[str, float]]):
    for metric in sorted(constraints):
        for bound in BOUNDS:
            if bound in constraints[metric]:
                yield metric, bound, float(constraints[metric][bound])


def violations(metrics: dict[str, Any], constraints: dict[str, dict[str, float]]) -> list[float]:
    """Optuna's constraint values: ``value - max`` and ``min - value`` (feasible when <= 0)."""
    out = []
    for metric, bound, limit in _bounds(constraints):
        value = metrics.get(metric)
        if not isinstance(value, (int, float)) or value != value:
            out.append(math.inf)
        else:
            out.append(float(value) - limit if bound == "max" else limit - float(value))
    return out


def violation_text(metrics: dict[str, Any], constraints: dict[str, dict[str, float]]) -> str:
    """The violated bounds in words (``''`` when every bound holds)."""
    parts = []
    for (metric, bound, limit), v in zip(_bounds(constraints), violations(metrics, constraints)):
        if v > 0:
            value = metrics.get(metric)
            shown = f"{float(value):.4g}" if isinstance(value, (int, float)) else "not reported"
            parts.append(f"{metric} {shown} {'>' if bound == 'max' else '<'} {bound} {limit:g}")
    return "; ".join(parts)


def collapse_text(metrics: dict[str, Any], collapse: dict[str, Any] | None) -> str | None:
    """The collapse verdict of one evaluation: the broken rule in words (``'diversity_px 0.16 < min
    0.35'``), ``''`` when the samples are varied enough, None when there is no rule (``collapse.min``
    null) or the evaluation did not report its metric (no samples yet, or the metric left out)."""
    if not collapse or collapse.get("min") is None:
        return None
    metric, limit = collapse["metric"], float(collapse["min"])
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or value != value:
        return None
    return f"{metric} {float(value):.3g} < min {limit:g}" if float(value) < limit else ""


def guard_tags(metrics: dict[str, Any], sweep: dict[str, Any]) -> dict[str, str]:
    """The run tags one evaluation's verdicts set: ``sweeper.violates`` (the broken bounds in words,
    ``""`` when all hold) when the sweep has ``constraints``; ``sweeper.collapsed`` (the broken
    collapse rule in words, ``""`` when varied) when the evaluation reported the rule's metric."""
    constraints = sweep.get("constraints")
    tags = {VIOLATES: violation_text(metrics, constraints)} if constraints else {}
    collapsed = collapse_text(metrics, sweep.get("collapse"))
    if collapsed is not None:
        tags[COLLAPSED_TAG] = collapsed
    return tags

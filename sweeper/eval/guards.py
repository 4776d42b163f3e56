"""The guards on a trial's evaluation: ``sweep.constraints``, the bounds its reported metrics must
keep (for Optuna's constrained samplers, TPESampler / GPSampler, through ``Trial.set_constraint``;
and for `sweeper best`), and the verdicts each evaluation leaves on the trial's MLflow run
(:func:`guard_tags`).

    constraints = {"memorized_frac": {"max": 0.2}}
    violations({"memorized_frac": 0.35}, constraints)   # [0.15]: > 0 violates, <= 0 holds
    violation_text({"memorized_frac": 0.35}, constraints)  # 'memorized_frac 0.35 > max 0.2'

One value per bound, in the order of the metric names (sorted), then ``max`` before ``min`` (named
``<metric>.<bound>`` for Optuna: :func:`sweeper.config.optuna_catalog.constraint_names`). A metric a trial did not report violates its bounds (inf).
"""

from __future__ import annotations

import math
from typing import Any

from sweeper.keys import VIOLATES

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


def guard_tags(metrics: dict[str, Any], sweep: dict[str, Any]) -> dict[str, str]:
    """The run tags one evaluation's verdicts set: ``sweeper.violates`` (the broken bounds in words,
    ``""`` when all hold) when the sweep has ``constraints``; none otherwise."""
    constraints = sweep.get("constraints")
    return {VIOLATES: violation_text(metrics, constraints)} if constraints else {}

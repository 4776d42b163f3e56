"""The metric registry: each evaluation metric is one small function over an evaluation context.

    @register_metric("distances")
    def distances(ctx) -> dict[str, float]:
        return {ctx.fd_name: ..., ctx.kd_name: ...}

    @register_metric("address_kl", family="my_vae")      # a family's own metric, in its file
    def address_kl(ctx): return {"address_kl": ctx.family.address_kl(ctx.real_images)}

The context (:class:`sweeper.evaluation.EvalContext`) holds what is computed once per evaluation:
the reference statistics, the generated features, nearest-training-image distances, the sample
grid, the family itself. A metric returns ``{name: float}`` (empty when it does not apply) and may
add pictures with ``ctx.add_artifact(path)``. ``eval.metrics`` picks metrics by name; ``null``
runs every registered metric that applies to the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sweeper.errors import SweeperError

MetricFn = Callable[[Any], dict[str, float]]


@dataclass(frozen=True)
class MetricEntry:
    name: str
    fn: MetricFn
    family: str | None  # None: every family


_METRICS: dict[str, MetricEntry] = {}


def register_metric(name: str, family: str | None = None) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        _METRICS[name] = MetricEntry(name, fn, family)
        return fn

    return deco


def registered() -> dict[str, MetricEntry]:
    import sweeper.evaluation  # noqa: F401  (registers the built-in metrics)

    return dict(_METRICS)


def metrics_for(family: str | None, selected: list[str] | None = None) -> list[MetricEntry]:
    """The metrics an evaluation of ``family`` runs: ``selected`` by name, or all that apply."""
    table = registered()
    if selected is None:
        return [m for m in table.values() if m.family in (None, family)]
    out = []
    for name in selected:
        if name not in table:
            raise SweeperError(f"eval.metrics: unknown metric {name!r}; registered: {', '.join(sorted(table))}")
        m = table[name]
        if m.family not in (None, family):
            raise SweeperError(f"eval.metrics: {name!r} belongs to the {m.family} family, not {family}; remove it")
        out.append(m)
    return out

"""Reading a sweep's trial runs back from MLflow: one :class:`TrialResult` per trial run
(final metric values, params, tags), and the sweep's parent run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sweeper.keys import REPLICATE_ROLE, ROLE, RUNNING, STATUS, SWEPT_TAG, TRIAL_TAG


def all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def parent_run(client, experiment_id: str):
    """The sweep's parent run (the newest one tagged ``sweeper.role=sweep``), or None."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = 'sweep'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


@dataclass
class TrialResult:
    """One trial's run as `sweeper best` sees it; ``metrics`` are final values (largest step);
    ``best`` is ``(value, step)`` of the ranking metric's best evaluation (filled by best_trials)."""

    run_id: str
    trial_id: str
    run_name: str
    status: str  # completed | pruned | failed | running
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    start_time: int = 0
    rank: int = 0
    step: int | None = None  # the step of the value it was ranked by (filled for the ranked)
    final_step: int | None = None  # the step of the ranking metric's final value (filled for the ranked)
    best: tuple[float, int] | None = None
    swept: list[str] = field(default_factory=list)
    se: float | None = None  # the standard error of the ranked value (filled for the ranked)
    splits: list[float] | None = None  # the ranked value on each split of the latent bank
    lead: Any = None  # sweeper.eval.uncertainty.Comparison  # this trial minus the next-ranked one, with its error
    reeval: Any = None  # a `sweeper best --reeval` result (sweeper.results.reeval.Reevaluated)


def trial_results(client, experiment_id: str) -> list[TrialResult]:
    """Every trial run of the experiment (runs carrying ``sweeper.trial_id``)."""
    out = []
    for r in all_runs(client, experiment_id):
        tags = r.data.tags
        if TRIAL_TAG not in tags or tags.get(ROLE) == REPLICATE_ROLE:  # replicates: sweeper.results.replicates
            continue
        swept = [k for k in tags.get(SWEPT_TAG, "").split(",") if k]
        out.append(TrialResult(run_id=r.info.run_id, trial_id=tags[TRIAL_TAG], run_name=r.info.run_name or "",
                               status=tags.get(STATUS, RUNNING), metrics=dict(r.data.metrics),
                               params=dict(r.data.params), tags=dict(tags), start_time=r.info.start_time or 0,
                               swept=swept))
    return out

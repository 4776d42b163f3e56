"""The sweep summary: counts by state and the best COMPLETE trial, read from the Optuna study."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from sweeper.keys import COLLAPSED_ATTR, COMPLETED, FAILED, FAIL_REASON, PRUNED, PRUNED_AT, PRUNE_REASON, RUNNING


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Counts by state and the best COMPLETE trial.

    >>> summarize(study)  # doctest: +SKIP
    {'trials': 8, 'completed': 5, 'pruned': 2, 'failed': 1, 'running': 0, 'waiting': 0,
     'direction': 'minimize', 'best': {'number': 3, 'value': 41.2, 'params': {...}},
     'pruned_trials': [{'number': 6, 'step': 400, 'reason': '...'}],
     'failed_trials': [{'number': 7, 'reason': '...'}],
     'collapsed_trials': [{'number': 2, 'rule': 'diversity_px 0.16 < min 0.35'}]}

    ``best`` is the best COMPLETE trial that is not collapsed (its latest evaluation kept the
    ``sweep.collapse`` rule); ``collapsed_trials`` lists every trial whose latest evaluation broke it.
    """
    trials = study.get_trials(deepcopy=False)

    def count(state: TrialState) -> int:
        return sum(t.state == state for t in trials)

    collapsed = [t for t in trials if t.user_attrs.get(COLLAPSED_ATTR)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and not t.user_attrs.get(COLLAPSED_ATTR)]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    best = None
    if complete:
        b = (min if minimize else max)(complete, key=lambda t: t.value)
        best = {"number": b.number, "value": b.value, "params": dict(b.params)}
    return {
        "trials": len(trials),
        COMPLETED: count(TrialState.COMPLETE),
        PRUNED: count(TrialState.PRUNED),
        FAILED: count(TrialState.FAIL),
        RUNNING: count(TrialState.RUNNING),
        "waiting": count(TrialState.WAITING),
        "direction": "minimize" if minimize else "maximize",
        "best": best,
        "pruned_trials": [
            {"number": t.number, "step": t.user_attrs.get(PRUNED_AT, t.last_step),
             "reason": t.user_attrs.get(PRUNE_REASON, PRUNED)}
            for t in trials if t.state == TrialState.PRUNED
        ],
        "failed_trials": [
            {"number": t.number, "reason": t.user_attrs.get(FAIL_REASON, FAILED)}
            for t in trials if t.state == TrialState.FAIL
        ],
        "collapsed_trials": [{"number": t.number, "rule": t.user_attrs[COLLAPSED_ATTR]} for t in collapsed],
    }

"""``scheduler: optuna``: the study's Optuna pruner stops trials.

Every reported objective value goes to the study (``Trial.report``); the trial stops when the
study's pruner says so (``should_prune``, then ``tell(state=PRUNED)``) with the reason the pruner's
own rule gives (:func:`sweeper.config.optuna_catalog.explain_prune`).
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sweeper.config.optuna_catalog import explain_prune
from sweeper.search.scheduler import SweepScheduler
from sweeper.search.searcher import OptunaSearcher


class OptunaPrunerScheduler(SweepScheduler, FIFOScheduler):
    """Ray TrialScheduler that lets the study's Optuna pruner stop trials.

    >>> scheduler = OptunaPrunerScheduler(searcher)  # doctest: +SKIP
    >>> scheduler.pruned  # doctest: +SKIP
    {'a1b2c3': {'step': 400, 'reason': 'fd_randcnn 88.1 at step 400 > median 61.3 of 5 completed trials',
                'optuna_number': 7}}
    """

    def __init__(self, searcher: OptunaSearcher):
        super().__init__()
        self.link_to(searcher)
        self.pruner_spec = searcher.spec.sweep["pruner"]

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        if not self.ends_if_finished(trial):
            self.link.attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self.observe(trial, result)
        if self.stops_first(trial, what, number, step):
            return TrialScheduler.STOP
        if what == "skip" or step >= self.max_t or not self.link.trial(number).should_prune():
            # A trial that reached its full budget has finished: it completes, it is not pruned.
            return TrialScheduler.CONTINUE
        reason = explain_prune(self.link.study, self.link.frozen(number), self.pruner_spec,
                               self.objective["metric"], value, step)
        self.prune(trial.trial_id, number, step, reason, by=self.pruner_spec["type"])
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        return f"Optuna pruner bridge ({self.pruner_spec['type']}); {len(self.pruned)} pruned"

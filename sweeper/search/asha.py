"""``scheduler: asha``: Ray's ASHA, with its stops recorded in Optuna as PRUNED.

ASHA returns STOP both for a trial it cuts at a rung and for one that reached ``max_t``; only a
stop before ``max_t`` (= ``train.steps``) is a prune. Values are reported to Optuna too, so the
study holds the same curves as with the Optuna pruner.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeper.keys import STEP_KEY
from sweeper.config.optuna_catalog import rung_reason
from sweeper.search.scheduler import SweepScheduler
from sweeper.search.searcher import OptunaSearcher


class OptunaASHAScheduler(SweepScheduler, ASHAScheduler):
    """Ray's ASHA (one bracket) that also records its stops in Optuna."""

    def __init__(self, searcher: OptunaSearcher, *, grace_period: int, reduction_factor: int = 3):
        obj = searcher.objective
        max_t = int(searcher.spec.run_config["train"]["steps"])
        super().__init__(time_attr=STEP_KEY, metric=obj["metric"], mode=obj["mode"], max_t=max_t,
                         grace_period=min(grace_period, max_t), reduction_factor=reduction_factor, brackets=1)
        self.link_to(searcher)
        self.reduction_factor = reduction_factor

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.link.attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self.observe(trial, result)
        if self.stops_first(trial, what, number, step):
            # ASHA's own bookkeeping never sees this result; a stopped trial no longer needs it
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        if what == "skip" or decision != TrialScheduler.STOP or step >= self.max_t:
            return decision  # a STOP at max_t is the trial's natural end, not a prune
        reason = rung_reason(self.link.study, "asha", self.objective["metric"], value, step, self.reduction_factor)
        self.prune(trial.trial_id, number, step, reason, by="asha")
        return decision

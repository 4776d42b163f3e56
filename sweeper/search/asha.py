"""``scheduler: asha``: Ray's ASHA, with its stops recorded in Optuna as PRUNED.

ASHA returns STOP both for a trial it cuts at a rung and for one that reached ``max_t``; only a
stop before ``max_t`` (= ``train.steps``) is a prune. Values are reported to Optuna too, so the
study holds the same curves as with the Optuna pruner.

The reason of a stop is Ray's own rule, recomputed from the values Ray compared: ASHA stops a
trial at a rung when its value is strictly worse than the ``1/reduction_factor`` quantile of the
values recorded at that rung before it (``numpy.nanpercentile``), so a tie never stops a trial.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeper.keys import STEP_KEY
from sweeper.config.optuna_catalog import rung_reason
from sweeper.config.reasons import compared
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
        if self.ends_if_finished(trial):
            return
        super().on_trial_add(tune_controller, trial)
        self.link.attach(trial)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self.observe(trial, result)
        if self.stops_first(trial, what, number, step):
            # ASHA's own bookkeeping never sees this result; a stopped trial no longer needs it
            return TrialScheduler.STOP
        judged = self._rung_before(trial, step)
        decision = super().on_trial_result(tune_controller, trial, result)
        if what == "skip" or decision != TrialScheduler.STOP or step >= self.max_t:
            return decision  # a STOP at max_t is the trial's natural end, not a prune
        self.prune(trial.trial_id, number, step, self._reason(value, step, judged), by="asha")
        return decision

    def _rung_before(self, trial: RayTrial, step: int) -> tuple[int, list[float]] | None:
        """The rung Ray's bracket judges this result at and the rewards recorded there before it,
        as Ray's ``_Bracket.on_result`` finds them (rungs in descending order; a rung the trial
        has a value at is passed over). None if Ray's internals are not as expected."""
        bracket = getattr(self, "_trial_info", {}).get(trial.trial_id)
        for milestone, recorded in getattr(bracket, "_rungs", None) or []:
            if step < milestone or trial.trial_id in recorded:
                continue
            return int(milestone), [float(v) for v in recorded.values()]
        return None

    def _reason(self, value: float, step: int, judged: tuple[int, list[float]] | None) -> str:
        metric, rf = self.objective["metric"], self.reduction_factor
        if not judged or not judged[1]:
            return rung_reason(self.link.study, "asha", metric, value, step, rf)
        milestone, rewards = judged
        sign = -1.0 if self.objective["mode"] == "min" else 1.0  # Ray compares sign * value
        cut = sign * float(np.nanpercentile(rewards, (1 - 1 / rf) * 100))
        v, relation = compared(value, cut)
        return (f"asha: {metric} {v} at step {step} {relation}, the best-1/{rf} cutoff of the "
                f"{len(rewards)} trials recorded at rung {milestone} before it")

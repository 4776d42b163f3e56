"""The Ray Tune Searcher of a sweep: asks the Optuna study for each new trial's parameters and
tells it how the trial ended (COMPLETE with the last reported objective, FAIL, or nothing when a
scheduler already recorded it PRUNED).

Ray's own ``OptunaSearch`` is not used: it never consults an Optuna pruner and records
scheduler-stopped trials as COMPLETE.

The trainable gets a flat config: the dotted param values plus ``"__optuna_trial"`` (the Optuna
trial number; :func:`sweeper.search.study.optuna_number`); ``sweeper.config.space.apply(run_config,
config)`` turns it into a run config. It must report the objective with a ``"step"`` key:
``tune.report({"step": s, "fid": v})`` (results without the objective, e.g. training losses, are
fine: neither the searcher nor the schedulers advertise a metric to Ray, so Ray does not demand it
in every result). The searcher limits concurrency itself (``sweep.max_concurrent``, or Ray's
``max_concurrent_trials``).
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from sweeper.errors import SweeperError
from sweeper.keys import (
    FAILED_AT,
    FAILURE_KEY,
    FAIL_REASON,
    OPTUNA_TRIAL_KEY,
    RAY_TRIAL_ID,
    REQUEUED,
    RETRY_OF,
    STEP_KEY,
)
from sweeper.search.study import StudyLink
from sweeper.config.space import Spec
from sweeper.config.space import suggest as suggest_values

log = logging.getLogger(__name__)


class OptunaSearcher(Searcher):
    """Ray Tune Searcher backed by one Optuna study (ask/tell).

    >>> searcher = OptunaSearcher(spec, default_storage("sweeps/demo"), study_name="demo")  # doctest: +SKIP
    >>> searcher.suggest("ray_trial_1")  # doctest: +SKIP
    {'model.moca.memory_size': 12, 'model.moca.momentum': 0.41, '__optuna_trial': 0}
    """

    def __init__(self, spec: Spec, storage: str, study_name: str = "sweep"):
        # metric/mode are not given to Ray: it would then require the objective in every result,
        # and trainers report losses between evaluations. The objective lives in the spec.
        super().__init__(metric=None, mode=None)
        self.spec = spec
        self.objective: dict[str, str] = dict(spec.sweep["objective"])
        self.max_concurrent = int(spec.sweep["max_concurrent"])
        self.link = StudyLink(spec, storage, study_name)

    @property
    def study(self) -> optuna.Study:
        return self.link.study

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        check_same_objective(self.objective, metric, mode)
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # We limit concurrency ourselves (see suggest), so Ray's ConcurrencyLimiter passes every
        # call through: it forgets trials Ray re-runs after a restore and would swallow their
        # on_trial_complete, leaving them RUNNING in Optuna.
        self.max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self.link.reconcile()
        if self.link.used() >= self.spec.sweep["trials"]:
            return Searcher.FINISHED
        if self.link.running() >= self.max_concurrent:
            return None  # Ray asks again when a trial ends
        t = self.link.ask(trial_id)
        values = suggest_values(t, self.spec.sweep["params"])
        t.set_user_attr(RAY_TRIAL_ID, trial_id)
        return {**values, OPTUNA_TRIAL_KEY: t.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.link.number_of(trial_id)
        if number is None:
            return
        fr = self.link.frozen(number)
        if fr.state.is_finished():  # already PRUNED by the scheduler (or told before a restart)
            self.link.release(number)
            return
        metric = self.objective["metric"]
        value = (result or {}).get(metric)
        if error:
            self.link.tell(number, state=TrialState.FAIL, attrs={
                FAIL_REASON: "the trial raised an error; see error.txt in its Ray trial folder"})
        elif result is None or not result.get("done"):
            # Removed before it ran to the end: Ray calls this without a result for a pending
            # trial, and with a result lacking ``done`` when the experiment stops (time budget).
            # Ray sets ``done`` on a natural end and on scheduler/stopper STOPs. Retry on resume.
            self.link.tell(number, state=TrialState.FAIL, attrs={
                FAIL_REASON: "stopped before it finished (the sweep ended or was interrupted); "
                               "its parameters were queued again", REQUEUED: True})
            self.study.enqueue_trial(dict(fr.params), user_attrs={RETRY_OF: number}, skip_if_exists=False)
        elif result.get(FAILURE_KEY):
            # The trial ended itself on a failure it can name (e.g. a non-finite loss at a step):
            # not retried by Ray, recorded as FAIL with its reason.
            self.link.tell(number, state=TrialState.FAIL, attrs={
                FAIL_REASON: str(result[FAILURE_KEY]), FAILED_AT: result.get(STEP_KEY)})
        elif value is None:
            self.link.tell(number, state=TrialState.FAIL, attrs={
                FAIL_REASON: f"finished without reporting {metric!r}; the evaluation must report it"})
        elif not finite(value):
            self.link.tell(number, state=TrialState.FAIL, attrs={FAIL_REASON: f"{metric} was {value}"})
        else:
            self.link.tell(number, float(value))

    # Ray's Searcher checkpoint: the Optuna storage is the real state, this is only the id map.
    def get_state(self) -> dict[str, Any]:
        return {"study_name": self.link.study_name, "storage": self.link.storage,
                "ray_to_number": dict(self.link.ray_to_number)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("study_name") != self.link.study_name:
            log.warning("searcher checkpoint is for study %r, this searcher uses %r",
                        state.get("study_name"), self.link.study_name)
        self.link.ray_to_number.update(state.get("ray_to_number", {}))  # in place: shared with the scheduler

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


def check_same_objective(objective: dict[str, str], metric: str | None, mode: str | None) -> None:
    if metric not in (None, objective["metric"]) or mode not in (None, objective["mode"]):
        raise SweeperError(
            f"TuneConfig asks for metric={metric!r} mode={mode!r} but the sweep's objective is "
            f"{objective['metric']!r} {objective['mode']!r}; pass the same or none"
        )


def finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False

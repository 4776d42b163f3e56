"""What every sweep scheduler shares: the Optuna record of its decisions.

A scheduler here is a Ray ``TrialScheduler`` that reports each trial's objective to the sweep's
Optuna study and records the trials it stops there as PRUNED, with a readable reason kept in the
trial's user attributes (``prune_reason``, ``pruned_at_step``, ``pruned_by``). One module per
scheduler (``optuna_pruner``, ``asha``, ``promotion``), each a subclass of :class:`SweepScheduler`
and a Ray scheduler; :mod:`sweeper.search.build` picks one by the spec's ``sweep.scheduler`` name.

Every scheduler first applies the same two rules (:meth:`SweepScheduler.stops_first`): a trial
Optuna already records PRUNED stops (the decision survives a restart), and a live trial before
its last step stops when it is out of patience (``sweep.patience.evaluations``). And a trial Ray
re-adds to run after ``Tuner.restore`` that Optuna already records PRUNED or COMPLETE never starts
(:meth:`SweepScheduler.ends_if_finished`): Ray's experiment state can hold it PAUSED (Ray does not
re-save a trial it stops while it has no actor, as the promotion scheduler stops paused trials),
and a restored trial would train one more interval from its checkpoint before its first result.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.experiment import Trial as RayTrial

from sweeper.keys import COLLAPSED_ATTR, CONSTRAINT_ATTR, PRUNED, PRUNED_AT, PRUNED_BY, PRUNE_REASON, RAY_TRIAL_ID, STEP_KEY
from sweeper.search.searcher import OptunaSearcher, check_same_objective
from sweeper.search.study import StudyLink
from sweeper.eval.guards import collapse_text, violations

log = logging.getLogger(__name__)


def step_of(result: dict[str, Any]) -> int | None:
    s = result.get(STEP_KEY, result.get("training_iteration"))
    return int(s) if s is not None else None


def no_new_best(values: dict[int, float], mode: str, evaluations: int, metric: str) -> str | None:
    """The patience stop (``sweep.patience.evaluations``): the reason to stop a trial whose last
    ``evaluations`` reported values (``{step: value}``, Optuna's intermediate values) brought no
    new best, else None. Only a strict improvement is a new best; a NaN never is.

    >>> no_new_best({100: 3.5, 200: 3.12, 300: 3.2, 400: 3.3, 500: 3.12}, "min", 3, "fd_randcnn")
    'no new best fd_randcnn in the last 3 evaluations (best 3.12 at step 200)'
    """
    steps = sorted(values)
    best_at: int | None = None
    for i, s in enumerate(steps):
        v = values[s]
        if v == v and (best_at is None or (v < values[steps[best_at]] if mode == "min" else v > values[steps[best_at]])):
            best_at = i
    since = len(steps) - 1 - best_at if best_at is not None else len(steps)
    if since < evaluations:
        return None
    best = f"best {values[steps[best_at]]:.4g} at step {steps[best_at]}" if best_at is not None else "no finite value"
    return f"no new best {metric} in the last {since} evaluations ({best})"


class SweepScheduler:
    """The part of a sweep scheduler that talks to Optuna. Mixed in before the Ray scheduler class
    (``class X(SweepScheduler, FIFOScheduler)``); the subclass calls :meth:`link_to` in ``__init__``.

    The objective is not advertised to Ray (:attr:`metric` is None): Ray would then demand it in
    every result, and trainers report losses between evaluations.
    """

    link: StudyLink
    objective: dict[str, str]
    patience: int | None = None  # sweep.patience.evaluations
    constraints: dict[str, dict[str, float]] = {}  # sweep.constraints
    collapse: dict[str, Any] | None = None  # sweep.collapse
    warmup: int = 0  # sweep.pruner.warmup_steps: no collapse prune before it
    max_t: int = 0  # the trial's last step (train.steps): reaching it is finishing, not being pruned

    def link_to(self, searcher: OptunaSearcher) -> None:
        """Share the searcher's study and take the spec's objective, patience and constraints."""
        self.link = searcher.link
        self.objective = dict(searcher.objective)
        self.patience = searcher.spec.sweep["patience"]["evaluations"]
        self.constraints = searcher.spec.sweep.get("constraints") or {}
        self.collapse = searcher.spec.sweep.get("collapse")
        self.warmup = int(searcher.spec.sweep["pruner"].get("warmup_steps") or 0)
        self.max_t = int(searcher.spec.run_config["train"]["steps"])

    @property
    def metric(self) -> None:
        return None  # see the class docstring; Ray's ASHA reads its own self._metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        check_same_objective(self.objective, metric, mode)
        return True

    def ends_if_finished(self, trial: RayTrial) -> bool:
        """Called first in ``on_trial_add``: a trial Ray re-adds to run (PENDING, after
        ``Tuner.restore``) that Optuna records PRUNED or COMPLETE is TERMINATED at once, before Ray
        gives it an actor (Ray files the trial by the status it has after this hook, and saves it).
        Returns True when it did so; the caller then leaves the trial alone."""
        if trial.status != RayTrial.PENDING:
            return False
        number = self.link.number_of(trial.trial_id, trial.config)
        if number is None:
            return False
        try:
            state = self.link.frozen(number).state
        except KeyError:
            return False
        if state not in (TrialState.PRUNED, TrialState.COMPLETE):
            return False
        trial.set_status(RayTrial.TERMINATED)
        log.info("Ray re-added Optuna trial %d (Ray %s), which is %s: not run again", number, trial.trial_id,
                 state.name)
        return True

    def stops_first(self, trial: RayTrial, what: str, number: int, step: int) -> bool:
        """The rules every scheduler applies before its own: a trial Optuna already records
        PRUNED stops (the decision stands after a restart), and a live trial before its last step
        stops when it is out of patience, or collapsed under ``sweep.collapse.prune``."""
        if what == PRUNED:
            return True
        return what == "live" and step < self.max_t and (self.out_of_patience(trial.trial_id, number, step)
                                                         or self.collapsed(trial.trial_id, number, step))

    def collapsed(self, ray_trial_id: str, number: int, step: int) -> bool:
        """``sweep.collapse.prune``: a trial whose evaluation at or after the pruner's warm-up is
        collapsed stops (recorded PRUNED, by "collapse"), so its FID never sets the bar the pruner
        holds the varied trials to (Optuna's median counts COMPLETE trials only)."""
        rule = (self.collapse or {})
        if not rule.get("prune") or step < self.warmup:
            return False
        why = self.link.frozen(number).user_attrs.get(COLLAPSED_ATTR)
        if not why:
            return False
        self.prune(ray_trial_id, number, step, f"collapsed: {why}", by="collapse")
        return True

    def out_of_patience(self, ray_trial_id: str, number: int, step: int) -> bool:
        """Apply the patience stop to a live trial; True (and recorded PRUNED) when it stops."""
        if not self.patience:
            return False
        reason = no_new_best(self.link.frozen(number).intermediate_values, self.objective["mode"], self.patience,
                             self.objective["metric"])
        if reason is None:
            return False
        self.prune(ray_trial_id, number, step, reason, by="patience")
        return True

    def prune(self, ray_trial_id: str, number: int, step: int, reason: str, by: str) -> None:
        self.link.tell(number, state=TrialState.PRUNED, attrs={
            PRUNE_REASON: reason, PRUNED_AT: int(step), PRUNED_BY: by, RAY_TRIAL_ID: ray_trial_id})
        log.info("pruned Optuna trial %d (Ray %s) at step %d: %s", number, ray_trial_id, step, reason)

    @property
    def pruned(self) -> dict[str, dict[str, Any]]:
        """``{ray_trial_id: {"step", "reason", "optuna_number"}}`` read from the study, so it
        includes trials pruned before a restart."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.link.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            if PRUNE_REASON in t.user_attrs:
                rid = t.user_attrs.get(RAY_TRIAL_ID, f"optuna-{t.number}")
                out[rid] = {"step": t.user_attrs.get(PRUNED_AT), "reason": t.user_attrs[PRUNE_REASON],
                            "optuna_number": t.number}
        return out

    def observe(self, trial: RayTrial, result: dict[str, Any]) -> tuple[str, int, float, int]:
        """Report the objective value of ``result`` to Optuna.

        Returns ``(what, number, value, step)``; ``what`` is ``"skip"`` (no objective or step in
        this result, not our trial, or already finished in Optuna), ``PRUNED`` (Optuna already
        records it PRUNED, e.g. before a restart: stop it) or ``"live"`` (reported; judge it).
        """
        value, step = result.get(self.objective["metric"]), step_of(result)
        number = self.link.number_of(trial.trial_id, trial.config)
        if value is None or step is None or number is None:
            return "skip", -1, math.nan, -1
        state = self.link.frozen(number).state
        if state == TrialState.PRUNED:
            return PRUNED, number, float(value), step
        if state.is_finished():
            return "skip", number, float(value), step
        self.link.report(number, float(value), step)
        if self.constraints:
            # the latest values; StudyLink.tell gives them to Optuna (Trial.set_constraint) at the end
            self.link.trial(number).set_user_attr(CONSTRAINT_ATTR, violations(result, self.constraints))
        collapsed = collapse_text(result, self.collapse)
        if collapsed is not None:  # the latest verdict: the summary counts the collapsed trials
            self.link.trial(number).set_user_attr(COLLAPSED_ATTR, collapsed)
        return "live", number, float(value), step

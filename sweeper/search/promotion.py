"""``scheduler: promotion``: successive halving that pauses trials at rungs and resumes the
promoted ones from their checkpoints."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from optuna.trial import TrialState
from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sweeper.config.reasons import compared
from sweeper.search.scheduler import SweepScheduler
from sweeper.search.searcher import OptunaSearcher, finite
from sweeper.keys import (
    PAUSED,
    PAUSED_AT,
    PAUSED_AT_TAG,
    PROMOTED_AT,
    PROMOTED_AT_TAG,
    PROMOTION,
    RAY_TRIAL_ID,
    RESUMED_FROM,
    RUNNING,
)

log = logging.getLogger(__name__)


class OptunaPromotionScheduler(SweepScheduler, FIFOScheduler):
    """``scheduler: promotion``: successive halving that pauses trials at rungs and resumes the
    promoted ones from their checkpoints (asynchronous successive halving with promotion, as in Li et
    al.'s ASHA paper; Ray's ``ASHAScheduler`` is its stopping variant).

    A trial that reports the objective at a rung step (``sweeper.config.space.promotion_rungs``: each an
    evaluation step, so the checkpoint reported with that value is the one at that very step)
    goes on at once if it is in the best ``1/reduction_factor`` of the trials that reached the rung
    so far (a tie at the cutoff goes to the lower Optuna trial number); otherwise Ray pauses it (its
    actor stops and frees its resources; it keeps its latest checkpoint). Whenever Ray has room for
    a trial it asks :meth:`choose_trial_to_run`: a paused trial that is now in the best fraction of
    its rung resumes first (from its checkpoint, so no step is trained twice), otherwise a new
    trial starts. Once no new trial will come (the searcher has asked its planned number) and
    every live trial has reached a rung, that rung is closed: its best ``max(1, n // reduction_factor)`` go on and the rest are PRUNED with the
    cutoff as the reason. A paused trial stays RUNNING in Optuna (user attrs ``promotion``,
    ``paused_at_step``, ``promoted_at_steps``) and its MLflow run is tagged ``sweeper.status=paused``
    until it resumes (``running``, ``sweeper.promoted_at_steps``) or ends.

    Resume: Ray restores this scheduler as it was created (``tuner.pkl``), so at its first
    ``on_trial_add`` it rebuilds the rungs from the study (:meth:`_recover`): every trial's value at
    each rung, its promotions, and, for a trial Optuna still has RUNNING, the highest rung it
    reached and was not promoted from is where it waits. A restored trial that waits at a rung
    stays PAUSED until it is promoted; one Optuna records PRUNED or COMPLETE never runs again.

    >>> scheduler = OptunaPromotionScheduler(searcher, rungs=[20, 60, 180], reduction_factor=3, planned=24)  # doctest: +SKIP
    >>> scheduler.state_of("a1b2c3")  # doctest: +SKIP
    'paused at step 60'
    """

    CLOSE_CHECK_S = 0.5  # how often choose_trial_to_run looks for closed rungs (it runs every loop)

    def __init__(self, searcher: OptunaSearcher, *, rungs: list[int], reduction_factor: int, planned: int):
        super().__init__()
        self.link_to(searcher)
        self.rungs = sorted(int(r) for r in rungs)
        self.reduction_factor = int(reduction_factor)
        self.planned = int(planned)
        self.at_rung: dict[int, dict[str, float]] = {r: {} for r in self.rungs}  # rung -> {ray id: value}
        self.numbers: dict[str, int] = {}  # ray trial id -> its Optuna number (a tie goes to the lower)
        self.paused: dict[str, int] = {}  # ray trial id -> the rung step it waits at
        self.promoted: dict[str, list[int]] = {}  # ray trial id -> the rung steps it was promoted from
        self.resumed: dict[str, list[int]] = {}  # ... of those, the ones it had been paused at
        self.tracking: tuple[str, str, str] | None = None  # (uri, sweep name, sweep dir): MLflow tags
        self._closed: set[int] = set()
        self._checked = 0.0
        self._recovered = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_recovered"] = False  # a restored copy reads the study again
        return state

    def _recover(self) -> None:
        """Rebuild the rungs, promotions and waiting trials from the study (see the class doc)."""
        self._recovered = True
        rid_of = {n: rid for rid, n in self.link.ray_to_number.items()}
        for t in self.link.study.get_trials(deepcopy=False):  # by number: a re-run overrides its FAIL
            rid = t.user_attrs.get(RAY_TRIAL_ID) or rid_of.get(t.number) or f"optuna-{t.number}"
            reached = [r for r in self.rungs if r in t.intermediate_values]
            for r in reached:
                self.at_rung[r].setdefault(rid, float(t.intermediate_values[r]))
            self.numbers.setdefault(rid, t.number)
            if t.user_attrs.get(PROMOTED_AT):
                self.promoted[rid] = [int(r) for r in t.user_attrs[PROMOTED_AT]]
            if t.user_attrs.get(RESUMED_FROM):
                self.resumed[rid] = [int(r) for r in t.user_attrs[RESUMED_FROM]]
            if t.state == TrialState.RUNNING and reached and reached[-1] not in self.promoted.get(rid, []):
                self.paused[rid] = reached[-1]  # it reached that rung and was not let past it
                self.link.paused.add(t.number)
        if self.paused:
            log.info("restored %d trial(s) waiting at a rung: %s", len(self.paused), self.paused)

    def state_of(self, ray_trial_id: str) -> str | None:
        """``'paused at step S'``, ``'promoted at step S'`` (its latest promotion) or None."""
        if ray_trial_id in self.paused:
            return f"paused at step {self.paused[ray_trial_id]}"
        if self.promoted.get(ray_trial_id):
            return f"promoted at step {self.promoted[ray_trial_id][-1]}"
        return None

    # -- Ray's hooks ---------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
        if not self._recovered:
            self._recover()
        if self.ends_if_finished(trial):
            self.paused.pop(trial.trial_id, None)
            return
        self.link.attach(trial)
        n = self.link.number_of(trial.trial_id, trial.config)
        if trial.trial_id in self.paused and n is not None:
            # Restored from an experiment checkpoint while paused: Ray re-adds it PENDING and would
            # start it unpromoted; it waits PAUSED instead (add_trial files it by the status it has
            # after this hook) until choose_trial_to_run promotes or prunes it.
            self.link.paused.add(n)
            if trial.status == RayTrial.PENDING:
                trial.set_status(RayTrial.PAUSED)

    def on_trial_result(self, tune_controller: Any, trial: RayTrial, result: dict) -> str:
        what, number, value, step = self.observe(trial, result)
        if self.stops_first(trial, what, number, step):
            return TrialScheduler.STOP
        if what == "skip" or step not in self.at_rung:
            return TrialScheduler.CONTINUE
        tid = trial.trial_id
        if tid in self.at_rung[step]:  # the rung's result again (a restored trial): the decision stands
            return TrialScheduler.CONTINUE if step in self.promoted.get(tid, []) else TrialScheduler.PAUSE
        self.at_rung[step][tid] = value
        self.numbers.setdefault(tid, number)
        if self._in_top(tid, step, closed=False):
            self._promote(tid, number, step)
            return TrialScheduler.CONTINUE
        self._pause(tid, number, step)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> RayTrial | None:
        trials = tune_controller.get_trials()
        by_id = {t.trial_id: t for t in trials}
        for tid in [tid for tid in self.paused if tid not in by_id]:  # recovered, but Ray does not resume it
            self.paused.pop(tid)
            self.link.paused.discard(self.link.number_of(tid))
        closed = self._closed_rungs(trials)
        for step in reversed(self.rungs):  # the furthest first: the closest to a finished trial
            for tid in self._ranked(step):
                t = by_id.get(tid)
                if self.paused.get(tid) != step or t is None or t.status not in (RayTrial.PAUSED, RayTrial.PENDING):
                    continue
                number = self.link.number_of(tid, t.config)
                if self._in_top(tid, step, closed=step in closed):
                    self._promote(tid, number, step)
                    return t  # Ray restores it from its latest checkpoint: the one at this rung
                if step in closed:
                    self._prune_paused(tune_controller, t, number, step)
        for t in trials:
            if t.status == RayTrial.PENDING and t.trial_id not in self.paused:
                return t
        return None

    # -- the rule --------------------------------------------------------------------------------

    def _order(self, value: float) -> float:
        if not finite(value):
            return math.inf  # NaN or inf: last
        return value if self.objective["mode"] == "min" else -value

    def _ranked(self, step: int) -> list[str]:
        vals = self.at_rung[step]
        return sorted(vals, key=lambda tid: (self._order(vals[tid]), self.numbers.get(tid, math.inf)))

    def _quota(self, step: int, closed: bool) -> int:
        n = len(self.at_rung[step]) // self.reduction_factor
        return max(1, n) if closed else n  # a closed rung always lets its best trial go on

    def _in_top(self, tid: str, step: int, closed: bool) -> bool:
        return tid in self._ranked(step)[: self._quota(step, closed)]

    def _closed_rungs(self, trials: list[RayTrial]) -> set[int]:
        """Rungs no further trial can reach: the searcher has asked all its trials and every live
        trial has a value at the rung (or beyond). Checked every CLOSE_CHECK_S while any trial waits."""
        now = time.monotonic()
        if not self.paused or now - self._checked < self.CLOSE_CHECK_S:
            return self._closed
        self._checked = now
        if self.link.used() < self.planned:
            return self._closed
        lowest = len(self.rungs)
        for t in trials:
            if t.status in (RayTrial.TERMINATED, RayTrial.ERROR):
                continue
            reached = max((i for i, r in enumerate(self.rungs) if t.trial_id in self.at_rung[r]), default=-1)
            lowest = min(lowest, reached)
        self._closed = set(self.rungs[: lowest + 1])
        return self._closed

    # -- records -----------------------------------------------------------------------------------

    def _pause(self, tid: str, number: int, step: int) -> None:
        self.paused[tid] = step
        self.link.paused.add(number)
        t = self.link.trial(number)
        t.set_user_attr(PROMOTION, f"paused at step {step}")
        t.set_user_attr(PAUSED_AT, int(step))
        self._tag(tid, PAUSED, **{PAUSED_AT_TAG: step})
        log.info("paused Optuna trial %d (Ray %s) at rung step %d", number, tid, step)

    def _promote(self, tid: str, number: int, step: int) -> None:
        self.promoted.setdefault(tid, []).append(int(step))
        was_paused = self.paused.pop(tid, None) is not None
        self.link.paused.discard(number)
        t = self.link.trial(number)
        t.set_user_attr(PROMOTION, f"promoted at step {step}")
        t.set_user_attr(PROMOTED_AT, list(self.promoted[tid]))
        if was_paused:
            self.resumed.setdefault(tid, []).append(int(step))
            t.set_user_attr(PAUSED_AT, None)
            t.set_user_attr(RESUMED_FROM, list(self.resumed[tid]))
            self._tag(tid, RUNNING, **{PROMOTED_AT_TAG: ",".join(map(str, self.promoted[tid])),
                                         PAUSED_AT_TAG: ""})
        else:
            self._tag(tid, None, **{PROMOTED_AT_TAG: ",".join(map(str, self.promoted[tid]))})
        log.info("promoted Optuna trial %d (Ray %s) at rung step %d", number, tid, step)

    def _prune_paused(self, tune_controller: Any, trial: RayTrial, number: int, step: int) -> None:
        ranked, k = self._ranked(step), self._quota(step, closed=True)
        metric, value = self.objective["metric"], self.at_rung[step][trial.trial_id]
        v, relation = compared(value, self.at_rung[step][ranked[k - 1]])
        tie = " (a tie goes to the earlier Optuna trial)" if relation.startswith("ties") else ""
        reason = (f"promotion: {metric} {v} at rung step {step} {relation}{tie}, the best "
                  f"{k} (1/{self.reduction_factor}) of the {len(ranked)} trials that reached it; not promoted")
        self.paused.pop(trial.trial_id, None)
        self.link.paused.discard(number)
        self.prune(trial.trial_id, number, step, reason, by="promotion")
        tune_controller.stop_trial(trial)  # PRUNED in Optuna first: the searcher then sees it finished

    def _tag(self, tid: str, status: str | None, **tags: Any) -> None:
        if self.tracking is None:
            return
        from sweeper.store.tracking import set_trial_state

        try:
            set_trial_state(*self.tracking, tid, status, **tags)
        except Exception as e:  # a record, not a decision: never stall the sweep on it
            log.warning("could not tag the MLflow run of trial %s: %s", tid, e)

    def debug_string(self) -> str:
        return (f"promotion scheduler (rungs {self.rungs}, 1/{self.reduction_factor}); {len(self.paused)} paused, "
                f"{len(self.promoted)} promoted, {len(self.pruned)} pruned")

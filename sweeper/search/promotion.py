"""``scheduler: promotion``: successive halving that pauses trials at rungs and resumes the
promoted ones from their checkpoints."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray.tune.experiment import Trial as RayTrial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sweeper.search.scheduler import SweepScheduler
from sweeper.search.searcher import OptunaSearcher, finite
from sweeper.keys import (
    PAUSED,
    PAUSED_AT,
    PAUSED_AT_TAG,
    PROMOTED_AT,
    PROMOTED_AT_TAG,
    PROMOTION,
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
    so far; otherwise Ray pauses it (its actor stops and frees its resources; it keeps its latest
    checkpoint). Whenever Ray has room for a trial it asks :meth:`choose_trial_to_run`: a paused
    trial that is now in the best fraction of its rung resumes first (from its checkpoint, so no
    step is trained twice), otherwise a new trial starts. Once no new trial will come (the
    searcher has asked its planned number) and every live trial has reached a rung, that rung is
    closed: its best ``max(1, n // reduction_factor)`` go on and the rest are PRUNED with the
    cutoff as the reason. A paused trial stays RUNNING in Optuna (user attrs ``promotion``,
    ``paused_at_step``, ``promoted_at_steps``) and its MLflow run is tagged ``sweeper.status=paused``
    until it resumes (``running``, ``sweeper.promoted_at_steps``) or ends.

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
        self.paused: dict[str, int] = {}  # ray trial id -> the rung step it waits at
        self.promoted: dict[str, list[int]] = {}  # ray trial id -> the rung steps it was promoted from
        self.resumed: dict[str, list[int]] = {}  # ... of those, the ones it had been paused at
        self.tracking: tuple[str, str, str] | None = None  # (uri, sweep name, sweep dir): MLflow tags
        self._closed: set[int] = set()
        self._checked = 0.0

    def state_of(self, ray_trial_id: str) -> str | None:
        """``'paused at step S'``, ``'promoted at step S'`` (its latest promotion) or None."""
        if ray_trial_id in self.paused:
            return f"paused at step {self.paused[ray_trial_id]}"
        if self.promoted.get(ray_trial_id):
            return f"promoted at step {self.promoted[ray_trial_id][-1]}"
        return None

    # -- Ray's hooks ---------------------------------------------------------------------------

    def on_trial_add(self, tune_controller: Any, trial: RayTrial) -> None:
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
        if self._in_top(tid, step, closed=False):
            self._promote(tid, number, step)
            return TrialScheduler.CONTINUE
        self._pause(tid, number, step)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> RayTrial | None:
        trials = tune_controller.get_trials()
        by_id = {t.trial_id: t for t in trials}
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
        return sorted(vals, key=lambda tid: self._order(vals[tid]))

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
        cut = self.at_rung[step][ranked[k - 1]]
        sign = ">" if self.objective["mode"] == "min" else "<"
        reason = (f"promotion: {metric} {value:.4g} at rung step {step} {sign} cutoff {cut:.4g}, the best "
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

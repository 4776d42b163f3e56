"""The sweep's Ray Tune callbacks: the progress line, and each trial's final status in MLflow.

    callbacks = [Progress(name, "fid", "min", planned=24, scheduler=scheduler),
                 TrackingStatus(tracking_uri, name, sweep_dir, scheduler)]
"""

from __future__ import annotations

import time
from typing import Any

from sweeper.eval.guards import collapse_text
from sweeper.keys import (
    COMPLETED,
    FAILED,
    FAILED_AT_TAG,
    FAILURE_KEY,
    FAILURE_TAG,
    PAUSED,
    PRUNED,
    PRUNED_AT_TAG,
    PRUNE_REASON_TAG,
    RUNNING,
)


def _status_of(trial, pruned: set[str]) -> str:
    if trial.trial_id in pruned:
        return PRUNED
    if (trial.last_result or {}).get(FAILURE_KEY):
        return FAILED
    return {"TERMINATED": COMPLETED, "ERROR": FAILED, "RUNNING": RUNNING,
            "PAUSED": PAUSED}.get(trial.status, "pending")


def _pruned(scheduler) -> dict[str, dict[str, Any]]:
    return dict(getattr(scheduler, PRUNED, {}) or {})


try:
    from ray.tune import Callback as _Callback
except ImportError:  # pragma: no cover - ray is a dependency
    _Callback = object


class Progress(_Callback):
    """One status line: trials running/completed/pruned/failed, best so far, time left."""

    def __init__(self, name: str, metric: str, mode: str, planned: int, scheduler, every_s: float = 15.0,
                 collapse: dict[str, Any] | None = None):
        self.name, self.metric, self.mode, self.planned = name, metric, mode, planned
        self.collapse = collapse  # sweep.collapse: collapsed trials are counted, and never the best
        self.scheduler, self.every_s = scheduler, every_s
        self.started, self.last = time.time(), 0.0

    def line(self, trials) -> str:
        pr = set(_pruned(self.scheduler))
        counts = {RUNNING: 0, COMPLETED: 0, PRUNED: 0, FAILED: 0, PAUSED: 0}
        best, collapsed = None, 0
        for t in trials:
            s = _status_of(t, pr)
            if s in counts:
                counts[s] += 1
            if t.last_result and collapse_text(t.last_result, self.collapse):
                collapsed += 1
                continue
            if s == COMPLETED and t.last_result and self.metric in t.last_result:
                v = t.last_result[self.metric]
                if best is None or (v < best if self.mode == "min" else v > best):
                    best = v
        done = counts[COMPLETED] + counts[PRUNED] + counts[FAILED]
        el = time.time() - self.started
        eta = f"~{el / done * max(self.planned - done, 0):.0f}s left" if done else "time left unknown yet"
        b = f"{best:.4g}" if best is not None else "-"
        held = ""
        if isinstance(getattr(self.scheduler, "promoted", None), dict):  # the promotion scheduler
            # paused: waiting at a rung (Ray has them PAUSED, or PENDING after a restore)
            paused = len(getattr(self.scheduler, PAUSED, {}))
            held = f"{paused} paused, {len(self.scheduler.promoted)} promoted, "
        flat = ""
        if collapsed:
            flat = f"{collapsed} collapsed ({self.collapse['metric']} < {self.collapse['min']:g}, never the best); "
        return (f"[sweeper] {self.name}: {counts[RUNNING]} running, {held}{counts[COMPLETED]} completed, "
                f"{counts[PRUNED]} pruned, {counts[FAILED]} failed of {self.planned}; {flat}"
                f"best {self.metric} {b}; elapsed {el:.0f}s, {eta}")

    def on_step_end(self, iteration, trials, **info):
        held = (len(getattr(self.scheduler, PAUSED, None) or {}), len(getattr(self.scheduler, "promoted", None) or {}))
        if time.time() - self.last > self.every_s or held != getattr(self, "_held", held):
            self.last = time.time()
            print(self.line(trials), flush=True)
        self._held = held  # a pause or a promotion prints a line at once

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(self.line(trials), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(self.line(trials), flush=True)


class TrackingStatus(_Callback):
    """Final status of each trial's MLflow run: completed, pruned (step and reason) or failed."""

    def __init__(self, tracking: str, name: str, sweep_dir: str, scheduler):
        self.tracking, self.name, self.sweep_dir, self.scheduler = tracking, name, sweep_dir, scheduler

    def on_trial_complete(self, iteration, trials, trial, **info):
        from sweeper.store.tracking import set_trial_status

        rec = _pruned(self.scheduler).get(trial.trial_id)
        failure = (trial.last_result or {}).get(FAILURE_KEY)
        if failure:
            set_trial_status(self.tracking, self.name, self.sweep_dir, trial.trial_id, FAILED,
                             **{FAILURE_TAG: failure, FAILED_AT_TAG: trial.last_result.get("step")})
        elif rec:
            set_trial_status(self.tracking, self.name, self.sweep_dir, trial.trial_id, PRUNED,
                             **{PRUNE_REASON_TAG: rec.get("reason"), PRUNED_AT_TAG: rec.get("step")})
        else:
            set_trial_status(self.tracking, self.name, self.sweep_dir, trial.trial_id, COMPLETED)

    def on_trial_error(self, iteration, trials, trial, **info):
        from sweeper.store.tracking import set_trial_status

        msg = getattr(trial, "error_message", None) or ""
        lines = [ln for ln in str(msg).strip().splitlines() if ln.strip()]
        set_trial_status(self.tracking, self.name, self.sweep_dir, trial.trial_id, FAILED,
                         **{FAILURE_TAG: lines[-1] if lines else "trial failed"})

"""What a sweep cost: accelerator-seconds, CPU-seconds and wall seconds per trial, their totals,
the cost per completed trial, and what pruning saved.

    meter = Meter(gpus=1.0)                       # in a trial: the GPUs Ray gave it (all workers)
    metrics.update(meter.read())                  # at every evaluation: cumulative seconds
    totals = experiment_cost(client, exp_id)      # the trial runs and the replicate runs in MLflow
    print(cost_line(totals))

A trial's ``accelerator_s`` is ``workers x GPUs per worker x wall seconds`` of its training and
evaluation (= ``resources.gpus`` x wall: Ray reserves the GPUs for the whole trial), ``cpu_s`` the
CPU time of its training process (rank 0 with DDP), ``trial_wall_s`` its wall time; each is
counted from the trial's start to its latest evaluation, across restarts. The saving of a pruned
trial is its untrained steps (``train.steps`` - the step it stopped at) times its own measured
seconds per step.

Replicates (`sweeper best --replicates N`) are counted in the totals (``accelerator_s``,
``cpu_s``, ``trial_wall_s``) and also on their own (``replicate_*``, ``replicates_costed``); the
cost per completed trial is the search's alone (trials, not replicates).
"""

from __future__ import annotations

import time
from typing import Any

from sweeper.keys import (
    ACCELERATOR_S,
    COMPLETED,
    CPU_S,
    FAILED,
    FAILED_AT_TAG,
    FINAL_STEP_TAG,
    PRUNED,
    PRUNED_AT_TAG,
    REPLICATE_ROLE,
    ROLE,
    STATUS,
    WALL_S,
)

COST_KEYS = (ACCELERATOR_S, CPU_S, WALL_S)
STOP_TAGS = {COMPLETED: FINAL_STEP_TAG, PRUNED: PRUNED_AT_TAG, FAILED: FAILED_AT_TAG}


class Meter:
    """Cumulative seconds of one trial; ``offset`` carries what earlier attempts logged."""

    def __init__(self, gpus: float, offset: dict[str, float] | None = None):
        self.gpus = float(gpus)
        self.offset = {k: float((offset or {}).get(k, 0.0)) for k in COST_KEYS}
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        return {ACCELERATOR_S: self.offset[ACCELERATOR_S] + self.gpus * wall,
                CPU_S: self.offset[CPU_S] + time.process_time() - self.cpu0,
                WALL_S: self.offset[WALL_S] + wall}


def trained_steps(t: Any) -> int | None:
    """The step a trial run stopped at (completed, pruned or failed), from its tags."""
    tag = STOP_TAGS.get(t.status)
    value = t.tags.get(tag) if tag else None
    return int(float(value)) if value not in (None, "") else None


def sweep_cost(trials: list, replicates: list | None = None) -> dict[str, Any]:
    """Totals over trial runs (``sweeper.store.trial_runs.TrialResult``: status, final metrics,
    params, tags) and replicate runs (the same; only their seconds count).

    >>> sweep_cost(trial_results(client, exp_id), replicate_results(client, exp_id))  # doctest: +SKIP
    {'accelerator_s': 7300.0, 'cpu_s': 9250.5, 'trial_wall_s': 7400.2, 'trials_costed': 6, 'completed': 4,
     'replicates_costed': 1, 'replicate_accelerator_s': 100.0, 'replicate_cpu_s': 150.0,
     'replicate_trial_wall_s': 100.0, 'accelerator_s_per_completed': 1800.0, 'cpu_s_per_completed': 2275.1,
     'pruned_steps_saved': 1400, 'accelerator_s_saved': 2100.0, 'cpu_s_saved': 2650.0}
    """
    costed = [t for t in trials if CPU_S in t.metrics]
    reps = [r for r in replicates or [] if CPU_S in r.metrics]
    search = {k: sum(float(t.metrics.get(k, 0.0)) for t in costed) for k in COST_KEYS}
    again = {k: sum(float(r.metrics.get(k, 0.0)) for r in reps) for k in COST_KEYS}
    out: dict[str, Any] = {k: search[k] + again[k] for k in COST_KEYS}
    out["trials_costed"] = len(costed)
    done = sum(t.status == COMPLETED for t in trials)
    out[COMPLETED] = done
    out["replicates_costed"] = len(reps)
    out.update({f"replicate_{k}": again[k] for k in COST_KEYS})
    for k in (ACCELERATOR_S, CPU_S):
        out[f"{k}_per_completed"] = search[k] / done if done else None
    steps_saved, saved = 0, {ACCELERATOR_S: 0.0, CPU_S: 0.0}
    for t in costed:
        step, planned = trained_steps(t), t.params.get("train.steps")
        if t.status != PRUNED or not step or planned is None:
            continue
        left = max(0, int(float(planned)) - step)
        steps_saved += left
        for k in saved:
            saved[k] += left * float(t.metrics.get(k, 0.0)) / step
    out["pruned_steps_saved"] = steps_saved
    out[f"{ACCELERATOR_S}_saved"], out[f"{CPU_S}_saved"] = saved[ACCELERATOR_S], saved[CPU_S]
    return out


def replicate_results(client, experiment_id: str) -> list:
    """The replicate runs of a sweep's experiment (``sweeper.role=replicate``), as TrialResults."""
    from sweeper.store.trial_runs import TrialResult, all_runs

    return [TrialResult(run_id=r.info.run_id, trial_id="", run_name=r.info.run_name or "",
                        status=r.data.tags.get(STATUS, ""), metrics=dict(r.data.metrics),
                        params=dict(r.data.params), tags=dict(r.data.tags))
            for r in all_runs(client, experiment_id) if r.data.tags.get(ROLE) == REPLICATE_ROLE]


def experiment_cost(client, experiment_id: str) -> dict[str, Any]:
    """:func:`sweep_cost` of a sweep's experiment: its trial runs and its replicate runs."""
    from sweeper.store.trial_runs import trial_results

    return sweep_cost(trial_results(client, experiment_id), replicate_results(client, experiment_id))


def cost_line(c: dict[str, Any]) -> str:
    """``cost: 2.03 GPU-h, 2.57 CPU-h over 6 trials and 1 replicate (0.50 GPU-h, 0.63 CPU-h per
    completed trial); pruning saved ~1400 steps, ~0.58 GPU-h, ~0.74 CPU-h``"""
    def hours(s: float | None) -> str:
        return "-" if s is None else f"{s / 3600:.2f}"

    reps = c.get("replicates_costed") or 0
    over = f"{c['trials_costed']} trials" + (f" and {reps} replicate{'s' if reps != 1 else ''}" if reps else "")
    text = (f"cost: {hours(c[ACCELERATOR_S])} GPU-h, {hours(c[CPU_S])} CPU-h over {over} "
            f"({hours(c[f'{ACCELERATOR_S}_per_completed'])} GPU-h, {hours(c[f'{CPU_S}_per_completed'])} CPU-h "
            f"per completed trial)")
    if c["pruned_steps_saved"]:
        text += (f"; pruning saved ~{c['pruned_steps_saved']} steps, ~{hours(c[f'{ACCELERATOR_S}_saved'])} GPU-h, "
                 f"~{hours(c[f'{CPU_S}_saved'])} CPU-h")
    return text

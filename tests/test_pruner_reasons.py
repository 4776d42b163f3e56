"""Every pruner's reason is computed from the inputs its decision used: whenever Optuna's pruner
says prune, the comparison the reason states holds for the numbers it names."""

from __future__ import annotations

import math
import re

import numpy as np
import optuna
import pytest

from sweeper.config.optuna_catalog import PRUNERS, build_pruner, explain_prune

optuna.logging.set_verbosity(optuna.logging.WARNING)
STEPS = 8
NUM = r"(-?[0-9.]+(?:e[-+]?\d+)?)"

SPECS = {
    "median": {"type": "median", "warmup_steps": 0, "args": {"n_startup_trials": 3}},
    "percentile": {"type": "percentile", "warmup_steps": 0, "args": {"percentile": 25.0, "n_startup_trials": 3,
                                                                      "n_min_trials": 2}},
    "successive_halving": {"type": "successive_halving", "warmup_steps": 0,
                           "args": {"min_resource": 1, "reduction_factor": 2}},
    "hyperband": {"type": "hyperband", "warmup_steps": 0,
                  "args": {"min_resource": 1, "max_resource": 2, "reduction_factor": 3}},
    "wilcoxon": {"type": "wilcoxon", "warmup_steps": 0, "args": {"p_threshold": 0.1}},
    "patient": {"type": "patient", "warmup_steps": 0,
                "args": {"patience": 1, "wrapped": {"type": "median", "warmup_steps": 0,
                                                    "args": {"n_startup_trials": 3}}}},
}


def curve(level: float, seed: int) -> list[float]:
    """A noisy decreasing curve (minimised), its height set by ``level``."""
    rng = np.random.default_rng(seed)
    return [level + 2.0 / s + 0.3 * rng.standard_normal() for s in range(1, STEPS + 1)]


def check_reason(kind: str, study: optuna.Study, frozen, reason: str, value: float, step: int) -> None:
    if kind in ("median", "percentile") or kind == "patient":
        m = re.search(rf"at step {step}(?: \(best so far {NUM}\))? > (?:median|\S+ percentile) {NUM} of (\d+) "
                      r"completed trials at this step", reason)
        assert m, reason
        best = float(m.group(1)) if m.group(1) else value
        thr = float(m.group(2))
        assert best > thr - 1e-4 * abs(thr), reason  # the stated comparison holds (4 significant digits shown)
        own = min(v for v in frozen.intermediate_values.values() if not math.isnan(v))
        assert best == pytest.approx(own, rel=1e-3)
        spec = SPECS[kind] if kind != "patient" else SPECS[kind]["args"]["wrapped"]
        q = 50.0 if spec["type"] == "median" else spec["args"]["percentile"]
        done = [t.intermediate_values[step] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                if step in t.intermediate_values]
        assert thr == pytest.approx(float(np.percentile(done, q)), rel=1e-3) and int(m.group(3)) == len(done)
        if kind == "patient":
            assert reason.startswith("patient: no improvement of obj in the last 1 reports")
    elif kind in ("successive_halving", "hyperband"):
        m = re.search(rf"obj {NUM} at rung (\d+) \(step {step}\) > cutoff {NUM}, the best 1/(\d+) of the (\d+) trials",
                      reason)
        assert m, reason
        assert float(m.group(1)) > float(m.group(3)), reason
    elif kind == "wilcoxon":
        m = re.search(rf"signed-rank p = {NUM} < {NUM}", reason)
        assert m, reason
        assert float(m.group(1)) < float(m.group(2)), reason


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_whenever_the_pruner_prunes_the_reason_states_a_comparison_that_holds(kind):
    assert set(SPECS) | {"none"} == set(PRUNERS)  # every pruner type is covered here
    spec = SPECS[kind]
    study = optuna.create_study(direction="minimize", pruner=build_pruner({"pruner": spec}),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    prunes = 0
    for n in range(24):
        level = [0.0, 1.0, 0.5, 3.0][n % 4] + 0.05 * n  # some trials clearly worse than others
        trial = study.ask()
        values = curve(level, seed=n)
        pruned = False
        for step, v in enumerate(values, start=1):
            trial.report(v, step)
            if trial.should_prune():
                frozen = study._storage.get_trial(trial._trial_id)  # as the bridge reads it back
                reason = explain_prune(study, frozen, spec, "obj", v, step)
                check_reason(kind, study, frozen, reason, v, step)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                prunes += 1
                pruned = True
                break
        if not pruned:
            study.tell(trial, values[-1])
    assert prunes >= 2, f"{kind} pruned {prunes} trials; the scripted curves should make it prune"

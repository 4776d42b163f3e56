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


# ---------------------------------------------------------------------------- ties and true comparisons
def test_the_stated_relation_is_the_numbers_own_and_a_tie_is_named_a_tie():
    from sweeper.config.reasons import compared

    assert compared(4.734, 4.734) == ("4.734", "ties the cutoff 4.734")
    assert compared(5.0, 4.734) == ("5", "> cutoff 4.734")
    assert compared(4.0, 4.734) == ("4", "< cutoff 4.734")
    # equal at 4 digits but not equal: more digits, never "4.734 > cutoff 4.734"
    assert compared(4.73412, 4.73398) == ("4.7341", "> cutoff 4.734")
    v, rel = compared(1.0 + 1e-12, 1.0)
    assert rel.startswith(">") and v != rel.split()[-1]
    assert compared(float("nan"), 2.5)[1] == "(not a number, ranked last) against the cutoff 2.5"
    assert compared(2.5, float("nan"))[1] == "against the cutoff nan (not a number)"


def scheduler_spec(tmp_path, name: str, sweep: str, trials: int = 3):
    """A spec of the toy family (conftest.py), 30 steps evaluated every 10, with ``sweep`` lines."""
    from sweeper.config.space import load_spec

    p = tmp_path / f"{name}.yaml"
    p.write_text("\n".join([
        "model: {family: toy}", "train: {steps: 30}", "eval: {every: 10}", "sweep:",
        "  objective: {metric: fd_randcnn, mode: min}", "  sampler: {type: random, seed: 0}",
        f"  trials: {trials}", "  max_concurrent: 3", sweep,
        "  params: {model.moca.momentum: {type: float, low: 0.0, high: 0.9}}", ""]))
    return load_spec(p)


class Controller:
    """The two calls the promotion scheduler makes of Ray's controller outside a result."""

    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        trial.set_status(trial.TERMINATED)


def promotion_at_one_rung(tmp_path, values: list[float]):
    """Three trials report ``values`` at the one rung (step 10, reduction factor 3); then the rung
    closes: the best goes on, the rest are pruned. Returns the study."""
    from ray.tune.experiment import Trial

    from sweeper.search.build import build_search

    spec = scheduler_spec(tmp_path, "tie", "  scheduler: promotion\n  promotion: {min_step: 10, reduction_factor: 3}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "tie")
    scheduler.CLOSE_CHECK_S = 0.0
    trials = []
    for i, v in enumerate(values):
        trial = Trial("scripted", config=searcher.suggest(f"ray-{i}"), trial_id=f"ray-{i}", stub=True)
        scheduler.on_trial_add(None, trial)
        trials.append(trial)
        assert scheduler.on_trial_result(None, trial, {"step": 10, "fd_randcnn": v}) == "PAUSE"
        trial.set_status(Trial.PAUSED)
    ctl = Controller(trials)
    while scheduler.choose_trial_to_run(ctl) is not None or scheduler.paused:
        pass
    return searcher.study


def test_a_promotion_tie_at_the_cutoff_is_named_a_tie_and_goes_to_the_earlier_trial(tmp_path):
    study = promotion_at_one_rung(tmp_path, [4.734, 4.734, 5.0])
    t0, t1, t2 = study.trials
    assert t0.user_attrs["promoted_at_steps"] == [10] and t0.state == optuna.trial.TrialState.RUNNING
    assert t1.state == t2.state == optuna.trial.TrialState.PRUNED
    assert t1.user_attrs["prune_reason"].startswith(
        "promotion: fd_randcnn 4.734 at rung step 10 ties the cutoff 4.734 (a tie goes to the earlier Optuna trial), "
        "the best 1 (1/3) of the 3 trials that reached it; not promoted")
    assert ">" not in t1.user_attrs["prune_reason"] and "<" not in t1.user_attrs["prune_reason"]
    assert t2.user_attrs["prune_reason"].startswith("promotion: fd_randcnn 5 at rung step 10 > cutoff 4.734, ")


def test_a_promotion_loss_by_less_than_four_digits_shows_the_digits_that_differ(tmp_path):
    study = promotion_at_one_rung(tmp_path, [4.73398, 4.73412, 9.0])
    reason = study.trials[1].user_attrs["prune_reason"]
    assert "fd_randcnn 4.7341 at rung step 10 > cutoff 4.734," in reason, reason


def test_asha_never_stops_a_tie_and_states_rays_own_cutoff_when_it_stops(tmp_path):
    from ray.tune.experiment import Trial

    from sweeper.search.build import build_search

    spec = scheduler_spec(tmp_path, "asha", "  scheduler: asha\n  asha: {grace_period: 10, reduction_factor: 2}", trials=4)
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "asha")
    decisions = []
    for i, v in enumerate([3.0, 5.0, 4.0, 4.5]):
        trial = Trial("scripted", config=searcher.suggest(f"ray-{i}"), trial_id=f"ray-{i}", stub=True)
        scheduler.on_trial_add(None, trial)
        decisions.append(scheduler.on_trial_result(None, trial, {"step": 10, "fd_randcnn": v}))
    # Ray's cutoff (median for factor 2) of the values before each: 3 -> none; 5 vs 3 -> stop;
    # 4 vs median(3, 5) = 4 -> a tie: goes on; 4.5 vs median(3, 5, 4) = 4 -> stop
    assert decisions == ["CONTINUE", "STOP", "CONTINUE", "STOP"]
    reasons = {t.number: t.user_attrs.get("prune_reason") for t in searcher.study.trials}
    assert reasons[1] == "asha: fd_randcnn 5 at step 10 > cutoff 3, the best-1/2 cutoff of the 1 trials recorded at rung 10 before it"
    assert reasons[3] == "asha: fd_randcnn 4.5 at step 10 > cutoff 4, the best-1/2 cutoff of the 3 trials recorded at rung 10 before it"
    assert reasons[2] is None and reasons[0] is None


@pytest.mark.parametrize("kind", ["median", "successive_halving"])
def test_an_optuna_pruner_never_prunes_a_tie_so_its_greater_than_holds(kind):
    """The Optuna pruners' reasons say '>' (sweeper.config.optuna_catalog): Optuna prunes only a
    value strictly worse than the threshold, so a trial at the threshold is never pruned there."""
    spec = {"median": {"type": "median", "warmup_steps": 0, "args": {"n_startup_trials": 1}},
            "successive_halving": {"type": "successive_halving", "warmup_steps": 0,
                                   "args": {"min_resource": 1, "reduction_factor": 2}}}[kind]
    study = optuna.create_study(direction="minimize", pruner=build_pruner({"pruner": spec}))
    for v in (1.0, 3.0):  # the median of these, and SH's cutoff with a third trial at 2, is 2
        t = study.ask()
        t.report(v, 1)
        study.tell(t, v)
    tie = study.ask()
    tie.report(2.0, 1)
    assert not tie.should_prune()
    worse = study.ask()
    worse.report(2.0 + 1e-9, 1)
    assert worse.should_prune()
    frozen = study._storage.get_trial(worse._trial_id)
    reason = explain_prune(study, frozen, spec, "obj", 2.0 + 1e-9, 1)
    assert " > " in reason, reason
    # a loss by less than 4 digits shows the digits that differ: never "obj 2 > median 2"
    left, right = re.search(r"obj (\S+) (?:at step 1 )?.*?> \S*\s?(?:median|cutoff) (\S+)", reason).groups()
    assert float(left) > float(right.rstrip(",")), reason


def test_a_patience_tie_is_no_new_best_and_the_reason_claims_no_comparison():
    from sweeper.search.scheduler import no_new_best

    reason = no_new_best({1: 3.0, 2: 3.0, 3: 3.0}, "min", 2, "fd")
    assert reason == "no new best fd in the last 2 evaluations (best 3 at step 1)"
    assert no_new_best({1: 3.0, 2: 3.0, 3: 2.9999}, "min", 2, "fd") is None  # any strict gain is a new best

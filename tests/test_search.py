"""The Optuna side of a sweep on a real local Ray (bound to 127.0.0.1) with real Optuna studies.

Every Tuner run here drives a function trainable that reports scripted curves: trials 0..2 are
"good" (each a little better than the one before, improving every step), trial 3 is "bad"
(much worse, and getting worse). Trials run one at a time so the order is fixed. Each pruner
must stop the bad trial early and leave the good ones to finish; ``none`` stops nothing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

# Before Ray is imported: keep every Ray address on loopback, no token files, no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import optuna
import pytest
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher

from sweeper.errors import SweeperError
from sweeper.keys import OPTUNA_TRIAL_KEY
from sweeper.search.asha import OptunaASHAScheduler
from sweeper.search.optuna_pruner import OptunaPrunerScheduler
from sweeper.search.searcher import OptunaSearcher
from sweeper.search.build import build_search
from sweeper.search.scheduler import no_new_best
from sweeper.search.study import open_storage, open_study
from sweeper.search.summary import summarize
from sweeper.config.space import Spec, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

STEPS = 6  # reports per trial: steps 1..6
BAD = 3  # the Optuna trial number that gets the bad curve
TRIALS = 4
# the local_ray fixture (conftest.py): one local Ray for the module, its functions (the trainable,
# the curves) shipped to Ray's workers by value, no CSV/JSON/TensorBoard files per trial
RAY_CPUS = 2
TUNE_FILE_LOGGERS = False


# The toy family ("toy") is registered once, in conftest.py.


def curve(number: int, step: int) -> float:
    """Good: improves every step, each trial a bit better than the last. Bad: high and rising."""
    if number == BAD:
        return 100.0 + step
    return 10.0 / step - 0.01 * number


def scripted(config: dict) -> None:
    """Function trainable: the Optuna trial number picks the curve; resumes from its checkpoint."""
    n = config[OPTUNA_TRIAL_KEY]
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["step"] + 1
    for s in range(start, STEPS + 1):
        time.sleep(config.get("sleep", 0.02))
        if config.get("fail_number") == n and s == 2 and not os.path.exists(config.get("fail_unless", "")):
            raise RuntimeError("scripted failure")
        metrics = {"step": s, "fd_randcnn": curve(n, s), "started_at": start}
        if config.get("checkpoint"):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "state.json").write_text(json.dumps({"step": s}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)


def make_spec(tmp_path: Path, pruner: str = "{type: median}", *, scheduler: str = "optuna",
              trials: int = TRIALS, extra: str = "", sampler: str = "{type: random, seed: 0}") -> Spec:
    text = "\n".join([
        "model: {family: toy}",
        f"train: {{steps: {STEPS}}}",
        "eval: {every: 1}",
        "sweep:",
        "  objective: {metric: fd_randcnn, mode: min}",
        f"  sampler: {sampler}",
        f"  pruner: {pruner}",
        f"  scheduler: {scheduler}",
        f"  trials: {trials}",
        "  max_concurrent: 1",
        *([f"  {extra}"] if extra else []),
        "  params:",
        "    model.moca.momentum: {type: float, low: 0.0, high: 0.99}",
        "    model.moca.clusters: {type: categorical, choices: [1, 4, 8]}",
        "",
    ])
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return load_spec(p)


def fit(searcher: OptunaSearcher, scheduler, tmp_path: Path, *, num_samples: int = TRIALS,
        param_space: dict | None = None, callbacks: list | None = None):
    tuner = tune.Tuner(
        scripted,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="exp", verbose=0,
                                  callbacks=callbacks or []),
    )
    return tuner.fit()


def by_number(results) -> dict[int, object]:
    return {r.config[OPTUNA_TRIAL_KEY]: r for r in results}


PRUNERS = {
    "median": ("{type: median, args: {n_startup_trials: 2}}", "> median"),
    "percentile": ("{type: percentile, args: {percentile: 25.0, n_startup_trials: 2}}", "> 25th percentile"),
    "successive_halving": ("{type: successive_halving, args: {min_resource: 1, reduction_factor: 2}}",
                           "successive halving: fd_randcnn"),
    # max/min < reduction_factor: one bracket, so every trial competes with every other
    "hyperband": ("{type: hyperband, args: {min_resource: 1, max_resource: 2, reduction_factor: 3}}",
                  "hyperband: fd_randcnn"),
    "wilcoxon": ("{type: wilcoxon, args: {p_threshold: 0.1}}", "worse than best trial #2"),
    "patient": ("{type: patient, args: {patience: 1, wrapped: {type: median, args: {n_startup_trials: 2}}}}",
                "patient: no improvement of fd_randcnn in the last 1 reports"),
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_pruner_bridge_stops_the_bad_trial(local_ray, tmp_path, pruner):
    pruner_yaml, phrase = PRUNERS[pruner]
    spec = make_spec(tmp_path, pruner_yaml)
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), pruner)
    assert isinstance(scheduler, OptunaPrunerScheduler)
    results = fit(searcher, scheduler, tmp_path)
    runs = by_number(results)
    assert sorted(runs) == list(range(TRIALS)) and all(r.error is None for r in results)

    bad = runs[BAD]
    bad_id = bad.metrics["trial_id"]
    assert bad.metrics["step"] < STEPS  # stopped early, by us
    assert set(scheduler.pruned) == {bad_id}, scheduler.pruned
    record = scheduler.pruned[bad_id]
    assert record["optuna_number"] == BAD and record["step"] == bad.metrics["step"]
    assert phrase in record["reason"], record["reason"]

    study = searcher.study
    t = study.trials[BAD]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["prune_reason"] == record["reason"]
    assert t.user_attrs["pruned_at_step"] == bad.metrics["step"]
    for n in range(TRIALS):
        if n != BAD:
            assert runs[n].metrics["step"] == STEPS
            assert study.trials[n].state == TrialState.COMPLETE
            assert study.trials[n].value == pytest.approx(curve(n, STEPS))  # the last reported value
            assert study.trials[n].intermediate_values[STEPS] == pytest.approx(curve(n, STEPS))
    s = summarize(study)
    assert (s["completed"], s["pruned"], s["failed"], s["running"]) == (TRIALS - 1, 1, 0, 0)
    assert s["best"]["number"] == 2 and s["pruned_trials"][0]["reason"] == record["reason"]


def test_no_pruner_never_prunes(local_ray, tmp_path):
    spec = make_spec(tmp_path, "{type: none}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "none")
    results = fit(searcher, scheduler, tmp_path)
    runs = by_number(results)
    assert all(r.metrics["step"] == STEPS for r in results)
    assert scheduler.pruned == {}
    study = searcher.study
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * TRIALS
    assert study.trials[BAD].value == pytest.approx(curve(BAD, STEPS))
    assert runs[BAD].metrics["fd_randcnn"] == pytest.approx(curve(BAD, STEPS))


def test_asha_stops_are_pruned_in_optuna(local_ray, tmp_path):
    spec = make_spec(tmp_path, scheduler="asha", extra="asha: {grace_period: 1, reduction_factor: 2}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "asha")
    assert isinstance(scheduler, OptunaASHAScheduler)
    results = fit(searcher, scheduler, tmp_path)
    runs = by_number(results)
    bad_id = runs[BAD].metrics["trial_id"]
    assert runs[BAD].metrics["step"] < STEPS
    assert set(scheduler.pruned) == {bad_id}
    t = searcher.study.trials[BAD]
    assert t.state == TrialState.PRUNED and t.user_attrs["pruned_by"] == "asha"
    assert t.user_attrs["pruned_at_step"] == runs[BAD].metrics["step"]
    assert t.user_attrs["prune_reason"].startswith("asha: fd_randcnn")
    # ASHA also says STOP when a trial reaches max_t (= train.steps): that is a completion
    for n in range(TRIALS):
        if n != BAD:
            assert searcher.study.trials[n].state == TrialState.COMPLETE
            assert searcher.study.trials[n].value == pytest.approx(curve(n, STEPS))


def _seed_study(spec: Spec, storage: str, name: str, finished: int, running: int = 0) -> optuna.Study:
    """A study in a journal file with ``finished`` told trials (one PRUNED) and ``running`` untold ones."""
    study = open_study(spec, storage, name)
    for i in range(finished + running):
        t = study.ask()
        t.suggest_float("model.moca.momentum", 0.0, 0.99)
        t.suggest_categorical("model.moca.clusters", [1, 4, 8])
        if i < finished:
            t.report(5.0, 1)
            study.tell(t, 5.0 - i) if i == 0 else study.tell(t, state=TrialState.PRUNED)
    return study


def test_resume_asks_only_the_remaining_trials(tmp_path):
    storage = str(tmp_path / "optuna.journal")
    spec = make_spec(tmp_path, trials=5)
    _seed_study(spec, storage, "resume", finished=2)
    searcher = OptunaSearcher(spec, storage, "resume")  # a new process would do exactly this
    assert searcher.suggest("ray0")[OPTUNA_TRIAL_KEY] == 2
    assert searcher.suggest("rayX") is None  # max_concurrent 1: ask again when a trial ends
    assert searcher.set_max_concurrency(3) is True  # we limit concurrency, not Ray's ConcurrencyLimiter
    configs = [{OPTUNA_TRIAL_KEY: 2}] + [searcher.suggest(f"ray{i}") for i in (1, 2)]
    assert [c[OPTUNA_TRIAL_KEY] for c in configs] == [2, 3, 4]
    assert searcher.suggest("ray3") == Searcher.FINISHED  # 2 finished + 3 running = 5 planned
    searcher.on_trial_complete("ray0", result={"fd_randcnn": 1.5, "step": 6, "done": True})
    assert searcher.suggest("ray4") == Searcher.FINISHED  # a finished trial does not free a slot
    searcher.on_trial_complete("ray1", result={"step": 6, "done": True})  # the objective was never reported
    searcher.on_trial_complete("ray2", error=True)
    trials = searcher.study.trials
    assert (trials[2].state, trials[2].value) == (TrialState.COMPLETE, 1.5)
    assert trials[3].state == TrialState.FAIL and "without reporting 'fd_randcnn'" in trials[3].user_attrs["fail_reason"]
    assert trials[4].state == TrialState.FAIL and "raised an error" in trials[4].user_attrs["fail_reason"]
    s = summarize(searcher.study)
    assert (s["completed"], s["pruned"], s["failed"], s["best"]["value"]) == (2, 1, 2, 1.5)


def test_trial_stopped_before_its_end_is_retried(tmp_path):
    spec = make_spec(tmp_path, trials=3)
    searcher = OptunaSearcher(spec, str(tmp_path / "optuna.journal"), "retry")
    searcher.set_max_concurrency(3)
    first = searcher.suggest("a")
    searcher.suggest("b")
    # the experiment ended (time budget) while "a" ran: a last result without done
    searcher.on_trial_complete("a", result={"fd_randcnn": 3.0, "step": 2})
    retry = searcher.suggest("c")
    assert retry[OPTUNA_TRIAL_KEY] == 2
    assert {k: v for k, v in retry.items() if k != OPTUNA_TRIAL_KEY} == \
        {k: v for k, v in first.items() if k != OPTUNA_TRIAL_KEY}
    trials = searcher.study.trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["requeued"] is True
    assert trials[2].user_attrs["retry_of"] == 0
    assert searcher.suggest("d")[OPTUNA_TRIAL_KEY] == 3  # the failed one counts through its retry
    assert searcher.suggest("e") == Searcher.FINISHED


def test_resume_in_tuner_runs_exactly_three_more(local_ray, tmp_path):
    storage = str(tmp_path / "optuna.journal")
    spec = make_spec(tmp_path, "{type: none}", trials=5)
    _seed_study(spec, storage, "resume", finished=2)
    searcher, scheduler = build_search(spec, storage, "resume")
    results = fit(searcher, scheduler, tmp_path, num_samples=50)  # our searcher, not Ray, stops at 5
    assert sorted(by_number(results)) == [2, 3, 4]
    s = summarize(searcher.study)
    assert (s["trials"], s["completed"], s["pruned"], s["running"]) == (5, 4, 1, 0)


def test_orphaned_running_trial_is_failed_and_retried(local_ray, tmp_path):
    storage = str(tmp_path / "optuna.journal")
    spec = make_spec(tmp_path, "{type: none}", trials=3)
    seeded = _seed_study(spec, storage, "orphan", finished=1, running=1)
    orphan_params = seeded.trials[1].params
    searcher, scheduler = build_search(spec, storage, "orphan")
    results = fit(searcher, scheduler, tmp_path, num_samples=50, param_space={"fail_number": 3})
    runs = by_number(results)
    assert sorted(runs) == [2, 3]  # 1 finished + 2 new = 3 planned; the orphan counts through its retry
    trials = searcher.study.trials
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["requeued"] is True
    assert "not resumed by Ray" in trials[1].user_attrs["fail_reason"]
    assert trials[2].params == orphan_params and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].state == TrialState.COMPLETE
    # a trial that raises is FAIL with a reason, and is not retried
    assert runs[3].error is not None
    assert trials[3].state == TrialState.FAIL and "raised an error" in trials[3].user_attrs["fail_reason"]
    s = summarize(searcher.study)
    assert (s["trials"], s["completed"], s["failed"]) == (4, 2, 2)
    assert [f["number"] for f in s["failed_trials"]] == [1, 3]


class InterruptOnce(tune.Callback):
    """Sends the driver SIGINT (Ray Tune's graceful stop) when Optuna trial 1 reports step 3, once."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.config.get(OPTUNA_TRIAL_KEY) == 1 and result.get("step") == 3 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), 2)


def test_tuner_restore_reattaches_the_unfinished_trial(local_ray, tmp_path):
    storage = str(tmp_path / "optuna.journal")
    spec = make_spec(tmp_path, "{type: median, args: {n_startup_trials: 2}}")
    searcher, scheduler = build_search(spec, storage, "restore")
    marker = str(tmp_path / "interrupted")
    first = fit(searcher, scheduler, tmp_path, param_space={"checkpoint": True, "sleep": 0.1},
                callbacks=[InterruptOnce(marker)])
    assert os.path.exists(marker)
    assert sorted(by_number(first)) == [0, 1]
    assert searcher.study.trials[1].state == TrialState.RUNNING  # an interrupt is not a completion

    results = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), scripted).fit()
    runs = by_number(results)
    assert sorted(runs) == [0, 1, 2, 3]
    assert runs[1].metrics["started_at"] > 1  # continued from its checkpoint, same Optuna trial
    study = optuna.load_study(study_name="restore", storage=open_storage(storage))
    trials = study.trials
    assert len(trials) == TRIALS  # no duplicate, no orphan
    assert trials[1].state == TrialState.COMPLETE
    assert sorted(trials[1].intermediate_values) == list(range(1, STEPS + 1))
    assert trials[BAD].state == TrialState.PRUNED and "prune_reason" in trials[BAD].user_attrs


def test_restore_with_errored_trials_records_the_rerun(local_ray, tmp_path):
    storage = str(tmp_path / "optuna.journal")
    spec = make_spec(tmp_path, "{type: none}", trials=2)
    searcher, scheduler = build_search(spec, storage, "rerun")
    fixed = str(tmp_path / "fixed")  # the "bug" that made trial 1 crash is fixed once this exists
    first = fit(searcher, scheduler, tmp_path, num_samples=2, param_space={"fail_number": 1, "fail_unless": fixed})
    assert by_number(first)[1].error is not None
    assert searcher.study.trials[1].state == TrialState.FAIL

    Path(fixed).touch()
    results = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), scripted, resume_errored=True).fit()
    assert len(results) == 2 and all(r.error is None for r in results)
    study = optuna.load_study(study_name="rerun", storage=open_storage(storage))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert trials[2].value == pytest.approx(curve(1, STEPS))  # the curve of the Ray trial it re-ran
    s = summarize(study)
    assert (s["completed"], s["failed"]) == (2, 1)


def test_resumed_study_must_match_the_spec(tmp_path):
    storage = str(tmp_path / "optuna.journal")
    _seed_study(make_spec(tmp_path), storage, "s", finished=1)
    other = make_spec(tmp_path)
    other.sweep["params"]["model.moca.momentum"]["high"] = 0.5
    with pytest.raises(SweeperError, match="searched model.moca.momentum over"):
        OptunaSearcher(other, storage, "s")
    flipped = make_spec(tmp_path)
    flipped.sweep["objective"]["mode"] = "max"
    with pytest.raises(SweeperError, match="created to minimize"):
        OptunaSearcher(flipped, storage, "s")


# ---------------------------------------------------------------------------- patience stop
def test_no_new_best_counts_evaluations_since_the_best_one():
    dips_then_rises = {100: 3.5, 200: 3.12, 300: 3.2, 400: 3.3}
    assert no_new_best(dips_then_rises, "min", 3, "fd_randcnn") is None  # only 2 since the best
    assert no_new_best({**dips_then_rises, 500: 3.12}, "min", 3, "fd_randcnn") == \
        "no new best fd_randcnn in the last 3 evaluations (best 3.12 at step 200)"  # a tie is no new best
    assert no_new_best({**dips_then_rises, 500: 3.0}, "min", 3, "fd_randcnn") is None  # a new best resets it
    assert no_new_best(dips_then_rises, "max", 3, "acc") is not None  # maximised: the best was step 100
    assert no_new_best({1: float("nan"), 2: float("nan")}, "min", 2, "fid") == \
        "no new best fid in the last 2 evaluations (no finite value)"


def test_patience_stop_prunes_in_the_bridge_with_its_reason(tmp_path):
    """The pruner bridge on a scripted curve, no Ray run: a Ray trial record and reported results."""
    from ray.tune.experiment import Trial

    spec = make_spec(tmp_path, "{type: none}", extra="patience: {evaluations: 2}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "patience")
    config = searcher.suggest("ray-a")
    trial = Trial("scripted", config=config, trial_id="ray-a", stub=True)
    scheduler.on_trial_add(None, trial)
    decisions = [scheduler.on_trial_result(None, trial, {"step": s, "fd_randcnn": v})
                 for s, v in [(1, 5.0), (2, 4.0), (3, 4.5)]]
    assert decisions == ["CONTINUE"] * 3
    assert scheduler.on_trial_result(None, trial, {"step": 4, "fd_randcnn": 4.2}) == "STOP"
    reason = "no new best fd_randcnn in the last 2 evaluations (best 4 at step 2)"
    assert scheduler.pruned == {"ray-a": {"step": 4, "reason": reason, "optuna_number": 0}}
    t = searcher.study.trials[0]
    assert t.state == TrialState.PRUNED and t.user_attrs["pruned_by"] == "patience"


def test_patience_at_the_last_step_lets_the_trial_complete(tmp_path):
    from ray.tune.experiment import Trial

    spec = make_spec(tmp_path, "{type: none}", extra="patience: {evaluations: 1}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "patience-end")
    config = searcher.suggest("ray-b")
    trial = Trial("scripted", config=config, trial_id="ray-b", stub=True)
    scheduler.on_trial_add(None, trial)
    curve_ = [(s, 10.0 / s) for s in range(1, STEPS)] + [(STEPS, 99.0)]  # worse only at its last step
    assert [scheduler.on_trial_result(None, trial, {"step": s, "fd_randcnn": v}) for s, v in curve_] == \
        ["CONTINUE"] * STEPS
    assert scheduler.pruned == {}


@pytest.mark.parametrize("value", ["0", "2.5", "'three'"])
def test_patience_must_be_a_positive_count_of_evaluations(tmp_path, value):
    with pytest.raises(SweeperError, match=r"sweep\.patience\.evaluations.*expected an int >= 1"):
        make_spec(tmp_path, extra=f"patience: {{evaluations: {value}}}")


# ---------------------------------------------------------------------------- constraints
def test_constraints_reach_optunas_constrained_sampler_from_the_reported_metrics(tmp_path):
    from ray.tune.experiment import Trial

    spec = make_spec(tmp_path, "{type: none}", sampler="{type: tpe, seed: 0}",
                     extra="constraints: {memorized_frac: {max: 0.2}, loss_g: {min: 1.0}}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "constrained")
    for rid, memorized, level in [("ray-ok", 0.1, 1.0), ("ray-copier", 0.5, 0.0)]:
        trial = Trial("scripted", config=searcher.suggest(rid), trial_id=rid, stub=True)
        scheduler.on_trial_add(None, trial)
        for s in range(1, STEPS + 1):
            result = {"step": s, "fd_randcnn": level + 10.0 / s, "memorized_frac": memorized if s == STEPS else 0.0,
                      "loss_g": 2.0}
            assert scheduler.on_trial_result(None, trial, result) == "CONTINUE"
        searcher.on_trial_complete(rid, {**result, "done": True})  # Ray marks a natural end done
    ok, copier = searcher.study.trials
    assert ok.state == copier.state == TrialState.COMPLETE
    # loss_g (min 1.0: 1.0 - 2.0), then memorized_frac (max 0.2): sorted by name, the last report's values
    assert ok.user_attrs["constraint"] == pytest.approx([-1.0, -0.1])
    assert copier.user_attrs["constraint"] == pytest.approx([-1.0, 0.3])
    # what Optuna holds (Trial.set_constraint) and its samplers read: one named value per bound
    assert copier.constraints == pytest.approx({"loss_g.min": -1.0, "memorized_frac.max": 0.3})
    assert ok.constraints == pytest.approx({"loss_g.min": -1.0, "memorized_frac.max": -0.1})
    # the copier's objective is better, but Optuna counts it infeasible: its best trial is the other one
    assert copier.value < ok.value and searcher.study.best_trial.number == ok.number


def test_a_pruned_trial_that_reported_no_constrained_metric_is_infeasible_to_optuna(tmp_path):
    from ray.tune.experiment import Trial

    spec = make_spec(tmp_path, "{type: none}", sampler="{type: tpe, seed: 0}",
                     extra="constraints: {memorized_frac: {max: 0.2}}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "unreported")
    trial = Trial("scripted", config=searcher.suggest("ray-quiet"), trial_id="ray-quiet", stub=True)
    scheduler.on_trial_add(None, trial)
    scheduler.prune("ray-quiet", 0, 1, "scripted", by="test")  # before any result with the objective
    (quiet,) = searcher.study.trials
    assert quiet.state == TrialState.PRUNED and quiet.constraints == {"memorized_frac.max": float("inf")}


@pytest.mark.parametrize("extra,sampler,message", [
    ("constraints: {memorized_frac: {max: 0.2}}", "{type: random, seed: 0}", "the random sampler takes no constraints; use sampler tpe, gp"),
    ("constraints: {memorized_frac: {below: 0.2}}", "{type: tpe}", "expected {max: X} and/or {min: X}"),
])
def test_constraints_are_checked_in_the_spec(tmp_path, extra, sampler, message):
    with pytest.raises(SweeperError, match=r"sweep\.constraints.*" + re.escape(message)):
        make_spec(tmp_path, extra=extra, sampler=sampler)


def dips(config: dict) -> None:
    """One trial whose curve dips at step 3 and rises after; a checkpoint at every report."""
    for s in range(1, STEPS + 1):
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"step": s}))
            tune.report({"step": s, "fd_randcnn": 1.0 + abs(s - 3)}, checkpoint=tune.Checkpoint.from_directory(d))


def test_ray_keeps_the_best_checkpoint_by_the_objective_and_the_latest(local_ray, tmp_path):
    from sweeper.run.sweep import checkpoint_config

    tuner = tune.Tuner(dips, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="dips", verbose=0,
                                                 checkpoint_config=checkpoint_config({"metric": "fd_randcnn",
                                                                                      "mode": "min"})))
    (result,) = tuner.fit()
    kept = sorted(json.loads(p.read_text())["step"] for p in Path(result.path).glob("checkpoint_*/state.json"))
    assert kept == [3, STEPS]


@pytest.mark.parametrize("prune,warmup,stops_at", [(True, 2, 2), (True, 4, 4), (False, 2, None)])
def test_collapse_prune_stops_a_collapsed_trial_after_the_warmup_and_says_why(tmp_path, prune, warmup, stops_at):
    from ray.tune.experiment import Trial

    spec = make_spec(tmp_path, f"{{type: median, warmup_steps: {warmup}}}",
                     extra=f"collapse: {{metric: diversity_px, min: 0.35, prune: {str(prune).lower()}}}")
    searcher, scheduler = build_search(spec, str(tmp_path / "optuna.journal"), "flat")
    trial = Trial("scripted", config=searcher.suggest("ray-flat"), trial_id="ray-flat", stub=True)
    scheduler.on_trial_add(None, trial)
    stopped = None
    for s in range(1, STEPS + 1):
        result = {"step": s, "fd_randcnn": 1.0 / s, "diversity_px": 0.6 if s == 1 else 0.16}  # varied, then one face
        if scheduler.on_trial_result(None, trial, result) == "STOP":
            stopped = s
            break
    assert stopped == stops_at
    (t,) = searcher.study.trials
    assert t.user_attrs["collapsed"] == ("diversity_px 0.16 < min 0.35" if STEPS else "")
    if stops_at:
        assert t.state == TrialState.PRUNED and t.user_attrs["pruned_by"] == "collapse"
        assert t.user_attrs["prune_reason"] == "collapsed: diversity_px 0.16 < min 0.35"


def test_a_resumed_grid_sweep_keeps_its_grid_so_no_point_runs_twice_and_none_is_lost(tmp_path):
    """GridSampler shuffles its grid with the seed and stores each trial's place in it; the resume
    seed offset other samplers get would map the stored places to other points."""
    p = tmp_path / "grid.yaml"
    p.write_text("model: {family: toy}\ntrain: {steps: 2}\neval: {every: 1}\nsweep:\n"
                 "  objective: {metric: fd_randcnn, mode: min}\n  sampler: {type: grid, seed: 0}\n"
                 "  pruner: {type: none}\n  trials: 6\n  params:\n"
                 "    model.moca.momentum: {type: categorical, choices: [0.1, 0.5]}\n"
                 "    model.moca.clusters: {type: categorical, choices: [1, 4, 8]}\n")
    spec = load_spec(p)
    storage = str(tmp_path / "grid.journal")
    first = open_study(spec, storage, "grid")
    from sweeper.config.space import distributions

    dists = distributions(spec.sweep["params"])
    for _ in range(2):  # the first session asks two points and dies
        t = first.ask(dists)
        first.tell(t, 1.0)
    again = open_study(spec, storage, "grid")  # the resumed session
    assert again.sampler._all_grids == first.sampler._all_grids
    for i in range(4):
        t = again.ask(dists)
        if i < 3:  # the last tell would exhaust the grid (GridSampler then calls study.stop)
            again.tell(t, 1.0)
    points = [tuple(sorted(t.params.items())) for t in again.trials]
    assert len(set(points)) == 6, points  # 2 x 3 choices: each exactly once

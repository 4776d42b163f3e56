"""The sweep engine end to end: real Ray on 127.0.0.1, real Optuna, the embedded MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from sweeper.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from sweeper.search import open_storage  # noqa: E402
from sweeper.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

TINY = tiny_spec("tiny", sweep={
    "trials": 4,
    "max_concurrent": 1,
    "params": {"model.moca.memory_size": {"type": "int", "low": 2, "high": 16},
               "model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}},
})


def write_spec(tmp_path, name="tiny", **sweep):
    spec = {**TINY, "name": name, "storage": str(tmp_path / "sweeps"), "sweep": {**TINY["sweep"], **sweep}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def study_of(tmp_path, name):
    st = open_storage(str(tmp_path / "sweeps" / name / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=st)


def test_demo_space_completes_trials_prunes_with_a_reason_and_reports_the_true_best(tmp_path):
    summary = run_sweep(str(ROOT / "search_spaces/demo.yaml"), overrides={"storage": str(tmp_path / "sweeps")},
                        num_cpus=2)
    study = study_of(tmp_path, "demo")
    states = [t.state for t in study.trials]
    finished = [s for s in states if s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 6
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the Optuna pruner stopped no trial"
    for t in pruned:
        assert t.user_attrs["prune_reason"] and "fd_randcnn" in t.user_attrs["prune_reason"]
        assert 0 < t.user_attrs["pruned_at_step"] < 120
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert summary["best"]["number"] == best.number and summary["best"]["value"] == pytest.approx(best.value)
    assert summary["pruned"] == len(pruned) and summary["completed"] == len(complete)
    assert json.loads((tmp_path / "sweeps/demo/summary.json").read_text())["best"]["number"] == best.number


def test_sweep_killed_after_two_trials_resumes_to_the_planned_count_without_rerunning_finished_trials(tmp_path):
    p = write_spec(tmp_path, "killme", trials=4)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(p)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "sweeps/killme/optuna.journal"
    deadline = time.time() + 420
    done = 0
    try:
        while time.time() < deadline:
            if journal.exists():
                done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study_of(tmp_path, "killme").trials)
                if done >= 2:
                    break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    assert done >= 2
    first = {t.number: t.params for t in study_of(tmp_path, "killme").trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study = study_of(tmp_path, "killme")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    # A finished trial is never run again: no later trial repeats its Optuna number or is a retry of it.
    assert all(t.user_attrs.get("retry_of") not in first for t in study.trials)
    for n, params in first.items():
        assert study.trials[n].state == optuna.trial.TrialState.COMPLETE and study.trials[n].params == params
    ray_dirs = [d for d in (tmp_path / "sweeps/killme/trials").iterdir() if d.is_dir()]
    steps_per_trial = []
    for d in ray_dirs:
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() else []
        steps_per_trial.append([json.loads(x)["step"] for x in lines])
    for steps in steps_per_trial:
        assert len(steps) == len(set(steps)), steps  # no trial reported a step twice

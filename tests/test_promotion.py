"""``scheduler: promotion`` on scripted curves: trials pause at rungs, the best fraction of each rung
resumes from the checkpoint of the step it paused at (no step trained twice or skipped), the rest
end PRUNED with a reason, in Optuna and in MLflow. One real sweep (local Ray, MLflow on SQLite)
of a family defined here whose objective is a scripted curve of its config."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn as nn
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from models import ModelFamily, register_model  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.search.study import open_storage  # noqa: E402
from sweeper.config.space import load_spec, promotion_rungs  # noqa: E402
from sweeper.run.sweep import run_sweep  # noqa: E402

# One trial each, lower is better at every step. The grid sampler (seed 0) runs them in the order
# 2, 3, 1, 4, one at a time: 2 pauses at step 10 (alone at its rung), 3 arrives there and pauses,
# which makes 2 the best half of two: 2 resumes from its step-10 checkpoint, pauses at 20, and so on.
LEVELS = [4.0, 1.0, 2.0, 3.0]
STEPS, EVERY = 30, 10  # rungs at 10 and 20 with reduction factor 2; the last evaluation at 30


@register_model("test_scripted")
class Scripted(ModelFamily):
    """No learning: the objective ``scripted`` is ``level + 10/step``, reported by the training step
    (the loop logs the last step's values at every evaluation); ``trained`` counts train_step calls
    and lives in the state, so a resumed trial that trained a step twice (or skipped one) shows it."""

    DEFAULTS = {"level": 1.0}
    IMAGE_SIZES = (32,)

    def __init__(self, cfg, image_size, seed=0, device="cpu", precision="fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        self.net = nn.Linear(1, 1)
        self.trained = 0

    def networks(self):
        return {"net": self.net}

    def train_step(self, batch, step):
        self.trained += 1
        return {"scripted": self.cfg["level"] + 10.0 / (step + 1), "trained_steps": float(self.trained)}

    def sample(self, n, seed):
        return torch.zeros(n, 3, self.image_size, self.image_size)

    def state_dict(self):
        return {"net": self.net.state_dict(), "trained": self.trained}

    def load_state_dict(self, sd):
        self.net.load_state_dict(sd["net"])
        self.trained = int(sd["trained"])


def spec_file(tmp_path: Path, **promotion: Any) -> Path:
    spec = {
        "name": "promo", "seed": 0, "storage": str(tmp_path / "sweeps"),
        "data": {"path": "builtin:lfw-faces", "image_size": 32},
        "model": {"family": "test_scripted"},
        "train": {"steps": STEPS, "batch_size": 4, "checkpoint_every": EVERY},
        "eval": {"every": EVERY, "n_gen": 8, "batch_size": 8, "features": "randcnn", "metrics": [],
                 "grid_size": 4},
        "sweep": {"objective": {"metric": "scripted", "mode": "min"}, "sampler": {"type": "grid", "seed": 0},
                  "scheduler": "promotion", "promotion": {"min_step": EVERY, "reduction_factor": 2, **promotion},
                  "trials": len(LEVELS), "max_concurrent": 1, "resources": {"cpus": 1},
                  "params": {"model.level": {"type": "categorical", "choices": LEVELS}}},
    }
    p = tmp_path / "promo.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_rungs_fall_on_evaluation_steps_or_the_spec_is_refused(tmp_path):
    spec = load_spec(spec_file(tmp_path))
    assert promotion_rungs(spec.sweep["promotion"], spec.run_config) == [10, 20]
    with pytest.raises(SweeperError) as e:
        load_spec(spec_file(tmp_path, min_step=15))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "sweep.promotion.min_step" in msg
    assert "rung step 15" in msg and "eval.every 10" in msg and "multiple of 10" in msg


def load_study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="promo", storage=open_storage(str(tmp_path / "sweeps/promo/optuna.journal")))


def trial_runs(tmp_path: Path) -> dict[str, Any]:
    """``{optuna number: MLflow run}`` of the sweep's trial runs, and the client."""
    from sweeper.store.tracking import mlflow_client, tracking_uri

    client = mlflow_client(tracking_uri({}, str(tmp_path / "sweeps" / "promo")))
    exp = client.get_experiment_by_name("promo").experiment_id
    runs = {r.data.tags["sweeper.optuna_trial"]: r for r in client.search_runs([exp], "tags.`sweeper.role` = 'trial'")}
    return client, runs


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict[str, Any], str]:
    """One finished promotion sweep, shared: (its folder, run_sweep's summary, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("promo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run_sweep(str(spec_file(tmp_path)), num_cpus=2)
    return tmp_path, summary, out.getvalue()


def test_promotion_pauses_resumes_from_the_rung_checkpoint_and_prunes_the_rest(finished):
    tmp_path, summary, out = finished
    study = load_study(tmp_path)
    by_level = {t.params["model.level"]: t for t in study.trials}
    assert sorted(by_level) == sorted(LEVELS)
    S = optuna.trial.TrialState
    assert by_level[1.0].state == S.COMPLETE  # the best curve is never lost
    for rung in (10, 20):
        # every trial that reached the rung: the best half (at least one) went on past it; a trial
        # that did not go on ended PRUNED there, with the cutoff in its reason
        there = sorted((t for t in study.trials if rung in t.intermediate_values), key=lambda t: t.intermediate_values[rung])
        top = there[: max(1, len(there) // 2)]
        assert all(rung + EVERY in t.intermediate_values for t in top), rung
        assert all(rung in t.user_attrs["promoted_at_steps"] for t in top)
        for t in there:
            if rung + EVERY in t.intermediate_values:
                continue
            reason = t.user_attrs["prune_reason"]
            assert t.state == S.PRUNED and t.user_attrs["pruned_at_step"] == rung and t not in top
            assert t.user_attrs["pruned_by"] == "promotion" and "not promoted" in reason
            assert f"scripted {t.intermediate_values[rung]:.4g} at rung step {rung} > cutoff" in reason, reason
    assert by_level[4.0].state == S.PRUNED and by_level[4.0].user_attrs["pruned_at_step"] == 10  # worst
    assert summary["completed"] + summary["pruned"] == len(LEVELS) and summary["pruned"] >= 2
    resumed = [t for t in study.trials if t.user_attrs.get("resumed_from_steps")]
    assert resumed, "no trial was paused and then resumed; the sweep did not exercise promotion"
    # the progress lines count the held trials
    assert re.search(r"\[sweeper\] promo: \d+ running, [1-9]\d* paused, \d+ promoted, ", out), out[-2000:]

    client, runs = trial_runs(tmp_path)
    assert len(runs) == len(LEVELS)
    for t in study.trials:
        run = runs[str(t.number)]
        end = STEPS if t.state == S.COMPLETE else t.user_attrs["pruned_at_step"]
        curve = client.get_metric_history(run.info.run_id, "scripted")
        steps = sorted(m.step for m in curve)
        assert steps == list(range(EVERY, end + 1, EVERY)), (t.params, steps)  # none repeated, none missing
        trained = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "trained_steps")}
        assert trained == {s: float(s) for s in steps}  # resumed exactly at the step it paused at
        assert run.data.tags["sweeper.status"] == ("completed" if t.state == S.COMPLETE else "pruned")
        if t.state == S.PRUNED:
            assert run.data.tags["sweeper.prune_reason"] == t.user_attrs["prune_reason"]
        if t.user_attrs.get("resumed_from_steps"):
            assert run.data.tags["sweeper.promoted_at_steps"].split(",")[0] == str(t.user_attrs["resumed_from_steps"][0])


def record_of(tmp_path: Path) -> dict[str, Any]:
    """Everything a re-run must leave as it is: each Optuna trial's state, values and attributes,
    and every metric point of every trial run."""
    study = load_study(tmp_path)
    client, runs = trial_runs(tmp_path)
    metrics = {}
    for n, run in runs.items():
        for key in client.get_run(run.info.run_id).data.metrics:
            metrics[(n, key)] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    trials = {t.number: (t.state, dict(t.intermediate_values), dict(t.user_attrs)) for t in study.trials}
    return {"trials": trials, "metrics": metrics}


def test_rerunning_a_finished_promotion_sweep_trains_nothing_and_changes_no_record(finished):
    tmp_path, summary, _ = finished
    before = record_of(tmp_path)
    assert any(s == optuna.trial.TrialState.PRUNED and max(iv) < STEPS for s, iv, _ in before["trials"].values())
    again = run_sweep(str(spec_file(tmp_path)), num_cpus=2)  # the same command once more
    after = record_of(tmp_path)
    for n, (state, values, attrs) in before["trials"].items():
        assert after["trials"][n] == (state, values, attrs), n  # no value past its rung, no new decision
    assert after["trials"] == before["trials"]
    assert after["metrics"] == before["metrics"]  # no step logged, none trained
    assert again["cost"] == summary["cost"]
    assert {k: again[k] for k in ("completed", "pruned", "failed")} == {k: summary[k] for k in ("completed", "pruned", "failed")}


DRIVER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_promotion  # registers the scripted family; binds Ray to loopback
from sweeper.run.sweep import run_sweep
run_sweep(sys.argv[3], num_cpus=2)
"""


def paused_trials(tmp_path: Path) -> list[int]:
    journal = tmp_path / "sweeps/promo/optuna.journal"
    if not journal.exists():
        return []
    return [t.number for t in load_study(tmp_path).trials
            if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("paused_at_step") is not None]


def test_a_sweep_killed_with_a_paused_trial_resumes_it_at_its_rung_and_loses_or_repeats_nothing(tmp_path):
    p = spec_file(tmp_path)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", DRIVER, str(root / "tests"), str(root), str(p)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, paused = time.time() + 240, []
    try:
        while time.time() < deadline and not paused:
            assert proc.poll() is None, "the sweep ended before a trial was paused"
            time.sleep(0.5)
            paused = paused_trials(tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert paused, "no trial was paused within 240 s"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    study = load_study(tmp_path)
    S = optuna.trial.TrialState
    assert sorted(t.params["model.level"] for t in study.trials) == sorted(LEVELS)  # nothing lost, none retried
    assert all(t.state in (S.COMPLETE, S.PRUNED) for t in study.trials)
    client, runs = trial_runs(tmp_path)
    for t in study.trials:
        promoted = t.user_attrs.get("promoted_at_steps") or []
        for rung in (10, 20):  # never a step past a rung it was not promoted from
            if rung + EVERY in t.intermediate_values:
                assert rung in promoted, (t.number, t.intermediate_values, promoted)
        rid = runs[str(t.number)].info.run_id
        curve = [m.step for m in client.get_metric_history(rid, "scripted")]
        assert sorted(curve) == sorted(t.intermediate_values), (t.number, curve)  # MLflow = Optuna
        assert len(curve) == len(set(curve)), curve  # no step logged twice
        trained = {m.step: m.value for m in client.get_metric_history(rid, "trained_steps")}
        assert trained == {s: float(s) for s in curve}  # no step trained twice or skipped
    for n in paused:  # the trial paused at the kill went on only if promoted, and ended in a state
        t = study.trials[n]
        assert t.state in (S.COMPLETE, S.PRUNED) and 10 in t.intermediate_values


def test_each_trial_run_reports_its_start_up_and_ray_reuses_trial_processes(finished):
    """Every run of a trial (its start and each resume) reports when its start-up phases ended, in
    order; trials run in processes an earlier trial ran in (Ray's actor reuse: python, torch, MLflow
    and the evaluator are set up once per process)."""
    import json

    tmp_path, _, _ = finished
    order = ["imported", "entry", "imports", "data", "model", "evaluator", "reference", "tracking", "first_step"]
    starts = []
    for f in (tmp_path / "sweeps/promo/trials").glob("*/result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        starts += [r["startup"] | {"reported_at": r["reported_at"]} for r in rows if isinstance(r.get("startup"), dict)]
        assert isinstance(rows[0].get("startup"), dict), f  # the first report of the trial has it
    resumed = [t for t in load_study(tmp_path).trials if t.user_attrs.get("resumed_from_steps")]
    assert len(starts) >= len(LEVELS) + len(resumed)  # one per start and per resume from a pause
    for s in starts:
        times = [s[k] for k in order]
        assert times == sorted(times) and s["first_step"] <= s["reported_at"], s
        assert s["process"] is None or s["process"] <= s["imported"] + 1.0  # /proc's start has 10 ms ticks
    assert any(s["trials_before"] >= 1 for s in starts), "every trial ran in a new process"

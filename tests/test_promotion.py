"""``scheduler: promotion`` on scripted curves: trials pause at rungs, the best fraction of each rung
resumes from the checkpoint of the step it paused at (no step trained twice or skipped), the rest
end PRUNED with a reason, in Optuna and in MLflow. One real sweep (local Ray, MLflow on SQLite)
of a family defined here whose objective is a scripted curve of its config."""

from __future__ import annotations

import re
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


def test_promotion_pauses_resumes_from_the_rung_checkpoint_and_prunes_the_rest(tmp_path, capsys):
    from sweeper.store.tracking import mlflow_client, tracking_uri

    p = spec_file(tmp_path)
    summary = run_sweep(str(p), num_cpus=2)
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="promo", storage=open_storage(str(tmp_path / "sweeps/promo/optuna.journal")))
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

    client = mlflow_client(tracking_uri({}, str(tmp_path / "sweeps" / "promo")))
    exp = client.get_experiment_by_name("promo").experiment_id
    runs = {r.data.tags["sweeper.optuna_trial"]: r for r in client.search_runs([exp], "tags.`sweeper.role` = 'trial'")}
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

"""Families other than MoCA-FastGAN through real sweeps: the patch-LUT CPU space, and a family
defined only in this file (nothing in sweeper/ or models/ knows it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from models import ModelFamily, cpu_generator, noise, register_model  # noqa: E402
from sweeper.cli import main  # noqa: E402
from sweeper.search.study import open_storage  # noqa: E402
from sweeper.run.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def spec_copy(tmp_path: Path, space: str, **sweep: Any) -> Path:
    """The shipped space with storage in tmp_path, randcnn features (and sweep keys replaced)."""
    spec = yaml.safe_load((ROOT / "search_spaces" / space).read_text())
    spec["storage"] = str(tmp_path / "sweeps")
    # The shipped space ranks by Inception FID (~10 s per 32 samples on a CPU core); the test runs
    # its machinery on the cheap randcnn features, the same space otherwise.
    spec["eval"]["features"], spec["sweep"]["objective"] = "randcnn", {"metric": "fd_randcnn", "mode": "min"}
    spec["sweep"].update(sweep)
    p = tmp_path / space
    p.write_text(yaml.safe_dump(spec))
    return p


def study_of(spec: Path) -> optuna.Study:
    name = yaml.safe_load(spec.read_text())["name"]
    st = open_storage(str(spec.parent / "sweeps" / name / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=st)


def test_patch_lut_cpu_space_sweeps_prunes_with_a_reason_and_its_best_config_trains(tmp_path, capsys):
    spec = spec_copy(tmp_path, "patch_lut_cpu.yaml")
    summary = run_sweep(str(spec), num_cpus=2)
    study = study_of(spec)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and pruned, [t.state for t in study.trials]
    for t in pruned:
        assert "fd_randcnn" in t.user_attrs["prune_reason"] and 0 < t.user_attrs["pruned_at_step"] < 60
    assert summary["completed"] == len(complete) and summary["pruned"] == len(pruned)

    out = tmp_path / "best"
    assert main(["best", "--space", str(spec), "--top", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    table = printed.out + printed.err
    assert "fd_randcnn" in table and "dictionary_size" in table
    best_cfg = yaml.safe_load((out / "1.yaml").read_text())
    assert best_cfg["model"]["family"] == "patch_lut"
    assert best_cfg["model"]["dictionary_size"] == min(complete, key=lambda t: t.value).params["model.dictionary_size"]
    run_dir = tmp_path / "retrain"
    assert main(["train", str(out / "1.yaml"), "--steps", "20", "--out", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "step_00000020.pt").is_file()
    assert sorted(p.name for p in (run_dir / "eval").glob("dictionary_*.png")) == \
        ["dictionary_0000020.png", "dictionary_gram_0000020.png"]


# ---------------------------------------------------------------------------- a family of this file only
@register_model("test_tiny_vae")
class TinyVAE(ModelFamily):
    """A minimal VAE: enough to prove a family needs no change to sweeper/ to be swept."""

    DEFAULTS = {"z_dim": 8, "hidden": 32, "lr": 1.0e-3, "beta": 1.0}
    IMAGE_SIZES = (32,)
    TINY: dict[str, Any] = {}

    @classmethod
    def validate(cls, cfg, image_size):
        super().validate(cfg, image_size)
        for key in ("z_dim", "hidden", "lr", "beta"):
            cls.need(cfg[key] > 0, key, f"must be > 0, got {cfg[key]}")

    def __init__(self, cfg, image_size, seed=0, device="cpu", precision="fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        torch.manual_seed(seed)
        pix, h, z = 3 * image_size * image_size, cfg["hidden"], cfg["z_dim"]
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(pix, h), nn.ReLU(), nn.Linear(h, 2 * z))
        self.dec = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, pix), nn.Tanh())
        self.opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=cfg["lr"])

    def networks(self):
        return {"enc": self.enc, "dec": self.dec}

    def train_step(self, batch, step):
        mu, logvar = self.enc(batch).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = F.mse_loss(self.dec(z), batch.flatten(1), reduction="sum") / len(batch)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1).mean()
        loss = rec + self.cfg["beta"] * kl
        self.opt.zero_grad()
        loss.backward()
        self.average_gradients(self.enc, self.dec)
        self.opt.step()
        return {"loss_rec": rec.item(), "loss_kl": kl.item()}

    def sample(self, n, seed):
        z = noise((n, self.cfg["z_dim"]), cpu_generator(seed))
        with self.sampling():
            return self.dec(z).view(n, 3, self.image_size, self.image_size)

    def state_dict(self):
        return {"enc": self.enc.state_dict(), "dec": self.dec.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd):
        self.enc.load_state_dict(sd["enc"])
        self.dec.load_state_dict(sd["dec"])
        self.opt.load_state_dict(sd["opt"])


def test_a_family_defined_only_in_a_test_file_sweeps_end_to_end(tmp_path):
    assert "models" not in TinyVAE.__module__
    spec = {
        "name": "toyvae", "seed": 0, "storage": str(tmp_path / "sweeps"),
        "data": {"path": "builtin:lfw-faces", "image_size": 32},
        "model": {"family": "test_tiny_vae"},
        "train": {"steps": 20, "batch_size": 8, "checkpoint_every": 10},
        "eval": {"every": 10, "n_gen": 32, "features": "randcnn"},
        "sweep": {"objective": {"metric": "fd_randcnn", "mode": "min"}, "sampler": {"type": "random", "seed": 0},
                  "pruner": "none", "trials": 2, "max_concurrent": 2, "resources": {"cpus": 1},
                  "params": {"model.beta": {"type": "float", "low": 0.1, "high": 2.0, "log": True}}},
    }
    p = tmp_path / "toyvae.yaml"
    p.write_text(yaml.safe_dump(spec))
    summary = run_sweep(str(p), num_cpus=2)
    assert summary["completed"] == 2
    study = study_of(p)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == t.value  # finite, not NaN
        assert set(t.intermediate_values) == {10, 20}

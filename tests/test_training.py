"""`sweeper train`: checkpoints, grids, exact resume, divergence, CLI errors."""

import subprocess
import sys

import pytest
import torch
import yaml

from sweeper.cli import main
from sweeper.config.run_config import load_config
from sweeper.errors import TrainingDiverged
from sweeper.run.trainer import Trainer, list_checkpoints

from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

TINY = tiny_spec("tiny", seed=3, model={"moca": {"clusters": 4}}, train={"steps": 40, "checkpoint_every": 20},
                 eval={"every": 20})


def write_cfg(tmp_path, **over):
    cfg = {**TINY, "storage": str(tmp_path / "runs"), **over}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def flat_state(trainer):
    out = {}
    for part, sd in trainer.model.state_dict().items():
        if part.startswith("opt"):
            for k, st in sd["state"].items():
                for name, v in st.items():
                    out[f"{part}.{k}.{name}"] = v
        else:
            out.update({f"{part}.{k}": v for k, v in sd.items()})
    return out


def test_resume_after_20_steps_equals_an_uninterrupted_40_step_run(tmp_path):
    cfg = load_config(write_cfg(tmp_path))
    whole = Trainer(cfg, tmp_path / "whole", progress=False, evaluate=False)
    whole.fit(steps=40)
    first = Trainer(cfg, tmp_path / "split", progress=False, evaluate=False)
    first.fit(steps=20)
    second = Trainer(cfg, tmp_path / "split", progress=False, evaluate=False)  # a fresh process would do this
    second.fit(steps=40, resume=True)
    a, b = flat_state(whole), flat_state(second)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    assert second.model.generator.attn.forwards.item() == 40


def test_checkpoints_and_sample_grids_at_every_checkpoint(tmp_path):
    p = write_cfg(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(p), "--steps", "40", "--out", str(out), "--no-eval"]) == 0
    assert [s for s, _ in list_checkpoints(str(out / "checkpoints"))] == [20, 40]
    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_00000020.png", "step_00000040.png"]
    assert grids[0].stat().st_size > 500
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["moca"]["memory_size"] == 8


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    cfg = load_config(write_cfg(tmp_path, model={**TINY["model"], "lr": 1.0e30}))
    run = Trainer(cfg, tmp_path / "nan", progress=False, evaluate=False)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: non-finite loss") as e:
        run.fit(steps=40)
    assert 1 <= e.value.step <= 40


def test_cli_config_mistake_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  family: moca_fastgan\n  moca:\n    memroy_size: 4\n")
    r = subprocess.run([sys.executable, "-m", "sweeper.cli", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"{p}:4: model.moca.memroy_size: unknown key 'memroy_size'; did you mean 'memory_size'?" in r.stderr


def test_data_subset_hands_the_left_out_images_to_family_metrics_as_heldout(tmp_path):
    """With data.subset: K the evaluator also holds the other images; the VMA-VAE family then
    reports its bound on them (``*_heldout``) beside the one on its training images."""
    from models import get_family

    tiny = get_family("vma_vae").TINY
    cfg = load_config(write_cfg(tmp_path, model={"family": "vma_vae", **tiny}, data={**TINY["data"], "subset": 60},
                                eval={"every": 2, "n_gen": 16, "features": "randcnn", "grid_size": 0}))
    run = Trainer(cfg, tmp_path / "held", progress=False)
    assert len(run.images) == 60 and len(run.evaluator.heldout_images) == 40
    result = run.fit(steps=2)
    held = [k for k in result["metrics"] if k.endswith("_heldout")]
    assert held and all(result["metrics"][k] == result["metrics"][k] for k in held)  # present, not NaN


def test_progress_bar_shows_one_rate_the_losses_and_the_last_evaluation(tmp_path, capsys):
    from sweeper.run.trainer import progress_text

    assert progress_text({"loss_d_real": 0.8123, "loss_g": 1.2}, ("fd_randcnn", 3.4156)) == \
        "d_real=0.812 g=1.200 | fd_randcnn 3.42"
    assert progress_text({"loss_denoise": 0.05}, None) == "denoise=0.050"
    p = write_cfg(tmp_path, train={**TINY["train"], "log_every": 20})
    assert main(["train", str(p), "--steps", "40", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    bar = [ln for ln in err.replace("\r", "\n").splitlines() if "40/40" in ln][-1]
    # tqdm's one rate, no second one (a loaded machine slower than 1 step/s shows it as s/step)
    assert "it/s" not in bar and "s/it" not in bar and bar.count("step/s") + bar.count("s/step") == 1
    assert "d_real=" in bar and "| fd_randcnn " in bar  # losses, then the evaluation at step 20

"""Multi-worker trials: Ray Train TorchTrainer, DDP over gloo on CPU (NCCL on GPU is the same code)."""

import os
import tempfile

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray node on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from sweeper.config.run_config import resolve  # noqa: E402

from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

CFG = tiny_spec("ddp", seed=1, model={"moca": {"clusters": 4}}, train={"steps": 10, "checkpoint_every": 10},
                eval={"n_gen": 16})


# the local_ray fixture (conftest.py): one local Ray for the module; 3 logical CPUs: two 1-CPU
# workers plus the supervising trial's token share.
RAY_CPUS = 3


def test_the_private_ray_api_for_the_autoscaler_config_is_still_there(local_ray):
    """sweeper.run.sweep.ray_cluster_config is the only private Ray API sweeper calls; if a Ray
    upgrade moves it, this fails loudly (a local Ray has no autoscaler config: None)."""
    from sweeper.run.sweep import autoscalable_node_resources, ray_cluster_config

    config = ray_cluster_config()
    assert config is None or hasattr(config, "node_group_configs")
    assert isinstance(autoscalable_node_resources(), list)


def _worker(c):
    import torch.distributed as dist

    from sweeper.run.trainer import Trainer

    tr = Trainer(c["cfg"], out_dir=tempfile.mkdtemp(), progress=False, evaluate=False)
    tr.fit(steps=10)
    attn = tr.model.generator.attn
    torch.save({"memory": attn.memory.clone(), "centres": attn.centres.clone(), "forwards": int(attn.forwards),
                "theta": attn.theta.weight.detach().clone(), "world": dist.get_world_size()},
               os.path.join(c["out"], f"rank{dist.get_rank()}.pt"))


def test_two_gloo_workers_hold_byte_identical_moca_memory_after_10_steps(local_ray, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve({**CFG, "storage": str(tmp_path)})
    TorchTrainer(
        _worker, train_loop_config={"cfg": cfg, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ddp"),
    ).fit()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["forwards"] == r1["forwards"] == 10
    assert r0["memory"].numpy().tobytes() == r1["memory"].numpy().tobytes()
    assert torch.equal(r0["centres"], r1["centres"])
    assert torch.equal(r0["theta"], r1["theta"])  # averaged gradients keep the weights in step
    fresh = resolve({**CFG, "storage": str(tmp_path)})
    from models import build_model

    init = build_model(fresh["model"], 32, seed=1).generator.attn.memory
    assert not torch.equal(init, r0["memory"])  # the memory was really written


def test_a_two_worker_trial_runs_through_the_sweep_and_reports_every_evaluation(local_ray, tmp_path):
    import json

    import optuna
    import yaml

    from sweeper.search.study import open_storage
    from sweeper.run.sweep import run_sweep

    spec = tiny_spec("ddpsweep", seed=1, storage=str(tmp_path / "sweeps"), model={"moca": {"clusters": 4}},
                     train={"checkpoint_every": 5}, eval={"n_gen": 16, "every": 5}, sweep={
                         "trials": 1, "max_concurrent": 1, "resources": {"cpus": 2, "workers": 2},
                         "params": {"model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}}})
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(spec))
    summary = run_sweep(str(p))  # joins the module's Ray
    assert summary["completed"] == 1
    study = optuna.load_study(study_name="ddpsweep",
                              storage=open_storage(str(tmp_path / "sweeps/ddpsweep/optuna.journal")))
    t = study.trials[0]
    assert sorted(t.intermediate_values) == [5, 10, 15, 20] and t.value == t.intermediate_values[20]
    rows = [json.loads(x) for f in (tmp_path / "sweeps/ddpsweep/trials").glob("*/result.json")
            for x in f.read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and all(r.get("checkpoint_path") for r in rows)
    # 4 evaluations, 4 checkpoints reported: the Train run keeps the best and the latest only.
    kept = [d for d in (tmp_path / "sweeps/ddpsweep").glob("*-ddp/checkpoint_*") if d.is_dir()]
    assert 1 <= len(kept) <= 2, kept


# ---------------------------------------------------------------------------- one rank diverges
from models import register_model  # noqa: E402
from models.patch_lut import PatchLUT  # noqa: E402


@register_model("test_nan_on_rank1")
class NanOnRank1(PatchLUT):
    """The patch-LUT denoiser, except that rank 1 alone reports a non-finite loss from step
    ``nan_at_step`` on (0: never), as a rank whose shard holds a bad batch would."""

    DEFAULTS = {**PatchLUT.DEFAULTS, "nan_at_step": 0}
    TINY = PatchLUT.TINY

    def train_step(self, batch, step=0):
        import torch.distributed as dist

        losses = super().train_step(batch, step)
        bad = self.cfg["nan_at_step"] and step + 1 >= self.cfg["nan_at_step"] and dist.get_rank() == 1
        return {**losses, "loss_denoise": float("nan")} if bad else losses


def test_a_rank_that_diverges_alone_ends_its_trial_as_failed_and_the_sweep_goes_on(local_ray, tmp_path):
    """Every rank agrees on one all-reduced finite flag, so rank 0 does not wait forever in the
    next all-reduce while rank 1 has stopped: the trial fails with the step, the next one runs."""
    import threading

    import optuna
    import yaml

    from sweeper.search.study import open_storage
    from sweeper.run.sweep import run_sweep

    spec = {"name": "ddpnan", "seed": 0, "storage": str(tmp_path / "sweeps"),
            "data": {"path": "builtin:lfw-faces", "image_size": 32},
            "model": {"family": "test_nan_on_rank1", **PatchLUT.TINY},
            "train": {"steps": 8, "batch_size": 4, "checkpoint_every": 4},
            "eval": {"every": 4, "features": "randcnn", "n_gen": 16},
            "sweep": {"objective": {"metric": "fd_randcnn", "mode": "min"}, "pruner": "none",
                      "sampler": {"type": "grid"}, "trials": 2, "max_concurrent": 1,
                      "resources": {"cpus": 2, "workers": 2},
                      "params": {"model.nan_at_step": {"type": "categorical", "choices": [3, 0]}}}}
    p = tmp_path / "ddpnan.yaml"
    p.write_text(yaml.safe_dump(spec))
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(run_sweep(str(p))), daemon=True)
    runner.start()
    runner.join(timeout=400)
    assert not runner.is_alive(), "the sweep hung after one rank diverged"
    study = optuna.load_study(study_name="ddpnan", storage=open_storage(str(tmp_path / "sweeps/ddpnan/optuna.journal")))
    by_param = {t.params["model.nan_at_step"]: t for t in study.trials}
    failed, healthy = by_param[3], by_param[0]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "diverged at step 3" in failed.user_attrs["fail_reason"]
    assert healthy.state == optuna.trial.TrialState.COMPLETE and sorted(healthy.intermediate_values) == [4, 8]

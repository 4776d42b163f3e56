"""Multi-worker trials: Ray Train TorchTrainer, DDP over gloo on CPU (NCCL on GPU is the same code)."""

import os
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray node on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from sweeper.config import resolve  # noqa: E402

CFG = {
    "name": "ddp", "seed": 1, "data": {"path": "builtin:lfw-faces", "image_size": 32},
    "model": {"family": "moca_fastgan", "width": 0.0625, "z_dim": 16,
              "moca": {"layer": 16, "dim": 8, "clusters": 4, "memory_size": 8}},
    "train": {"steps": 10, "batch_size": 4, "checkpoint_every": 10},
    "eval": {"every": 10, "features": "randcnn", "n_gen": 16},
}


@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test files

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    yield ray
    ray.shutdown()


def _worker(c):
    import torch.distributed as dist

    from sweeper.trainer import Trainer

    tr = Trainer(c["cfg"], out_dir=tempfile.mkdtemp(), progress=False, evaluate=False)
    tr.fit(steps=10)
    attn = tr.model.generator.attn
    torch.save({"memory": attn.memory.clone(), "centres": attn.centres.clone(), "forwards": int(attn.forwards),
                "theta": attn.theta.weight.detach().clone(), "world": dist.get_world_size()},
               os.path.join(c["out"], f"rank{dist.get_rank()}.pt"))


def test_two_gloo_workers_hold_byte_identical_moca_memory_after_10_steps(ray_local, tmp_path):
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

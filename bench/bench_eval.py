"""Evaluation cost, measured side by side in one run: ours vs clean-fid's folder workflow.

    .venv/bin/python bench/bench_eval.py            # ~3-5 min on 2 CPU cores

1. One evaluation with a warm reference cache (generator -> uint8 -> clean-fid resize -> randcnn,
   FD/KD, memorisation, sample grid) against what a user of clean-fid does for the same number:
   write the generated PNGs, then ``compute_fid(real_dir, fake_dir)`` (which re-extracts the real
   features every time). Same images, same extractor, same mode; the two FDs are printed to show
   they agree. Run for a few-shot training set (100 images) and a larger one (1000 images).
   Targets: >= 3x faster; < 20 % of our evaluation time outside feature extraction.
2. The Frechet-distance step alone at 2048-d (Inception's width): ours with the cached
   sqrt(sigma_ref) against clean-fid's ``frechet_distance`` (scipy sqrtm). Target: >= 10x.
   Also the 100-shot shape (100 real, 5000 generated), where our cached factor is the 100 real
   features themselves.

Timings are medians over repeats (clean-fid's 2048-d sqrtm only 2 + 1 times: ~30 s each).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import noise  # noqa: E402
from sweeper.eval.evaluator import Evaluator  # noqa: E402
from sweeper.eval.context import batch_seed  # noqa: E402
from sweeper.eval.distances import (
    ReferenceGaussian,
    feature_stats,
    frechet_from_stats,
    frechet_to_reference,
    sqrt_psd,
)

SIZE = 64
N_GEN = 500
REPEATS = 3
FD_REPEATS_CLEANFID = 2


class SmallGenerator(nn.Module):
    """A FastGAN-shaped toy: linear -> 4x upsampling convs with BatchNorm and noise injection."""

    def __init__(self, z_dim: int = 64, size: int = SIZE):
        super().__init__()
        torch.manual_seed(0)
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 128 * 4 * 4)
        layers: list[nn.Module] = []
        c, r = 128, 4
        while r < size:  # each stage: 2x upsample, conv, BN, GLU (halves the channels)
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GLU(1)]
            c, r = c // 2, r * 2
        self.body = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 128, 4, 4)
        h = h + 0.1 * torch.randn_like(h)  # noise injection from the global RNG, as in FastGAN
        return torch.tanh(self.to_rgb(self.body(h)))

    def sample(self, n: int, seed) -> torch.Tensor:
        """The family contract's sampler: latents from the seed, eval mode."""
        self.eval()
        return self(noise((n, self.z_dim), seed))


def training_images(n: int, size: int = SIZE) -> torch.Tensor:
    """n random crops of scikit-image's bundled photos (no download), resized to size x size."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        c = int(rng.integers(96, 192))
        y, x = int(rng.integers(0, p.shape[0] - c)), int(rng.integers(0, p.shape[1] - c))
        crop = Image.fromarray(p[y : y + c, x : x + c]).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    return torch.stack(out)


class Timing:
    """Wall-clock and process CPU seconds (all threads) of repeated runs; medians of each.

    CPU time is printed beside wall time because this machine is often shared: a neighbour's load
    stretches wall time run by run, while CPU time still measures the work each side does.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, fn: Callable[[], object]) -> object:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)
        return out

    @property
    def median(self) -> tuple[float, float]:
        return statistics.median(self.wall), statistics.median(self.cpu)


def timed(fn: Callable[[], object], repeats: int) -> tuple[Timing, object]:
    t, out = Timing(), None
    for _ in range(repeats):
        out = t.run(fn)
    return t, out


def cleanfid_workflow(gen: nn.Module, ev: Evaluator, real_dir: str, work: str) -> float:
    """What a clean-fid user runs: sample the same latents, save PNGs, compute_fid on two folders."""
    from cleanfid import fid
    from torchvision.utils import save_image

    fake_dir = os.path.join(work, "fake")
    shutil.rmtree(fake_dir, ignore_errors=True)
    os.makedirs(fake_dir)
    gen.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(ev.seed)
        for b, s in enumerate(range(0, N_GEN, ev.batch_size)):
            for i, img in enumerate(gen.sample(min(ev.batch_size, N_GEN - s), batch_seed(ev.seed, b))):
                save_image(img.add(1).mul(0.5), os.path.join(fake_dir, f"{s + i:05d}.png"))
    return fid.compute_fid(real_dir, fake_dir, mode="clean", custom_feat_extractor=ev.extractor.net,
                           num_workers=0, batch_size=ev.batch_size, device=torch.device("cpu"), verbose=False)


def bench_evaluation(n_real: int, work: str) -> dict:
    real = training_images(n_real)
    real_dir = os.path.join(work, f"real{n_real}")
    os.makedirs(real_dir)
    for i, img in enumerate(real):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(real_dir, f"{i:05d}.png"))
    cfg = dict(features="randcnn", n_gen=N_GEN, batch_size=50, grid_size=64, seed=1234, kid_subsets=100)
    ev = Evaluator(cfg, real, os.path.join(work, "storage"), out_dir=os.path.join(work, "out"))
    ev.reference()  # warm the cache once, as the sweep's first trial (or the driver) does
    gen = SmallGenerator()

    splits: list[dict[str, float]] = []

    def ours() -> dict:
        ev2 = Evaluator(cfg, real, os.path.join(work, "storage"), out_dir=os.path.join(work, "out"))
        m, _ = ev2.evaluate(gen, step=0)
        assert ev2.real_feature_calls == 0
        splits.append(ev2.last_timings)
        return m

    ours()  # warm-up: first-call costs (thread pools, fonts) are not what a sweep pays each time
    splits.clear()
    # Interleaved, so a busy neighbour on the machine slows both sides alike.
    t_ours, t_clean = Timing(), Timing()
    for _ in range(REPEATS):
        m = t_ours.run(ours)
        fd_clean = t_clean.run(lambda: cleanfid_workflow(gen, ev, real_dir, work))
    outside = statistics.median((t["total"] - t["features"]) / t["total"] for t in splits)
    overhead = statistics.median((t["total"] - t["features"] - t["generate"]) / t["total"] for t in splits)
    return dict(n_real=n_real, ours=t_ours, cleanfid=t_clean, fd_ours=m["fd_randcnn"], fd_clean=fd_clean,
                outside=outside, overhead=overhead, timings=splits[-1])


def bench_frechet() -> dict:
    """Full-rank 2048-d stats (cached sqrt(sigma_ref)); and the few-shot shape (100 real, 5000 fake)."""
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(0)
    d, n = 2048, 3000
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    f_real = rng.standard_normal((n, d)) @ mix
    f_fake = rng.standard_normal((n, d)) @ mix + 0.05
    m1, s1 = feature_stats(f_fake)
    m2, s2 = feature_stats(f_real)
    t_prep, sq = timed(lambda: sqrt_psd(s2), 1)  # once per sweep (n > d), stored in the cache
    ref = ReferenceGaussian(m2, s2, sq, float(np.trace(s2)))
    t_ours, fd_ours = timed(lambda: frechet_from_stats(m1, s1, ref), REPEATS)
    t_clean, fd_clean = timed(lambda: frechet_distance(m1, s1, m2, s2), FD_REPEATS_CLEANFID)
    full = dict(ours=t_ours, cleanfid=t_clean, prep=t_prep, fd_ours=fd_ours, fd_clean=fd_clean)

    # 100-shot: the reference factor is its 100 centred features; ours starts from the 5000 raw
    # generated features (covariance included), clean-fid from ready-made statistics.
    few_real = rng.standard_normal((100, d)) @ mix
    fake = rng.standard_normal((5000, d)) @ mix + 0.05
    ref_few = ReferenceGaussian.from_features(few_real)
    t_few, fd_few = timed(lambda: frechet_to_reference(fake, ref_few), REPEATS)
    mf, sf = feature_stats(fake)
    t_few_clean, fd_few_clean = timed(lambda: frechet_distance(mf, sf, ref_few.mu, ref_few.sigma), 1)
    few = dict(ours=t_few, cleanfid=t_few_clean, fd_ours=fd_few, fd_clean=fd_few_clean)
    return {"full": full, "few": few}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"randcnn features, mode clean, n_gen={N_GEN}, {SIZE}x{SIZE} images, medians of {REPEATS}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-eval-")
    try:
        rows = [bench_evaluation(n, work) for n in (100, 1000)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fds = bench_frechet()
    fd, few = fds["full"], fds["few"]

    def row(label: str, ours: Timing, theirs: Timing, note: str = "") -> None:
        (ow, oc), (tw, tc) = ours.median, theirs.median
        print(f"{label:54s} {ow:7.2f} {tw:8.2f} {tw / ow:6.1f}x   {oc:7.2f} {tc:8.2f} {tc / oc:6.1f}x {note}")

    print()
    print(f"{'':54s} {'--------- wall s ---------':26s}   {'-- process CPU s (all threads) --':32s}")
    print(f"{'measurement (medians)':54s} {'ours':>7s} {'clean-fid':>8s} {'ratio':>7s}   "
          f"{'ours':>7s} {'clean-fid':>8s} {'ratio':>7s}")
    for r in rows:
        row(f"evaluation, warm cache, {r['n_real']} real / {N_GEN} generated", r["ours"], r["cleanfid"])
    row("Frechet step 2048-d, full rank (cached sqrt)", fd["ours"], fd["cleanfid"])
    row("Frechet step 2048-d, 100 real / 5000 generated", few["ours"], few["cleanfid"], "(clean-fid: 1 run)")
    print()
    for r in rows:
        print(f"{r['n_real']} real: share of our evaluation outside feature extraction {100 * r['outside']:.1f} % "
              f"(target < 20 %), of which generator forward {100 * (r['outside'] - r['overhead']):.1f} % and "
              f"evaluator overhead {100 * r['overhead']:.1f} %; FD ours {r['fd_ours']:.6f} vs clean-fid {r['fd_clean']:.6f}")
        print("   last run's split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()))
    print(f"2048-d: FD ours {fd['fd_ours']:.6f} vs clean-fid {fd['fd_clean']:.6f} "
          f"(rel diff {abs(fd['fd_ours'] - fd['fd_clean']) / abs(fd['fd_clean']):.1e}); "
          f"one-time sqrt(sigma_ref) {fd['prep'].median[0]:.2f} s wall, paid once per sweep")
    print(f"100-shot 2048-d: FD ours {few['fd_ours']:.6f} vs clean-fid {few['fd_clean']:.6f} "
          f"(rel diff {abs(few['fd_ours'] - few['fd_clean']) / abs(few['fd_clean']):.1e})")
    print(f"total bench time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

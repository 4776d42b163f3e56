"""Patch-LUT denoiser: evaluation memory without a noise bank, training-step cost of the
dictionary, and how much the phase-diagram configuration paints with its dictionary.

    .venv/bin/python bench/bench_patch_lut.py                 # [1] and [2]: ~5-8 min on 2 CPU cores
    .venv/bin/python bench/bench_patch_lut.py --n-gen 1000    # quicker look
    .venv/bin/python bench/bench_patch_lut.py --use           # [3] only: ~3-6 min on 2 CPU cores
    .venv/bin/python bench/bench_patch_lut.py --gpu           # [4] only, on a CUDA machine (~1-2 min)

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
3. Dictionary use (``--use``): the model section of search_spaces/memorization.yaml, trained as
   the trainer does (its batches, seeds and steps) on K = 4, 16 and 64 of the built-in faces, with
   the space's ``dynamic_lut`` and with the other setting (``dynamic_patterns`` as the space sets
   it, else the default 4); then the family's own metrics
   (``dictionary_share``, blend / usage perplexity, active entries over 64 samples' last step, the
   attractor check over 32, from t0 = 0.5 and 0.7) and the sample types of 128 samples in pixel
   space (32 px).
4. The post's scale on a GPU (``--gpu``): search_spaces/patch_lut.yaml's model (64 px, 8 x 8
   patches = 64 tokens, 16 blocks of width 256) at its batch size and precision, K = 64 and 512,
   softmax and tanh, with and without dynamic entries: median training-step time over interleaved
   rounds, one 32-step sampling call of 100 images, and peak GPU memory. Without CUDA it says so.
   :func:`gpu_step_rows` returns the rows, for bench/gpu_check.py to print beside its own.
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

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

SIZE = 256
SMALL = {"width": 32, "depth": 1, "heads": 2, "static_tokens": 2, "dictionary_size": 64, "sample_steps": 1}


def _family(size: int, over: dict, seed: int = 0):
    from models import build_model, get_family
    from sweeper.config.run_config import deep_merge

    cls = get_family("patch_lut")
    cfg = deep_merge({"family": "patch_lut", **cls.DEFAULTS}, over)
    cls.validate(cfg, size)
    return build_model(cfg, size, seed=seed)


def _faces(size: int) -> torch.Tensor:
    import torch.nn.functional as F

    from sweeper.store.data import load_images

    imgs = load_images("builtin:lfw-faces", 32)
    return F.interpolate(imgs.float(), size=size, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def eval_child(variant: str, n_gen: int) -> None:
    """One evaluation in this process; prints the peak RSS in MiB."""
    from models import noise
    from sweeper.eval.evaluator import Evaluator

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


def _train_memorization(k: int, dynamic: bool):
    """The memorization.yaml model trained on its first ``k`` faces, as sweeper's trainer would."""
    import yaml

    from sweeper.run.trainer import step_seed
    from sweeper.store.data import sample_batch, training_images

    space = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "memorization.yaml")))
    model = {k_: v for k_, v in space["model"].items() if k_ != "family"}
    images = training_images({**space["data"], "subset": k, "subset_seed": 0})
    fam = _family(space["data"]["image_size"], {**model, "dynamic_lut": dynamic}, seed=space["seed"])
    batch, steps = space["train"]["batch_size"], space["train"]["steps"]
    for step in range(steps):
        torch.manual_seed(step_seed(space["seed"], step, 0))
        fam.train_step(sample_batch(images, batch, space["seed"], step, True, 0, 1), step)
    return fam, images, space


def bench_use(rows: list) -> None:
    from sweeper.eval.sample_types import classify_samples

    torch.set_num_threads(1)
    print("\n[3] dictionary use of search_spaces/memorization.yaml's model (1 thread)")
    for k in (4, 16, 64):
        for dynamic in (False, True):
            fam, images, space = _train_memorization(k, dynamic)
            use = {**fam.dictionary_usage(64, seed=1234, batch=32), **fam.attractor_return(32, seed=1234)}
            late = fam.attractor_return(32, seed=1234, t0=0.7)["attractor_return_frac"]
            gen = torch.cat([fam.sample(64, seed=1234 + b) for b in range(2)])
            st = classify_samples(gen.reshape(len(gen), -1).double().numpy(),
                                  (images.double() / 127.5 - 1).reshape(len(images), -1).numpy()).fractions()
            entries = f"{fam.cfg['dynamic_patterns']}/image" if dynamic else "off"
            print(f"  K={k:3d} dynamic entries {entries:7s}: share {use['dictionary_share']:.3f}  "
                  f"blend ppl {use['dictionary_blend_perplexity']:.2f}  usage ppl {use['dictionary_usage_perplexity']:.2f}  "
                  f"active {use['dictionary_active']:.0f}  attractor {use['attractor_return_frac']:.2f} "
                  f"(rms {use['attractor_return_rms']:.3f}; from t0 0.7: {late:.2f})  memorized {st['frac_memorized']:.2f} "
                  f"spurious {st['frac_spurious']:.2f} generalized {st['frac_generalized']:.2f}", flush=True)
            if dynamic == space["model"].get("dynamic_lut", False):
                rows.append((f"memorization.yaml K={k} dictionary_share", "near 1", f"{use['dictionary_share']:.3f}",
                             "met" if use["dictionary_share"] >= 0.9 else "MISSED"))


def gpu_step_rows(rounds: int = 20) -> list[tuple[str, str]]:
    """(name, value) rows: patch_lut.yaml's training step and sampler on the CUDA device."""
    import yaml

    from models import build_model, get_family
    from sweeper.config.run_config import deep_merge

    space = yaml.safe_load(open(os.path.join(ROOT, "search_spaces", "patch_lut.yaml")))
    size, batch, precision = space["data"]["image_size"], space["train"]["batch_size"], space["train"]["precision"]
    cls = get_family("patch_lut")

    def fam(**over):
        cfg = deep_merge({"family": "patch_lut", **cls.DEFAULTS}, {**space["model"], **over})
        cls.validate(cfg, size)
        return build_model(cfg, size, seed=0, device="cuda", precision=precision)

    fams = {"K=64 softmax": fam(dictionary_size=64), "K=512 softmax": fam(dictionary_size=512),
            "K=64 tanh": fam(dictionary_size=64, weights="tanh"), "K=512 dynamic": fam(dynamic_lut=True)}
    real = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1

    def make(f):
        def fn(i: int) -> None:
            torch.manual_seed(i)
            f.train_step(real, i)
            torch.cuda.synchronize()
        return fn

    torch.cuda.reset_peak_memory_stats()
    t = interleave({k: make(f) for k, f in fams.items()}, rounds=rounds, warmup=3)
    rows = [(f"patch_lut.yaml step, {k} (batch {batch}, {precision})", f"{median(t.wall[k]) * 1e3:.1f} ms") for k in fams]
    f = fams["K=512 softmax"]
    f.sample(100, seed=0)
    torch.cuda.synchronize()
    c = Clock()
    f.sample(100, seed=1)
    torch.cuda.synchronize()
    rows.append((f"patch_lut.yaml sampling, 100 images x {f.cfg['sample_steps']} steps", f"{c():.2f} s"))
    rows.append(("patch_lut.yaml peak GPU memory (4 models)", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-gen", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--eval-child", choices=["streaming", "bank"])
    ap.add_argument("--use", action="store_true", help="only [3], the dictionary use of memorization.yaml")
    ap.add_argument("--gpu", action="store_true", help="only [4], patch_lut.yaml's step time on a CUDA device")
    args = ap.parse_args()
    if args.eval_child:
        eval_child(args.eval_child, args.n_gen)
        return
    clock, rows = Clock(), []
    if args.gpu:
        if not torch.cuda.is_available():
            print("bench_patch_lut --gpu: no CUDA device visible; nothing to measure here (run it on a GPU machine)")
            return
        rows = [(n, "report", v, "") for n, v in gpu_step_rows()]
    elif args.use:
        bench_use(rows)
    else:
        bench_eval_memory(args.n_gen, rows)
        bench_train_step(args.rounds, rows)
    print("\nsummary")
    for name, target, got, verdict in rows:
        print(f"  {name:42s} target {target:10s} got {got:12s} {verdict}")
    print(f"total {clock():.0f} s")


if __name__ == "__main__":
    main()

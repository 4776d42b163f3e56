"""Benchmarks of VMA-VAE on CPU: training-step time against memory size, the evaluation bound's
cost against K, and the few-shot experiment on the built-in digits (a report: exit code 0 even on FAIL).

    .venv/bin/python bench/bench_vma_vae.py --only 1 --only 2 --only 3   # ~3-5 minutes on the shared 2-core box
    .venv/bin/python bench/bench_vma_vae.py --only 4                     # the digit experiment: ~30 CPU minutes

1. Training-step time at |M| = 16, 64, 256, 1024, 32 px, for both memory sources (``learned``: M
   is a parameter, its gradient and Adam update included; ``data``: M is drawn from a pool of
   distinct images). The four sizes are built side by side and interleaved step by step in this
   process (warm-up rounds first, order rotated every round); a least-squares line through the
   median step times gives the cost per memory entry (the slope), the rest of the step (the
   intercept) and R^2. The paper's addressing cost is O(|M||B||e|) for the similarities, but every
   entry also goes through h once per step (forward and backward), so the step should grow
   linearly in |M|. Target: R^2 >= 0.98 (linear).
2. The addressing alone (h on M, h_q on the batch, the similarities and both softmaxes, forward and
   backward) at the same sizes, and the similarity product on its own: what the slope of section
   1 is made of.

3. The evaluation bound (``memory_report``: K posterior samples for each of 32 images, h on M once)
   at K = 16, 64, 256: its time should be linear in K (R^2 >= 0.98); the slope is the cost of one
   sample-row, which sizes an evaluation at the paper's K = 1000.
4. The few-shot experiment (the analogue of the paper's Fig. 5 / Table 1; not a timing): train on
   256 images of digits 0-4 (``--fewshot-steps``, default 3000), then report the held-out bound in
   nats and bits/dim with the plain VAE trained beside it, the address statistics, and the bound
   of held-out images of the unseen digits 5-9 with a related and an unrelated memory of each
   size, and write ``fewshot_samples.png`` / ``address_lookups.png`` to ``--out``.

Timings use one intra-op thread by default (``--threads``), judged on process CPU time (wall time
printed beside it): see bench/_util.py. Networks are narrower than the family defaults (width 16
instead of 64) so a step at |M| = 1024 takes under a second here; ``--width 64`` runs the paper's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_util.py
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402

from _util import Clock, fmt_s, interleave, median, spread  # noqa: E402

SIZES = (16, 64, 256, 1024)
TARGET_R2 = 0.98
JUDGE = ["cpu"]


def _family(args, source: str, size: int):
    from models import build_model, get_family
    from sweeper.config.run_config import deep_merge

    cls = get_family("vma_vae")
    over = {"width": args.width, "hidden": args.hidden, "z_dim": args.z_dim, "embed_dim": args.embed_dim,
            "samples": args.samples, "memory": {"source": source, "size": size, "pool_size": max(SIZES) + 64}}
    cfg = deep_merge({"family": "vma_vae", **cls.DEFAULTS}, over)
    cls.validate(cfg, 32)
    fam = build_model(cfg, 32, seed=0, device="cpu")
    if source == "data":  # a pool of distinct images, none of them in the batch: every entry is eligible
        g = torch.Generator().manual_seed(1)
        fam._remember(torch.randint(0, 256, (max(SIZES) + 16, 3, 32, 32), generator=g, dtype=torch.uint8))
    return fam


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, R^2) of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, icpt, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def _report_fit(label: str, times: dict[int, list[float]], wall: dict[int, list[float]], results: list,
                crossover: bool = False) -> None:
    for size in SIZES:
        print(f"  |M| = {size:<5} cpu {spread(times[size]):<34} wall {spread(wall[size])}")
    slope, icpt, r2 = line_fit([float(s) for s in SIZES], [median(times[s]) for s in SIZES])
    step = {s: median(times[s]) for s in SIZES}
    print(f"  -> slope {slope * 1e3:.3f} ms per memory entry, intercept {icpt * 1e3:.1f} ms, R^2 {r2:.4f}; "
          f"t(1024) / t(16) = {step[1024] / step[16]:.1f}x")
    marg = [(step[b] - step[a]) / (b - a) for a, b in zip(SIZES, SIZES[1:])]
    print("  -> marginal cost per entry: " + ", ".join(f"{a}->{b}: {m * 1e3:.2f} ms" for (a, b), m in
                                                   zip(zip(SIZES, SIZES[1:]), marg)))
    if crossover and slope > 0 and icpt > 0:
        print(f"  -> the memory costs as much as the rest of the step at |M| ~ {icpt / slope:.0f}")
    results.append((f"{label}: step time linear in |M| (R^2, {JUDGE[0]})", f">= {TARGET_R2}", f"{r2:.4f}", r2 >= TARGET_R2))
    results.append((f"{label}: slope", "report", f"{slope * 1e3:.3f} ms/entry", True))


# ============================================================================ 1. training step
def bench_step(args, results: list) -> None:
    g = torch.Generator().manual_seed(123)
    real = torch.randint(0, 256, (args.batch, 3, 32, 32), generator=g, dtype=torch.uint8).float() / 127.5 - 1
    for source in args.sources:
        print(f"\n[1. train step, memory.source {source}] 32 px, batch {args.batch}, K {args.samples}, width "
              f"{args.width}, hidden {args.hidden}, |z| {args.z_dim}, |e| {args.embed_dim}; "
              f"{args.warmup} warm-up + {args.rounds} measured rounds")
        clock = Clock()
        fams = {size: _family(args, source, size) for size in SIZES}

        def make(fam):
            def fn(i: int) -> None:
                torch.manual_seed(10_000 + i)  # the same draws for every size in a round
                fam.train_step(real, i)
            return fn

        t = interleave({s: make(f) for s, f in fams.items()}, rounds=args.rounds, warmup=args.warmup)
        _report_fit(f"1. train step, {source}", t.get(JUDGE[0]), t.wall, results, crossover=True)
        print(f"  ({clock():.0f} s)")


# ============================================================================ 2. the addressing alone
def bench_addressing(args, results: list) -> None:
    from models.vma_vae import similarity

    print(f"\n[2. addressing alone] h on M, h_q on {args.batch} queries, similarities, log-softmax of q(a|x) "
          f"and p(a), forward + backward; {args.warmup} warm-up + {args.rounds} measured rounds")
    clock = Clock()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1
    fams = {size: _family(args, "learned", size) for size in SIZES}

    def make(fam):
        def fn(i: int) -> None:
            log_q, log_p = fam.address_log_probs(fam.net.memory, x)
            (log_q.sum() + log_p.sum()).backward()
        return fn

    t = interleave({s: make(f) for s, f in fams.items()}, rounds=args.rounds, warmup=args.warmup,
                   setup=lambda name, i: fams[name].net.zero_grad(set_to_none=True))
    _report_fit("2. addressing alone", t.get(JUDGE[0]), t.wall, results)
    e_q = torch.randn(args.batch, args.embed_dim, generator=g)
    print(f"  the similarity product itself ((|M|, {args.embed_dim}) x ({args.batch}, {args.embed_dim}), "
          f"the paper's O(|M||B||e|)):")
    for size in SIZES:
        e_m = torch.randn(size, args.embed_dim, generator=g)
        s = interleave({size: lambda i: similarity(e_m, e_q)}, rounds=50, warmup=5)
        print(f"    |M| = {size:<5} {fmt_s(median(s.wall[size]))}")
    print(f"  ({clock():.0f} s)")


# ============================================================================ 3. the bound against K
KS = (16, 64, 256)


def bench_bound(args, results: list) -> None:
    print(f"\n[3. evaluation bound] memory_report on 32 images, |M| = 64 (data), width {args.width}, "
          f"K = {', '.join(map(str, KS))}; {args.warmup} warm-up + {args.rounds} measured rounds")
    clock = Clock()
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8)
    fams = {}
    for K in KS:
        fams[K] = _family(args, "data", 64)
        fams[K].cfg["eval_samples"], fams[K].cfg["eval_images"] = K, 32
    t = interleave({K: (lambda f: lambda i: f.memory_report(images, seed=i))(f) for K, f in fams.items()},
                   rounds=args.rounds, warmup=args.warmup)
    times = t.get(JUDGE[0])
    for K in KS:
        print(f"  K = {K:<5} cpu {spread(times[K]):<34} wall {spread(t.wall[K])}")
    slope, icpt, r2 = line_fit([float(k) for k in KS], [median(times[k]) for k in KS])
    rows = slope / 32
    print(f"  -> {rows * 1e3:.3f} ms per (image, sample) row, intercept {icpt * 1e3:.0f} ms, R^2 {r2:.4f}; "
          f"K = 1000 on 512 images would take ~{rows * 512_000:.0f} s on this CPU (unmeasured on GPU)")
    results.append((f"3. bound time linear in K (R^2, {JUDGE[0]})", f">= {TARGET_R2}", f"{r2:.4f}", r2 >= TARGET_R2))
    results.append(("3. cost per sample-row", "report", f"{rows * 1e3:.3f} ms", True))
    print(f"  ({clock():.0f} s)")


# ============================================================================ 4. the few-shot experiment
def bench_fewshot(args, results: list) -> None:
    from models import build_model, get_family
    from models.vma_fewshot import fewshot_report, fewshot_tiles
    from sweeper.config.run_config import deep_merge
    from sweeper.store.data import load_images, sample_batch
    from sweeper.eval.pictures import save_grid

    cls = get_family("vma_vae")
    over = {"width": args.width, "hidden": args.hidden, "z_dim": args.z_dim, "embed_dim": args.embed_dim,
            "samples": args.samples, "baseline_vae": True, "lr": 1e-3, "eval_samples": args.fewshot_k,
            "eval_images": 128, "memory": {"source": "data", "size": 32, "pool_size": 256},
            "fewshot": {"path": "builtin:digits/evaluation", "classes": 2, "shots": [1, 2, 4, 8], "targets": 10}}
    cfg = deep_merge({"family": "vma_vae", **cls.DEFAULTS}, over)
    cls.validate(cfg, 32)
    fam = build_model(cfg, 32, seed=0)
    digits = load_images("builtin:digits/background", 32)
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    train, held = digits[order[:256]], digits[order[256:]]
    print(f"\n[4. few-shot digits] train on 256 of digits 0-4 for {args.fewshot_steps} steps (batch 16, K "
          f"{args.samples}, |M| 32 data, width {args.width}), held-out: the other {len(held)}; unseen: digits 5-9")
    clock = Clock()
    for step in range(args.fewshot_steps):
        torch.manual_seed(step)
        losses = fam.train_step(sample_batch(train, 16, 0, step, True), step)
        if step % 500 == 0 or step == args.fewshot_steps - 1:
            print(f"  step {step:>5}: " + ", ".join(f"{k} {v:.1f}" for k, v in losses.items()) + f" ({clock():.0f} s)",
                  flush=True)
    report = fam.memory_report(held, seed=1234, suffix="_heldout")
    curve = fewshot_report(fam, fam.fewshot_set(), seed=1234)
    for k, v in {**report, **curve}.items():
        print(f"  {k:<34} {v:10.3f}")
    os.makedirs(args.out, exist_ok=True)
    save_grid(fewshot_tiles(fam, fam.fewshot_set(), 1234), os.path.join(args.out, "fewshot_samples.png"), nrow=8)
    tiles, per_row = fam.lookups(held, 1234)
    save_grid(tiles, os.path.join(args.out, "address_lookups.png"), nrow=per_row)
    K = args.fewshot_k
    for m in (2, 4, 8, 16):
        gain = curve[f"fewshot_nll_k{K}_m{m}_unrelated"] - curve[f"fewshot_nll_k{K}_m{m}_related"]
        results.append((f"4. |M| = {m}: unrelated - related bound", "> 0", f"{gain:.1f} nats", gain > 0))
    results.append(("4. held-out gain over the plain VAE", "report", f"{report[f'memory_gain_k{K}_heldout']:.1f} nats", True))
    print(f"  ({clock():.0f} s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, choices=[1, 2, 3, 4], action="append",
                   help="run only these sections (default 1-3; 4 is the ~30-minute digit experiment)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--judge", choices=["cpu", "wall"], default=None,
                   help="clock the fit uses (default: cpu with 1 thread, wall otherwise)")
    p.add_argument("--sources", nargs="+", default=["learned", "data"], choices=["learned", "data"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="K (the paper's 4)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--fewshot-steps", type=int, default=3000, help="section 4: training steps")
    p.add_argument("--fewshot-k", type=int, default=64, help="section 4: K of every reported bound")
    p.add_argument("--out", default="/tmp/bench_vma_vae", help="section 4: where the pictures go")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    JUDGE[0] = args.judge or ("cpu" if args.threads == 1 else "wall")
    clock = Clock()
    print(f"VMA-VAE benchmarks: torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} "
          f"intra-op thread(s), load average {os.getloadavg()[0]:.1f}; fits use "
          f"{'process CPU' if JUDGE[0] == 'cpu' else 'wall'} time")
    results: list[tuple[str, str, str, bool]] = []
    only = set(args.only or [1, 2, 3])
    for number, section in ((1, bench_step), (2, bench_addressing), (3, bench_bound), (4, bench_fewshot)):
        if number in only:
            section(args, results)
    print(f"\n== Summary (total {clock():.0f} s, load average now {os.getloadavg()[0]:.1f}) ==")
    w = max(len(r[0]) for r in results)
    print(f"  {'benchmark':<{w}}  {'target':>8}  {'measured':>16}  result")
    for name, target, got, ok in results:
        print(f"  {name:<{w}}  {target:>8}  {got:>16}  {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

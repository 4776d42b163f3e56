"""Benchmarks of VMA-VAE on CPU: training-step time against memory size (a report: exit code 0 even on FAIL).

    .venv/bin/python bench/bench_vma_vae.py               # ~3-5 minutes on the shared 2-core box
    .venv/bin/python bench/bench_vma_vae.py --only 2      # one section

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
    from sweeper.config import deep_merge

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, choices=[1, 2], action="append", help="run only these sections")
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
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    JUDGE[0] = args.judge or ("cpu" if args.threads == 1 else "wall")
    clock = Clock()
    print(f"VMA-VAE benchmarks: torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} "
          f"intra-op thread(s), load average {os.getloadavg()[0]:.1f}; fits use "
          f"{'process CPU' if JUDGE[0] == 'cpu' else 'wall'} time")
    results: list[tuple[str, str, str, bool]] = []
    only = set(args.only or [1, 2])
    if 1 in only:
        bench_step(args, results)
    if 2 in only:
        bench_addressing(args, results)
    print(f"\n== Summary (total {clock():.0f} s, load average now {os.getloadavg()[0]:.1f}) ==")
    w = max(len(r[0]) for r in results)
    print(f"  {'benchmark':<{w}}  {'target':>8}  {'measured':>16}  result")
    for name, target, got, ok in results:
        print(f"  {name:<{w}}  {target:>8}  {got:>16}  {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

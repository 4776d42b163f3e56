"""Benchmarks of the Attentive VQ-VAE on CPU: its pixel attention's cost and start, and when its
prior becomes generation-ready (a report: exit code 0).

    .venv/bin/python bench/bench_attentive_vqvae.py            # every section, ~6 minutes on the shared 2-core box
    .venv/bin/python bench/bench_attentive_vqvae.py --only 4   # one section

1. Training-step time of the autoencoder phase with the pixel attention vs the same model without
   it (``attention: off``), at 64 px, with an 8x8 code grid (``downsample: 3``) and a 16x16 one
   (``downsample: 2``): width 64, batch 8, one level, codebook 512 x 64, the PatchGAN on (the
   paper's training). The four models are built side by side and interleaved step by step
   (warm-up rounds first, order rotated every round); medians of process CPU time (wall beside).
   Then the attention layer alone, forward + backward at the level's shape, at 8x8, 16x16 and
   32x32 grids: the growth with the number of positions N = h*w.
2. Memory. Exact: the tensors autograd keeps for backward during the autoencoder's forward (distinct
   storages, counted through saved-tensor hooks), with and without the attention, and for the
   layer alone at the three grids, beside the size of one (B, N, N) attention map. Measured: the
   peak resident memory of one training step, each variant in a fresh subprocess (the high-water
   mark, reset just before the step, minus the resident size after imports, model, optimiser
   state and a warm-up step); on a shared CPU box this one is noisy to a few MiB.

3. The attention's start: max over images of ||W x|| / ||x|| at initialisation, the built-in faces
   through each shipped space's real encoder (3 levels: 32/16/8 at 256 px, 8/4/2 at 32 px), with
   the family's start and with the one it replaced (a fixed start logit of -6, default weights).
4. Generation readiness and the levels, in the CPU space (its YAML: 200 autoencoder steps, then
   200 prior steps, 80 training / 20 held-out faces): per configuration the prior step at which
   ``generation_ready`` flips, the NLL beside the frequency baseline, randcnn FD of 64 samples at
   prior steps 0 (uniform codes), 1, 50, 100, 200, and for 2-3 levels the training-set
   ``recon_mae`` with each upper level's codes zeroed.

The attention costs O(N^2 C) time and O(N^2) memory per image (W is N x N); the convolutions cost
O(N C^2) at the code grid and far more at the higher resolutions before it, so at these grids the
whole-step overhead is small and grows with N, while the layer alone grows ~N^2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_util.py
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402

from _util import Clock, fmt_s, interleave, median, paired_ratios, spread  # noqa: E402

SIZE, WIDTH, BATCH, FILTERS = 64, 64, 8, 16
GRIDS = {8: 3, 16: 2}  # code grid side at 64 px -> downsample
LAYER_GRIDS = (8, 16, 32)
JUDGE = ["cpu"]


def _family(downsample: int, attention: bool, seed: int = 0):
    from models import build_model, get_family
    from sweeper.config.run_config import deep_merge

    cls = get_family("attentive_vqvae")
    over = {"width": WIDTH, "downsample": downsample, "levels": 1, "attention": attention,
            "attention_filters": FILTERS, "codebook_size": 512, "code_dim": 64, "adversarial_weight": 0.1,
            "disc_width": 32, "prior_start_step": 10**9}
    cfg = deep_merge({"family": "attentive_vqvae", **cls.DEFAULTS}, over)
    cls.validate(cfg, SIZE)
    return build_model(cfg, SIZE, seed=seed, device="cpu")


def _real(n: int = BATCH) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123)) * 2 - 1


def _name(grid: int, attention: bool) -> str:
    return f"{grid}x{grid} {'attention' if attention else 'no attention'}"


# ============================================================================ 1. step time
def bench_step(args, results: list) -> None:
    print(f"\n== 1. Autoencoder training step, 64 px, width {WIDTH}, batch {BATCH}, one level, codebook 512x64, "
          f"PatchGAN on; {args.warmup} warm-up + {args.steps} measured rounds ({torch.get_num_threads()} thread(s)) ==")
    fams = {_name(g, a): _family(d, a) for g, d in GRIDS.items() for a in (True, False)}
    for k, f in fams.items():
        n = sum(p.numel() for p in f.autoencoder.parameters())
        print(f"  {k:<22} autoencoder parameters: {n:,}")
    real = _real()

    def make(fam):
        def fn(i: int) -> None:
            torch.manual_seed(10_000 + i)
            fam.train_step(real, i)
        return fn

    clock = Clock()
    t = interleave({k: make(f) for k, f in fams.items()}, rounds=args.steps, warmup=args.warmup)
    for k in fams:
        print(f"  {k:<22} cpu {spread(t.cpu[k]):<36} wall {spread(t.wall[k])}")
    for g in GRIDS:
        on, off = _name(g, True), _name(g, False)
        r = {kind: median(t.get(kind)[on]) / median(t.get(kind)[off]) for kind in ("cpu", "wall")}
        rp = median(paired_ratios(t.get(JUDGE[0]), on, off))
        extra = median(t.get(JUDGE[0])[on]) - median(t.get(JUDGE[0])[off])
        print(f"  -> {g}x{g} grid (N = {g * g}): attention / none = cpu {r['cpu']:.3f}x, wall {r['wall']:.3f}x "
              f"(per-round {rp:.3f}x); +{fmt_s(max(extra, 0.0))} per step")
        results.append((f"1. step time with / without attention, {g}x{g} grid ({JUDGE[0]})", f"{r[JUDGE[0]]:.3f}x"))
    print(f"  ({clock():.0f} s)")
    _layer_times(args, results)


def _layer(grid: int):
    from models.aren import PixelAttention

    torch.manual_seed(0)
    layer = PixelAttention(WIDTH, FILTERS, grid * grid)
    x = torch.randn(BATCH, WIDTH, grid, grid, generator=torch.Generator().manual_seed(1))
    return layer, x


def _layer_times(args, results: list) -> None:
    print(f"\n  attention layer alone, ({BATCH}, {WIDTH}, g, g), {FILTERS} filters, forward + backward:")
    layers = {g: _layer(g) for g in LAYER_GRIDS}

    def make(g):
        layer, x0 = layers[g]

        def fn(i: int) -> None:
            x = x0.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()
        return fn

    t = interleave({g: make(g) for g in LAYER_GRIDS}, rounds=args.layer_rounds, warmup=2).get(JUDGE[0])
    base = median(t[LAYER_GRIDS[0]])
    for g in LAYER_GRIDS:
        n = g * g
        growth = median(t[g]) / base
        ideal = (n / LAYER_GRIDS[0] ** 2) ** 2
        print(f"    {g:>2}x{g:<2} N = {n:>4}: {spread(t[g]):<36} {growth:7.1f}x the 8x8 time (N^2 growth: {ideal:.0f}x)")
        if g != LAYER_GRIDS[0]:
            results.append((f"1. attention layer time, {g}x{g} / 8x8 (N^2 would be {ideal:.0f}x)", f"{growth:.1f}x"))


# ============================================================================ 2. peak memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _measure(fn) -> dict:
    """Resident-memory growth of ``fn()`` in MiB, the high-water mark reset right before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    hwm0, base = _status_kib("VmHWM"), _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return {"peak_mib": (peak - base) / 1024, "valid": reset or peak > hwm0}


def _mem_child(what: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    torch.set_num_threads(1)
    kind, grid, att = what.split(":")
    grid = int(grid)
    if kind == "step":
        fam = _family(GRIDS[grid], att == "on")
        real = _real()
        fam.train_step(real, 0)  # warm-up: kernels, thread pools, Adam's state allocated
        res = _measure(lambda: fam.train_step(real, 1))
    else:
        layer, x0 = _layer(grid)
        small = x0[:1, :, :4, :4].clone().requires_grad_(True)
        layer(small).sum().backward()
        x = x0.clone().requires_grad_(True)
        res = _measure(lambda: layer(x).square().mean().backward())
    print(json.dumps(res))


def _run_child(what: str) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-mem", what]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {what} failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["valid"]:
        print(f"  WARNING: {what}: the high-water mark could not be reset; its number is an upper bound")
    return res["peak_mib"]


def saved_mib(fn) -> float:
    """MiB of distinct tensor storage autograd keeps for backward while ``fn()`` runs its forward:
    the activation memory, exact and deterministic (the resident size below is noisy)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def bench_saved(results: list) -> None:
    print(f"\n  activations kept for backward by the autoencoder's forward (encoder, quantiser, decoder, loss), "
          f"batch {BATCH}:")
    real = _real()
    for g, d in GRIDS.items():
        mib = {}
        for a in (True, False):
            fam = _family(d, a)
            ae = fam.autoencoder

            def fwd() -> None:
                qs, _, vq = ae.encoder(real)
                ((ae.decoder(qs) - real).abs().mean() + vq).item()
            mib[a] = saved_mib(fwd)
        one_map = BATCH * (g * g) ** 2 * 4 / 2**20
        print(f"    {g}x{g} grid: attention {mib[True]:.2f} MiB, none {mib[False]:.2f} MiB -> "
              f"+{mib[True] - mib[False]:.2f} MiB ({mib[True] / mib[False]:.3f}x); one (B, N, N) map = {one_map:.2f} MiB")
        results.append((f"2. activations saved for backward, with / without attention, {g}x{g} grid",
                        f"{mib[True] / mib[False]:.3f}x (+{mib[True] - mib[False]:.2f} MiB)"))
    print("  attention layer alone:")
    base = None
    for g in LAYER_GRIDS:
        layer, x0 = _layer(g)
        x = x0.clone().requires_grad_(True)
        mib = saved_mib(lambda: layer(x).square().mean())
        base = base or mib
        n = g * g
        one_map = BATCH * n**2 * 4 / 2**20
        print(f"    {g:>2}x{g:<2} (N = {n:>4}): {mib:7.2f} MiB saved ({mib / base:5.1f}x the 8x8); "
              f"one (B, N, N) map = {one_map:6.2f} MiB")
        if g != LAYER_GRIDS[0]:
            results.append((f"2. attention layer, saved for backward, {g}x{g} / 8x8 (N^2 would be {(n / 64) ** 2:.0f}x)",
                            f"{mib / base:.1f}x ({mib:.2f} vs {base:.2f} MiB)"))


def bench_peak(args, results: list) -> None:
    print(f"\n  peak resident memory (fresh subprocess per run, {args.mem_runs} run(s) each; resident growth of one "
          f"training step after a warm-up step):")
    peaks: dict[str, list[float]] = {}
    whats = [f"step:{g}:{a}" for g in GRIDS for a in ("on", "off")] + [f"layer:{g}:on" for g in LAYER_GRIDS]
    for r in range(args.mem_runs):
        for w in (whats if r % 2 == 0 else whats[::-1]):
            peaks.setdefault(w, []).append(_run_child(w))
    for g in GRIDS:
        on, off = median(peaks[f"step:{g}:on"]), median(peaks[f"step:{g}:off"])
        print(f"  training step, {g}x{g} grid: attention {on:7.1f} MiB, none {off:7.1f} MiB -> {on / off:.2f}x "
              f"(+{on - off:.1f} MiB)")
        results.append((f"2. step peak memory with / without attention, {g}x{g} grid",
                        f"{on / off:.2f}x ({on:.0f} vs {off:.0f} MiB)"))
    base = median(peaks[f"layer:{LAYER_GRIDS[0]}:on"])
    for g in LAYER_GRIDS:
        n = g * g
        p = median(peaks[f"layer:{g}:on"])
        one_map = BATCH * n * n * 4 / 2**20
        print(f"  attention layer alone, {g:>2}x{g:<2} (N = {n:>4}): {p:7.1f} MiB; one (B, N, N) map = {one_map:6.1f} MiB; "
              f"{p / max(base, 1e-3):6.1f}x the 8x8 peak")
        if g != LAYER_GRIDS[0]:
            results.append((f"2. attention layer peak, {g}x{g} / 8x8 (N^2 would be {(n / 64) ** 2:.0f}x)",
                            f"{p / max(base, 1e-3):.1f}x ({p:.1f} vs {base:.1f} MiB)"))


# ============================================================================ 3. attention start
SPACES = ("search_spaces/attentive_vqvae.yaml", "search_spaces/attentive_vqvae_cpu.yaml")


def _faces(n: int, size: int) -> torch.Tensor:
    """The built-in faces (scikit-image's LFW crops) in [-1, 1] at ``size`` px."""
    import numpy as np
    import skimage.data
    import torch.nn.functional as F

    lfw = torch.from_numpy(np.asarray(skimage.data.lfw_subset()[:n], dtype=np.float32))[:, None].repeat(1, 3, 1, 1)
    return F.interpolate(lfw, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def _fixed_logit_start(layer) -> None:
    """The start this issue replaced: default weights, biases +-sqrt(6) on the first filter only."""
    for g in (layer.g1, layer.g2):
        g.reset_parameters()
    with torch.no_grad():
        layer.g1.bias.zero_()
        layer.g2.bias.zero_()
        layer.g1.bias[0], layer.g2.bias[0] = 6**0.5, -(6**0.5)


def _start_ratios(space: str, old: bool) -> dict[int, float]:
    import yaml

    from models import build_model, get_family
    from models.aren import PixelAttention
    from sweeper.config.run_config import deep_merge

    spec = yaml.safe_load((ROOT / space).read_text())
    size, cls = spec["data"]["image_size"], get_family("attentive_vqvae")
    cfg = deep_merge({"family": "attentive_vqvae", **cls.DEFAULTS}, {**spec["model"], "levels": 3, "attention": True})
    fam = build_model(cfg, size, seed=0)
    ratios: dict[int, float] = {}

    def hook(layer, inp, out):
        v = inp[0].flatten(1)
        ratios[inp[0].shape[-1]] = float(((out.flatten(1) - v).norm(dim=1) / v.norm(dim=1)).max())

    for m in fam.autoencoder.modules():
        if isinstance(m, PixelAttention):
            if old:
                _fixed_logit_start(m)
            m.register_forward_hook(hook)
    with torch.no_grad():
        fam.autoencoder.encoder(_faces(2, size))
    return ratios


def bench_start(results: list) -> None:
    print("\n== 3. ||W x|| / ||x|| at initialisation, built-in faces through each space's encoder (3 levels) ==")
    for space in SPACES:
        now, before = _start_ratios(space, old=False), _start_ratios(space, old=True)
        for g in sorted(now, reverse=True):
            print(f"  {Path(space).name:<24} {g:>2}x{g:<2}: now {now[g]:.3f}   fixed logit -6 {before[g]:.3f}")
        results.append((f"3. start ratio, worst grid of {Path(space).name} (now / fixed logit)",
                        f"{max(now.values()):.3f} / {max(before.values()):.3f}"))


# ============================================================================ 4. readiness and levels
READY_CONFIGS = ({}, {"codebook_size": 8}, {"codebook_size": 128}, {"levels": 2}, {"levels": 3, "attention": False})
FD_AT = (0, 1, 50, 100, 200)


def _ready_run(over: dict) -> dict:
    """The CPU space's model with ``over``, trained as the space trains it; what section 4 reports."""
    from models import build_model
    from sweeper.config.run_config import deep_merge
    from sweeper.config.space import load_spec
    from sweeper.eval.distances import ReferenceGaussian, frechet_to_reference
    from sweeper.eval.features import build_extractor, quantize
    from sweeper.store.data import heldout_images, sample_batch, training_images

    cfg = load_spec(ROOT / SPACES[1]).run_config
    model = deep_merge(cfg["model"], over)
    imgs, held = training_images(cfg["data"]), heldout_images(cfg["data"])
    fx = build_extractor("randcnn")
    ref = ReferenceGaussian.from_features(fx(imgs))
    fam = build_model(model, cfg["data"]["image_size"], seed=0)
    out: dict = {"fd": {}}
    for step in range(cfg["train"]["steps"]):
        if step >= model["prior_start_step"] and fam.prior_steps in FD_AT:
            x = torch.cat([fam.sample(32, seed=b) for b in range(2)])
            out["fd"][fam.prior_steps] = frechet_to_reference(fx(quantize(x)), ref)
        torch.manual_seed(step)
        fam.train_step(sample_batch(imgs, cfg["train"]["batch_size"], 0, step, True, 0, 1), step)
        if fam.generation_ready and "ready_at" not in out:
            out.update(ready_at=fam.ready_at, running=fam.prior_nll_running, baseline=fam.frequency_nll(),
                       held=fam.code_report(held)[0]["prior_nll"])
    x = torch.cat([fam.sample(32, seed=b) for b in range(2)])
    out["fd"][fam.prior_steps] = frechet_to_reference(fx(quantize(x)), ref)
    out["zeroed"] = _zeroed_upper(fam, imgs)
    return out


def _zeroed_upper(fam, imgs: torch.Tensor) -> list[float]:
    """recon_mae of the training images: all levels, then with each upper level's codes zeroed."""
    x = imgs.float() / 127.5 - 1
    with torch.no_grad(), fam.sampling():
        qs, _, _ = fam.autoencoder.encoder(x)
        variants = [qs] + [[q if j != k else torch.zeros_like(q) for j, q in enumerate(qs)] for k in range(1, len(qs))]
        return [float(((fam.autoencoder.decoder(v).clamp(-1, 1) - x).abs() / 2).mean()) for v in variants]


def bench_ready(results: list) -> None:
    print("\n== 4. Generation readiness in the CPU space (200 autoencoder + 200 prior steps) ==")
    for over in READY_CONFIGS:
        r = _ready_run(over)
        fd = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(r["fd"].items()))
        name = json.dumps(over) if over else "the space's model"
        print(f"  {name}: ready at prior step {r.get('ready_at')} (running NLL {r.get('running', float('nan')):.3f}, "
              f"frequency baseline {r.get('baseline', float('nan')):.3f}, held-out NLL {r.get('held', float('nan')):.3f}); "
              f"FD by prior step {{{fd}}}")
        if len(r["zeroed"]) > 1:
            print(f"    recon_mae all levels {r['zeroed'][0]:.4f}; with level " +
                  ", ".join(f"{k + 2} zeroed {v:.4f}" for k, v in enumerate(r["zeroed"][1:])))
        results.append((f"4. ready at prior step, {name}", str(r.get("ready_at"))))


# ============================================================================ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=int, choices=[1, 2, 3, 4], action="append", help="run only these sections")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see bench/_util.py)")
    p.add_argument("--steps", type=int, default=8, help="measured rounds of the step comparison")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layer-rounds", type=int, default=10)
    p.add_argument("--mem-runs", type=int, default=1, help="subprocess runs per memory variant")
    p.add_argument("--child-mem", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_mem:
        _mem_child(args.child_mem)
        return 0
    torch.set_num_threads(args.threads)
    JUDGE[0] = "cpu" if args.threads == 1 else "wall"
    clock = Clock()
    print(f"Attentive VQ-VAE benchmarks: torch {torch.__version__}, {os.cpu_count()} CPU(s), "
          f"{torch.get_num_threads()} intra-op thread(s), load average {os.getloadavg()[0]:.1f}; "
          f"ratios on {'process CPU' if JUDGE[0] == 'cpu' else 'wall'} time")
    results: list[tuple[str, str]] = []
    only = set(args.only or [1, 2, 3, 4])
    if 1 in only:
        bench_step(args, results)
    if 2 in only:
        print("\n== 2. Memory ==")
        bench_saved(results)
        bench_peak(args, results)
    if 3 in only:
        bench_start(results)
    if 4 in only:
        bench_ready(results)
    print("\n== Summary ==")
    for name, value in results:
        print(f"  {name:<72} {value}")
    print(f"(total {clock():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

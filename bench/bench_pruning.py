"""Pruning gain: the same 24 configurations swept three ways on a real local Ray (127.0.0.1).

    .venv/bin/python bench/bench_pruning.py            # ~30-45 min on 2 heavily shared CPU cores

The patch-LUT CPU space (search_spaces/patch_lut_cpu.yaml: 32 px faces, a 2-block patch
transformer, randcnn features, objective fd_randcnn; evaluations compute only the distances) with
train.steps 270, an evaluation and a checkpoint every 30 steps, 24 trials, 2 at a time, the random sampler with seed 0 (so every sweep
gets the same 24 configurations, which the script checks), over the five categorical knobs of the
space plus model.lr (log-uniform 3e-4..3e-3):

1. no pruning (``pruner: none``): every trial trains 270 steps;
2. the median pruner (``pruner: median``, n_startup_trials 4, from the first evaluation on);
3. the promotion scheduler (``scheduler: promotion``, min_step 30, reduction_factor 3: rungs at
   30 and 90; paused trials resume from their checkpoints).

The three sweeps run side by side, each in its own process with its own local Ray (2 CPUs): on
a shared 2-core machine most of a trial's wall time is starting it, and that overlaps. Only
trial-steps and objective values are compared, which the overlap does not change.

Printed per sweep: total trial-steps (each trial's last trained step, read from the Optuna study),
the best objective (the lowest final fd_randcnn of a completed trial), the ratio of trial-steps to
the unpruned sweep's and the best's distance from its best. On the unpruned sweep: the Spearman
correlation between the ranking at every evaluation step and the final ranking (how much a rung
at that step can be trusted). Target: >= 3x fewer trial-steps with the best within 2 % of the
unpruned sweep's. The script always exits 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweeper.run.sweep import bind_loopback  # noqa: E402

bind_loopback()  # before anything imports ray
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna  # noqa: E402
import yaml  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from sweeper.search.study import open_storage  # noqa: E402
from sweeper.run.sweep import connect_ray, run_sweep  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore")
logging.getLogger("ray").setLevel(logging.ERROR)

TRIALS, STEPS, EVERY = 24, 270, 30
# A longer horizon: BENCH_STEPS=810 BENCH_MIN_STEP=90 (rungs at 90 and 270, rf 3).
STEPS, EVERY = int(os.environ.get("BENCH_STEPS", STEPS)), int(os.environ.get("BENCH_EVERY", EVERY))
MIN_STEP = int(os.environ.get("BENCH_MIN_STEP", EVERY))
if os.environ.get("BENCH_QUICK"):  # a smoke run of the script itself, not a measurement
    TRIALS, STEPS = 6, 90
VARIANTS = {
    "no pruning": {"pruner": "none", "scheduler": "optuna"},
    "median pruner": {"pruner": {"type": "median", "warmup_steps": MIN_STEP - EVERY, "args": {"n_startup_trials": 4}},
                      "scheduler": "optuna"},
    "promotion": {"pruner": "none", "scheduler": "promotion", "promotion": {"min_step": MIN_STEP, "reduction_factor": 3}},
}
TARGET_RATIO, TARGET_BEST = 3.0, 0.02


def spec_file(tmp: Path, name: str, sweep: dict) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "patch_lut_cpu.yaml").read_text())
    raw["name"] = name
    # The shipped space ranks by Inception FID; 3 x 24 trials measure the schedulers on the cheap
    # randcnn features instead (the comparison is of each sweep's own objective curves).
    raw["eval"]["features"], raw["sweep"]["objective"] = "randcnn", {"metric": "fd_randcnn", "mode": "min"}
    raw["storage"] = str(tmp / "sweeps")
    raw["train"].update({"steps": STEPS, "checkpoint_every": EVERY})
    # Only what the objective needs at each evaluation (no memorisation pass, sample-type or
    # dictionary pictures): the benchmark counts trial-steps, and 2 shared cores run 3 x 24 trials.
    raw["eval"].update({"every": EVERY, "metrics": ["distances"], "memorization": False, "grid_size": 16})
    raw["sweep"].update({"sampler": {"type": "random", "seed": 0}, "trials": TRIALS, "max_concurrent": 2, **sweep})
    raw["sweep"]["params"]["model.lr"] = {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def measure(tmp: Path, name: str, sweep: dict) -> dict:
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_sweep(str(spec_file(tmp, name, sweep)), num_cpus=2)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=open_storage(str(tmp / "sweeps" / name / "optuna.journal")))
    trials = [{"params": t.params, "state": t.state.name, "values": {int(k): v for k, v in t.intermediate_values.items()},
               "value": t.value, "resumed": bool(t.user_attrs.get("resumed_from_steps"))}
              for t in study.get_trials(deepcopy=False)]
    return {"wall": wall, "trials": trials, "paused_lines": len(re.findall(r" [1-9]\d* paused, ", log.getvalue()))}


def summary(r: dict) -> dict:
    trials = r["trials"]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    return {"steps": sum(max(t["values"], default=0) for t in trials),
            "best": min(t["value"] for t in complete) if complete else float("nan"),
            "completed": len(complete), "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "failed": sum(t["state"] == "FAIL" for t in trials)}


def configs(trials) -> list[str]:
    return sorted(repr(sorted(t["params"].items())) for t in trials)


def rung_correlations(trials) -> list[tuple[int, float]]:
    """Spearman rho between the values at each evaluation step and the final values (unpruned sweep)."""
    done = [t for t in trials if t["state"] == "COMPLETE"]
    final = [t["values"][STEPS] for t in done]
    return [(step, float(spearmanr([t["values"][step] for t in done], final).statistic))
            for step in range(EVERY, STEPS, EVERY)]


def one(label: str, out: str) -> None:
    """One sweep (a child process of main): its record as JSON in ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    started = connect_ray("local", num_cpus=2)
    try:
        r = measure(tmp, "pruning" + str(list(VARIANTS).index(label)), VARIANTS[label])
        Path(out).write_text(json.dumps(r))
    finally:
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    t0 = time.perf_counter()
    outs = {label: Path(tempfile.mkdtemp(prefix="bench-pruning-out-")) / "result.json" for label in VARIANTS}
    procs = {label: subprocess.Popen([sys.executable, __file__, "--one", label, str(out)],
                                     stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))
             for label, out in outs.items()}
    results: dict[str, dict] = {}
    for label, proc in procs.items():
        proc.wait()
        if not outs[label].is_file():
            print(f"{label}: the sweep did not finish (exit {proc.returncode}); see {outs[label].with_suffix('.log')}")
            continue
        results[label] = r = json.loads(outs[label].read_text())
        for t in r["trials"]:
            t["values"] = {int(k): v for k, v in t["values"].items()}
        r.update(summary(r))
        print(f"{label:14s}: {r['completed']} completed, {r['pruned']} pruned, {r['failed']} failed; "
              f"{r['steps']} trial-steps; best fd_randcnn {r['best']:.4f}; wall {r['wall']:.0f} s", flush=True)
    if len(results) < len(VARIANTS):
        return
    base = results["no pruning"]
    same = all(configs(r["trials"]) == configs(base["trials"]) for r in results.values())
    print(f"\nsame {TRIALS} configurations in all three sweeps: {same}")
    print(f"\n{'sweep':14s} {'trial-steps':>11s} {'fewer':>7s} {'best':>8s} {'vs unpruned':>11s}")
    for label, r in results.items():
        gap = (r["best"] - base["best"]) / abs(base["best"])
        print(f"{label:14s} {r['steps']:11d} {base['steps'] / r['steps']:6.2f}x {r['best']:8.4f} {gap:+10.2%}")
    print(f"\nSpearman rho, ranking at step s vs final ranking (step {STEPS}), unpruned sweep:")
    print("  " + ", ".join(f"{s}: {rho:+.2f}" for s, rho in rung_correlations(base["trials"])))
    p = results["promotion"]
    ratio, gap = base["steps"] / p["steps"], (p["best"] - base["best"]) / abs(base["best"])
    met = ratio >= TARGET_RATIO and gap <= TARGET_BEST
    print(f"\npromotion: {ratio:.2f}x fewer trial-steps (target >= {TARGET_RATIO:g}x), best {gap:+.2%} from the "
          f"unpruned sweep's (target <= {TARGET_BEST:.0%}): {'MET' if met else 'NOT MET'}")
    print(f"promotion: {sum(t['resumed'] for t in p['trials'])} trials were paused and later resumed from their "
          f"checkpoints; {p['paused_lines']} progress lines showed paused trials")
    print(f"total wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        one(sys.argv[2], sys.argv[3])
    else:
        main()

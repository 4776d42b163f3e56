"""`sweeper best`: the winning trials of a sweep, read from MLflow, as configs `sweeper train` runs.

    ref = locate_sweep()                                        # the sweep in ./sweeps (the newest if several)
    ref = locate_sweep(space="search_spaces/demo.yaml")        # or sweep="demo", storage_root=..., tracking=...
    ranking = best_trials(ref, "fd_randcnn", mode="min", top=3)  # completed trials, by their best value
    ranking = best_trials(ref, "fd_randcnn", at="final")        # or by their final value
    ranking = best_trials(ref, top=3)                           # by the objective the sweep stored
    paths = write_configs(ref, ranking, out="best")             # best/1.yaml, best/2.yaml, best/3.yaml
    print(format_table(ranking, paths))

A trial is ranked by its BEST value of the metric (``at="best"``, the default: the evaluation a
checkpoint was kept for; the written config's header names that step and the checkpoint that holds
it), or by its FINAL value (``at="final"``: the value at its largest step). Only trials that finished
their whole budget (``sweeper.status=completed``) compete: a pruned trial never had its later
evaluations, so its values are not comparable. ``include_pruned`` lets them in anyway.
``max_memorized`` drops trials whose final
``frac_memorized`` (the sample types; ``memorized_frac`` for a sweep from before them) is above it:
with a hundred training images a generator can win on FID by copying them. The table shows each
trial's three fractions (memorised, spurious, generalised).
A trial whose latest evaluation broke ``sweep.constraints`` (tag ``sweeper.violates``) is left out
unless ``include_violating``.

This file also finds a sweep and its MLflow records (:func:`locate_sweep`, :func:`open_experiment`),
which `sweeper report` and `sweeper ui` share.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from sweeper import storage
from sweeper.config import dump_config
from sweeper.dashboard import MODE_TAG, OBJECTIVE_TAG, ROLE
from sweeper.errors import SweeperError
from sweeper.keys import REPLICATE_ROLE, VIOLATES
from sweeper.tracking import STATUS, TRIAL_TAG, _client, best_point, code_version
from sweeper.uncertainty import PAIRING_KEYS, TIE_SE, Comparison, compare, se_key, split_count, split_key

DEFAULT_STORAGE = "./sweeps"
STORAGE_ENV = "SWEEPER_STORAGE"  # where `sweeper best/report/ui` look for sweeps without --storage
MEMORIZED = "memorized_frac"
AT = ("best", "final")  # which value of a trial's curve ranks it
FRACTIONS = ("frac_memorized", "frac_spurious", "frac_generalized")  # = sweeper.sample_types.FRACTIONS (no torch here)


def memorized(metrics: dict[str, float]) -> float | None:
    """The memorised fraction a trial is judged by: ``frac_memorized``, else ``memorized_frac``."""
    return metrics.get(FRACTIONS[0], metrics.get(MEMORIZED))


# ---------------------------------------------------------------------------- finding a sweep
@dataclass
class SweepRef:
    """Where a sweep's records are: its name (= MLflow experiment = Optuna study), its folder, its
    tracking URI, and the local folder holding what cannot live on S3 (Optuna journal, SQLite)."""

    name: str
    sweep_dir: str
    local_dir: Path
    tracking: str
    objective: dict[str, str] | None = None  # from the spec, when one was given
    chosen: str | None = None  # how the sweep was picked when none was named (for stderr)


def locate_sweep(sweep: str | None = None, space: str | None = None, storage_root: str | None = None,
                 tracking: str | None = None, need_tracking: bool = True) -> SweepRef:
    """A sweep by name (``sweep`` + ``storage_root``/``tracking``), by its spec file (``space``),
    or, with neither, the one sweep in the storage (the most recently updated one if several;
    ``chosen`` then says so).

    Storage defaults to ``$SWEEPER_STORAGE``, else ``./sweeps``. Without ``tracking`` (or the
    spec's, or ``MLFLOW_TRACKING_URI``) the sweep's embedded store is
    ``sqlite:///<storage>/<name>/mlflow.db``. Flags given explicitly win over the spec's values.
    ``need_tracking=False`` accepts a sweep without MLflow records (the Optuna journal suffices).

    >>> locate_sweep().name  # doctest: +SKIP
    'demo'
    """
    objective, chosen = None, None
    if space:
        from sweeper.spec import load_spec

        spec = load_spec(space)
        sweep = sweep or spec.run_config["name"]
        storage_root = storage_root or spec.run_config["storage"]
        tracking = tracking or spec.sweep.get("tracking")
        objective = dict(spec.sweep["objective"])
    storage_root = storage_root or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    # The order `sweeper run` uses (tracking.tracking_uri): spec/flag, then the environment.
    tracking = tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if not sweep:
        sweep, chosen = _pick_sweep(storage_root, tracking)
    sweep_dir = storage.join(storage_root, sweep)
    local = local_folder(sweep_dir)
    if not tracking and need_tracking:
        db = local / "mlflow.db"
        if not db.is_file():
            raise SweeperError(f"no sweep named {sweep!r} in {local.parent} (no {db}); "
                               f"sweeps there: {', '.join(sorted(n for n, _ in sweeps_in(local.parent))) or 'none'}; "
                               "check --sweep and --storage, or pass --tracking URI")
    if not tracking:
        tracking = f"sqlite:///{(local / 'mlflow.db').resolve()}"
    return SweepRef(name=sweep, sweep_dir=sweep_dir, local_dir=local, tracking=tracking, objective=objective,
                    chosen=chosen)


def local_folder(sweep_dir: str) -> Path:
    """An s3:// sweep keeps its local files under ./sweeps/ (sweeper.locations)."""
    from sweeper.locations import local_dir

    return local_dir(sweep_dir)


def sweeps_in(folder: Path) -> list[tuple[str, float]]:
    """``(name, last update)`` of the sweeps with local records in ``folder``, newest first. A
    sweep's last update is when its Optuna journal last changed (every trial start, report and
    end writes it), else its SQLite store: opening a dashboard writes to the latter, not the former."""
    found = []
    if folder.is_dir():
        for d in folder.iterdir():
            journal, db = d / "optuna.journal", d / "mlflow.db"
            if journal.is_file():
                found.append((d.name, journal.stat().st_mtime))
            elif db.is_file():
                found.append((d.name, db.stat().st_mtime))
    return sorted(found, key=lambda x: (-x[1], x[0]))


def _pick_sweep(storage_root: str, tracking: str | None) -> tuple[str, str | None]:
    """The name of the sweep to use when none was given, and a note when there was a choice."""
    folder = local_folder(storage_root)
    found = sweeps_in(folder)
    where = str(folder.resolve())
    if not found and tracking:
        found, where = _sweeps_on(tracking), tracking
    if not found:
        raise SweeperError(f"no sweep found in {where} (no folder there holds optuna.journal or mlflow.db); "
                           "run one (sweeper run SPACE.yaml), or pass --space SPACE.yaml, or --sweep NAME with "
                           f"--storage DIR (default ${STORAGE_ENV}, else {DEFAULT_STORAGE}) or --tracking URI")
    if len(found) == 1:
        return found[0][0], None
    name, others = found[0][0], [n for n, _ in found[1:]]
    return name, (f"using sweep {name!r}, the most recently updated of {len(found)} in {where} "
                  f"(the others: {', '.join(others)}); pass --sweep NAME for another")


def _sweeps_on(tracking: str) -> list[tuple[str, float]]:
    """``(name, last update)`` of the experiments of a tracking store, newest first."""
    ref = SweepRef(name="?", sweep_dir="", local_dir=Path("."), tracking=tracking)
    _check_store(ref)
    exps = [e for e in _client(tracking).search_experiments() if e.name != "Default"]
    return sorted(((e.name, (e.last_update_time or 0) / 1000) for e in exps), key=lambda x: (-x[1], x[0]))


def open_experiment(ref: SweepRef):
    """``(MlflowClient, Experiment)`` of the sweep. A server that does not answer, a missing SQLite
    file or an unknown sweep is a SweeperError, found before MLflow would retry for minutes (a
    server) or create an empty database (a mistyped SQLite path)."""
    _check_store(ref)
    client = _client(ref.tracking)
    exp = client.get_experiment_by_name(ref.name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise SweeperError(f"no sweep named {ref.name!r} in {ref.tracking}; "
                           f"sweeps there: {', '.join(names) or 'none'}")
    return client, exp


def _check_store(ref: SweepRef) -> None:
    p = urlparse(ref.tracking)
    if p.scheme == "sqlite":
        path = Path(ref.tracking[len("sqlite:///"):])
        if not path.is_file():
            raise SweeperError(f"no sweep named {ref.name!r} in {path} (no such file); check --tracking")
    elif p.scheme in ("http", "https"):
        try:
            with socket.create_connection((p.hostname, p.port or (443 if p.scheme == "https" else 80)), timeout=3):
                pass
        except OSError as e:
            raise SweeperError(f"MLflow tracking server {ref.tracking} is unreachable ({e.strerror or e}); "
                               "start it, or pass the right --tracking URI") from None


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def parent_run(client, experiment_id: str):
    """The sweep's parent run (the newest one tagged ``sweeper.role=sweep``), or None."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE}` = 'sweep'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


# ---------------------------------------------------------------------------- trials
@dataclass
class TrialResult:
    """One trial's run as `sweeper best` sees it; ``metrics`` are final values (largest step);
    ``best`` is ``(value, step)`` of the ranking metric's best evaluation (filled by best_trials)."""

    run_id: str
    trial_id: str
    run_name: str
    status: str  # completed | pruned | failed | running
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    start_time: int = 0
    rank: int = 0
    step: int | None = None  # the step of the value it was ranked by (filled for the ranked)
    final_step: int | None = None  # the step of the ranking metric's final value (filled for the ranked)
    best: tuple[float, int] | None = None
    swept: list[str] = field(default_factory=list)
    se: float | None = None  # the standard error of the ranked value (filled for the ranked)
    splits: list[float] | None = None  # the ranked value on each split of the latent bank
    lead: Comparison | None = None  # this trial minus the next-ranked one, with its error
    reeval: Any = None  # a `sweeper best --reeval` result (sweeper.reeval.Reevaluated)


def trial_results(client, experiment_id: str) -> list[TrialResult]:
    """Every trial run of the experiment (runs carrying ``sweeper.trial_id``)."""
    out = []
    for r in _all_runs(client, experiment_id):
        tags = r.data.tags
        if TRIAL_TAG not in tags or tags.get(ROLE) == REPLICATE_ROLE:  # replicates: sweeper.replicates
            continue
        swept = [k for k in tags.get("sweeper.swept", "").split(",") if k]
        out.append(TrialResult(run_id=r.info.run_id, trial_id=tags[TRIAL_TAG], run_name=r.info.run_name or "",
                               status=tags.get(STATUS, "running"), metrics=dict(r.data.metrics),
                               params=dict(r.data.params), tags=dict(tags), start_time=r.info.start_time or 0,
                               swept=swept))
    return out


@dataclass
class Ranking:
    """The outcome of ranking: the eligible trials best first (``rank`` 1, 2, ...) and the counts
    a user needs to judge it."""

    metric: str
    mode: str
    trials: list[TrialResult]
    counts: dict[str, int]  # trial runs by status
    eligible: int = 0  # trials that qualified (before the top-K cut)
    too_memorized: int = 0  # otherwise eligible, dropped by max_memorized
    at: str = "final"  # best | final: which value of each trial ranked it
    violating: int = 0  # otherwise eligible, dropped for breaking sweep.constraints

    def summary(self, sweep: str) -> str:
        c = self.counts
        text = (f"{sweep}: top {len(self.trials)} of {self.eligible} eligible trials by {self.at} {self.metric} ({self.mode}); "
                f"{c['completed']} completed, {c['pruned']} pruned, {c['failed']} failed, {c['running']} running")
        if self.too_memorized:
            text += f"; {self.too_memorized} dropped for {FRACTIONS[0]} above the limit"
        if self.violating:
            text += f"; {self.violating} dropped for violating sweep.constraints (--include-violating keeps them)"
        return text


def rank(trials: list[TrialResult], metric: str, mode: str = "min", include_pruned: bool = False,
         max_memorized: float | None = None, sweep: str = "the sweep", at: str = "final",
         include_violating: bool = False) -> Ranking:
    """Eligible trials, best first, numbered from 1. Raises SweeperError when none qualifies.
    ``at="best"`` ranks by each trial's ``best`` value (a trial without one by its final value).
    A trial whose latest evaluation broke ``sweep.constraints`` (tag ``sweeper.violates``) is
    dropped unless ``include_violating``.

    >>> [t.trial_id for t in rank(trials, "fid", "min").trials]  # doctest: +SKIP
    ['a1b2c3d4', '9f8e7d6c']
    """
    if mode not in ("min", "max"):
        raise SweeperError(f"--mode {mode!r}: use min or max")
    if at not in AT:
        raise SweeperError(f"--at {at!r}: use best or final")
    if not trials:
        raise SweeperError(f"{sweep} has no trial runs yet; run the sweep first (sweeper run SPACE.yaml)")
    logged = sorted({k for t in trials for k in t.metrics})
    if metric not in logged:
        raise SweeperError(f"no trial of {sweep} logged the metric {metric!r}; logged metrics: {', '.join(logged)}")
    if max_memorized is not None and not {FRACTIONS[0], MEMORIZED} & set(logged):
        raise SweeperError(f"--max-memorized needs {FRACTIONS[0]} (or {MEMORIZED}), which no trial of {sweep} "
                           "logged (eval.metrics left sample_types and memorization out); drop --max-memorized")
    wanted = {"completed", "pruned"} if include_pruned else {"completed"}
    count = {s: sum(t.status == s for t in trials) for s in ("completed", "pruned", "failed", "running")}
    pool = [t for t in trials if t.status in wanted and _finite(t.metrics.get(metric))]
    if not pool:
        hint = ("; pass --include-pruned to rank pruned trials by their last value"
                if not include_pruned and count["pruned"] else "")
        raise SweeperError(f"{sweep} has no {'completed or pruned' if include_pruned else 'completed'} trials with "
                           f"{metric} ({count['pruned']} pruned, {count['failed']} failed, "
                           f"{count['running']} running){hint}")
    violating = 0
    if not include_violating:
        kept = [t for t in pool if not t.tags.get(VIOLATES)]
        if not kept:
            raise SweeperError(f"all {len(pool)} candidate trials of {sweep} violate sweep.constraints "
                               f"(e.g. {pool[0].tags[VIOLATES]}); pass --include-violating to rank them anyway")
        violating, pool = len(pool) - len(kept), kept
    dropped = 0
    if max_memorized is not None:
        def frac(t: TrialResult) -> float:
            value = memorized(t.metrics)
            return math.inf if value is None else value

        kept = [t for t in pool if frac(t) <= max_memorized]
        if not kept:
            least = min(frac(t) for t in pool)
            raise SweeperError(f"all {len(pool)} candidate trials of {sweep} have final {FRACTIONS[0]} above "
                               f"{max_memorized:g} (the lowest is {least:.4g}); raise --max-memorized")
        dropped, pool = len(pool) - len(kept), kept
    sign = 1.0 if mode == "min" else -1.0
    pool.sort(key=lambda t: (sign * score(t, metric, at), t.start_time))
    for i, t in enumerate(pool, 1):
        t.rank = i
    return Ranking(metric=metric, mode=mode, trials=pool, counts=count, eligible=len(pool), too_memorized=dropped,
                   at=at, violating=violating)


def score(t: TrialResult, metric: str, at: str) -> float:
    """The value a trial is ranked by: its best evaluation's (``at="best"``) or its final one."""
    return t.best[0] if at == "best" and t.best is not None else t.metrics[metric]


def stored_objective(experiment) -> dict[str, str]:
    """The objective a sweep stored with its experiment (``{}`` for a sweep from before that)."""
    tags = experiment.tags or {}
    return {"metric": tags[OBJECTIVE_TAG], "mode": tags.get(MODE_TAG, "min")} if OBJECTIVE_TAG in tags else {}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_trials(ref: SweepRef, metric: str | None = None, mode: str | None = None, top: int = 1,
                include_pruned: bool = False, max_memorized: float | None = None, at: str = "best",
                include_violating: bool = False) -> Ranking:
    """The ``top`` best trials of a located sweep. ``metric``/``mode`` default to the sweep's
    objective (the spec's, else the one the sweep stored with its experiment); the mode of another
    metric defaults to ``min``.

    >>> best_trials(locate_sweep(sweep="demo"), "fd_randcnn", top=3).trials  # doctest: +SKIP
    """
    if top < 1:
        raise SweeperError(f"--top {top}: must be at least 1")
    client, exp = open_experiment(ref)
    obj = ref.objective or stored_objective(exp)
    metric = metric or obj.get("metric")
    if not metric:
        raise SweeperError("which metric? pass --metric NAME (e.g. fid), or --space SPACE.yaml to use its objective")
    if mode is None:
        mode = obj.get("mode", "min") if obj.get("metric") == metric else "min"
    trials = trial_results(client, exp.experiment_id)
    histories: dict[str, list] = {}
    for t in trials:
        if at == "best" and metric in t.metrics and t.status in ("completed", "pruned"):
            histories[t.run_id] = client.get_metric_history(t.run_id, metric)
            t.best = best_point(histories[t.run_id], mode)
    ranking = rank(trials, metric, mode, include_pruned, max_memorized, sweep=f"sweep {ref.name!r}", at=at,
                   include_violating=include_violating)
    shown = ranking.trials[:top + 1]  # the one after the last shown: the last one's margin
    for t in shown:
        hist = histories.get(t.run_id) or client.get_metric_history(t.run_id, metric)
        t.final_step = max((m.step for m in hist), default=None)
        t.step = t.best[1] if at == "best" and t.best is not None else t.final_step
        t.se, t.splits = uncertainty_at(client, t, metric, t.step)
    for t, nxt in zip(shown, shown[1:]):
        t.lead = lead_over(t, nxt, metric, at)
    ranking.trials = ranking.trials[:top]
    return ranking


def uncertainty_at(client, t: TrialResult, metric: str, step: int | None) -> tuple[float | None, list[float] | None]:
    """``(se, split values)`` of a trial's metric at ``step`` (None where not logged: a sweep from
    before standard errors, a metric without them, ``eval.se_splits: 0``)."""
    if step is None:
        return None, None

    def at_step(key: str) -> float | None:
        hist = sorted((m for m in client.get_metric_history(t.run_id, key) if m.step == step), key=lambda m: m.timestamp)
        return hist[-1].value if hist else None

    se = at_step(se_key(metric))
    if se is None:
        return None, None
    try:
        count = split_count(int(t.params["eval.n_gen"]), int(t.params["eval.se_splits"]))
    except (KeyError, ValueError):
        return se, None
    splits = [at_step(split_key(metric, s)) for s in range(count)]
    return se, (splits if count and None not in splits else None)


def lead_over(t: TrialResult, nxt: TrialResult, metric: str, at: str) -> Comparison | None:
    """``t``'s value minus the next-ranked trial's, with the standard error of that difference:
    paired split by split when both evaluated the same latents (same eval seed, sample count,
    batch size and splits), else the two standard errors combined."""
    same_latents = all(t.params.get(k) == nxt.params.get(k) for k in PAIRING_KEYS)
    return compare(t.splits if same_latents else None, nxt.splits if same_latents else None,
                   score(t, metric, at), score(nxt, metric, at), t.se, nxt.se)


def margin_text(c: Comparison | None) -> str:
    """``4.1``, ``0.3 tie``; ``*`` marks an unpaired error; ``-`` when unknown."""
    if c is None:
        return "-"
    m = "inf" if math.isinf(c.margin) else f"{c.margin:.2g}" if c.margin < 10 else f"{c.margin:.0f}"
    return m + ("" if c.paired else "*") + (" tie" if c.tie else "")


def legend(trials: list[TrialResult]) -> str:
    """The lines under a table that explain its margin column."""
    lines = [f"margin: lead over the next-ranked trial in standard errors of their difference "
             f"(paired: same latents, split by split); below {TIE_SE:g}: a statistical tie"]
    if any(t.lead is not None and not t.lead.paired for t in trials):
        lines.append("*: not paired (different eval settings, or no split values): the two standard errors combined")
    if all(t.se is None for t in trials):
        lines = ["margin: no standard errors logged (a sweep from before them, eval.se_splits: 0, or a metric "
                 "without them); run `sweeper best --reeval N` to measure the spread"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- configs
def checkpoint_at(checkpoint_dir: str, step: int | None) -> tuple[str | None, str]:
    """``(path, note)``: the ``checkpoint_XXXXXX/state.pt`` Ray kept in a trial folder that holds
    training ``step`` (read from the state dict), else the newest one, with a note saying so."""
    if not checkpoint_dir:
        return None, "unknown (the trial recorded no checkpoint folder)"
    try:
        names = storage.list(checkpoint_dir.rstrip("/") + "/")
    except (SweeperError, OSError):
        names = []
    found = sorted((u for u in names if u.rstrip("/").endswith("/state.pt") and "/checkpoint_" in u), reverse=True)
    if not found:
        return None, f"{checkpoint_dir} (no checkpoint found there)"
    if step is None:
        return found[0], "the newest kept"
    from sweeper.trainer import load_checkpoint  # torch: only when a config is written

    for uri in found:
        try:
            if int(load_checkpoint(uri)["step"]) == step:
                return uri, f"step {step}"
        except (SweeperError, KeyError):
            continue
    return found[0], (f"the newest kept; none holds step {step} (Ray keeps the best by the sweep's objective "
                      "and the latest)")


def provenance(ref: SweepRef, t: TrialResult, ranking: Ranking, renamed_from: str) -> str:
    """The comment header of a written config: where it came from, what it scored, and the
    checkpoint of the evaluation it was ranked by."""
    ckpt_dir = t.tags.get("sweeper.checkpoint_dir", "")
    ckpt, note = checkpoint_at(ckpt_dir, t.step)
    value = score(t, ranking.metric, ranking.at)
    lines = [
        f"sweeper best: rank {t.rank} of {ranking.eligible} by {ranking.at} {ranking.metric} ({ranking.mode}) "
        f"in sweep {ref.name!r}",
        f"ranked by: {ranking.metric} = {value:.6g} at step {t.step}",
        f"uncertainty: {uncertainty_line(t, ranking)}",
        *([f"re-evaluated: {t.reeval.header_line()}"] if t.reeval is not None else []),
        f"tracking: {ref.tracking}",
        f"run: {t.run_id} ({t.run_name})   trial: {t.trial_id}   optuna trial: {t.tags.get('sweeper.optuna_trial', '?')}",
        f"status: {t.status}" + (f" at step {t.tags.get('sweeper.pruned_at_step')}: {t.tags.get('sweeper.prune_reason')}"
                                 if t.status == "pruned" else f", final step {t.tags.get('sweeper.final_step', t.final_step)}"),
        f"final metrics (step {t.final_step}):",
    ]
    lines += [f"  {k} = {v:.6g}" for k, v in sorted(t.metrics.items()) if "_split/" not in k]
    lines += [
        f"checkpoint: {ckpt or note}",
        *([f"checkpoint holds: {note}"] if ckpt else []),
        f"code version: {t.tags.get('sweeper.code_version', 'unknown')} (this checkout: {code_version()})",
        f"name: {renamed_from!r} in the sweep; renamed so that `sweeper train` writes to its own folder",
    ]
    return "\n".join(lines)


def config_text(client, ref: SweepRef, t: TrialResult, ranking: Ranking) -> str:
    """The trial's run config (its ``config.yaml`` artifact) with a provenance header."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the CLI output clean
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(t.run_id, "config.yaml", d)
        except Exception as e:  # MLflow raises several types for a missing artifact
            raise SweeperError(f"run {t.run_id} (trial {t.trial_id}) has no readable config.yaml artifact "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        cfg = yaml.safe_load(Path(path).read_text())
    original = cfg.get("name", ref.name)
    # Every trial of a sweep has the sweep's name, and `sweeper train` writes to STORAGE/NAME:
    # without a new name the top configs would all train into the sweep's own folder.
    cfg["name"] = f"{original}-best{t.rank}"
    return dump_config(cfg, header=provenance(ref, t, ranking, original))


def write_configs(ref: SweepRef, ranking: Ranking, out: str = "best") -> list[str]:
    """Write ``OUT/1.yaml``, ``OUT/2.yaml``, ... for the ranked trials; returns the paths.
    ``out="-"`` writes nothing and returns the first config's text as the only element."""
    client = _client(ref.tracking)
    if out == "-":
        return [config_text(client, ref, ranking.trials[0], ranking)]
    os.makedirs(out, exist_ok=True)
    paths = []
    for t in ranking.trials:
        p = os.path.join(out, f"{t.rank}.yaml")
        Path(p).write_text(config_text(client, ref, t, ranking))
        paths.append(p)
    return paths


def format_table(ranking: Ranking, files: list[str] | None = None) -> str:
    """A plain-text table: rank, trial, status, the metric, the memorised / spurious / generalised
    fractions (memorised: ``memorized_frac`` for a sweep from before them), the metric's standard
    error and the margin over the next-ranked trial (ties marked), step, swept values, file; then
    the legend of the margin column."""
    metric, ranked = ranking.metric, ranking.trials
    swept = sorted({k for t in ranked for k in t.swept})
    head = ["rank", "run", "trial", "status", metric, "memorized", "spurious", "generalized", "+-se", "margin",
            "step"] + [k.split(".")[-1] for k in swept]
    if files:
        head.append("config")
    rows = []
    for i, t in enumerate(ranked):
        fracs = [memorized(t.metrics), t.metrics.get(FRACTIONS[1]), t.metrics.get(FRACTIONS[2])]
        row = [str(t.rank), t.run_name, t.trial_id, t.status, f"{score(t, metric, ranking.at):.5g}",
               *("-" if f is None else f"{f:.3g}" for f in fracs), "-" if t.se is None else f"{t.se:.2g}",
               margin_text(t.lead), "-" if t.step is None else str(t.step)]
        row += [_short(t.params.get(k, "-")) for k in swept]
        if files:
            row.append(files[i])
        rows.append(row)
    return columns([head] + rows) + "\n" + legend(ranked)


def columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def uncertainty_line(t: TrialResult, ranking: Ranking) -> str:
    """The config header's line on how sure the ranked value is, and whether it beats the next."""
    if t.se is None:
        text = "no standard error logged"
    else:
        text = f"+- {t.se:.3g} (standard error over {len(t.splits) if t.splits else 'the'} splits of the latent bank)"
    c, was = t.lead, (t.reeval.was if t.reeval is not None else t.rank)  # the rank this evaluation gave
    if c is None:
        return text + ("; no trial ranked after it" if was == ranking.eligible else "")
    how = "paired standard errors" if c.paired else "standard errors (not paired)"
    if c.tie:
        return text + f"; TIED with rank {was + 1} (ahead by {margin_text(c).split()[0]} {how}, below {TIE_SE:g})"
    return text + f"; ahead of rank {was + 1} by {margin_text(c)} {how}"


def _short(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    return value if "." not in value else f"{f:.4g}"

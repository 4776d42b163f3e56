"""`sweeper report`: PNG plots of a sweep from its Optuna study and its MLflow runs.

    paths = write_report(locate_sweep(space="search_spaces/demo.yaml"))   # <sweep dir>/report/*.png

Six pictures, each answering one question:

- ``history.png``     did the search improve? (Optuna's optimisation history, best-so-far line)
- ``slice.png``       how does the objective depend on each parameter? (one panel per parameter)
- ``parallel.png``    which combinations go together with good values? (parallel coordinates)
- ``curves.png``      how did each trial train, and where did the pruner stop it? (MLflow metric
                      histories of the objective and of ``memorized_frac``; pruned trials dashed,
                      ending in a cross)
- ``importance.png``  which parameters matter? (Optuna's fANOVA importance; with fewer than
                      :data:`MIN_TRIALS_FOR_IMPORTANCE` completed trials a placeholder says why)
- ``phase.png``       does it copy, collapse onto new images, or generalise? (``frac_memorized``,
                      ``frac_spurious``, ``frac_generalized`` against ``data.subset`` when the sweep
                      varied it, and against the objective; :mod:`sweeper.results.phase`; data in ``phase.csv``)

The plots are also logged to the sweep's parent MLflow run under ``report/``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from sweeper.keys import COMPLETED, FAILED, MEMORIZED, OPTUNA_NUMBER_TAG, PRUNED, RUNNING
from sweeper.results.records import SweepRef, open_experiment
from sweeper.store.trial_runs import parent_run, trial_results
from sweeper.results.ranking import stored_objective  # noqa: E402
from sweeper.store.dashboard import best_metric  # noqa: E402
from sweeper.keys import best_step_key, best_value_key  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.results.phase import phase_figure, phase_rows, write_phase_table  # noqa: E402

# fANOVA fits a random forest to (params -> objective); with a handful of points every
# parameter looks important by chance, so below this many completed trials we say so instead.
MIN_TRIALS_FOR_IMPORTANCE = 4
DPI = 120
MAX_LEGEND_TRIALS = 12  # beyond this the curves legend names statuses, not trials
STATUS_STYLE = {  # how a trial's curve is drawn, by its sweeper.status
    COMPLETED: {"linestyle": "-", "alpha": 0.9},
    PRUNED: {"linestyle": "--", "alpha": 0.8},
    FAILED: {"linestyle": ":", "alpha": 0.6, "color": "0.5"},
    RUNNING: {"linestyle": "-.", "alpha": 0.5, "color": "0.6"},
}


def load_study(ref: SweepRef) -> optuna.Study:
    """The sweep's Optuna study (journal ``<local dir>/optuna.journal``, study name = sweep name)."""
    from sweeper.search.study import default_storage, open_storage

    journal = Path(default_storage(ref.local_dir))
    if not journal.is_file():
        raise SweeperError(f"no Optuna study for sweep {ref.name!r} at {journal}; the report needs it "
                           "(run the sweep first, or pass the --storage it ran with)")
    try:
        return optuna.load_study(study_name=ref.name, storage=open_storage(str(journal)))
    except KeyError:
        raise SweeperError(f"{journal} holds no study named {ref.name!r}") from None


def write_report(ref: SweepRef, out: str | None = None, log_to_mlflow: bool = True) -> list[Path]:
    """Write the report's PNGs (default ``<sweep local dir>/report/``); returns their paths.

    >>> write_report(locate_sweep(sweep="demo"))  # doctest: +SKIP
    [PosixPath('sweeps/demo/report/history.png'), ...]
    """
    study = load_study(ref)
    client, exp = open_experiment(ref)
    metric = (ref.objective or stored_objective(exp)).get("metric")
    trials = trial_results(client, exp.experiment_id)
    if metric is None:
        metric = _objective_from_runs(study, trials)
    folder = Path(out) if out else ref.local_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]

    paths = []
    with warnings.catch_warnings(), plt.rc_context({"figure.dpi": DPI, "savefig.bbox": "tight"}):
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        paths.append(_save(_history(study, metric, ref.name), folder / "history.png"))
        paths.append(_save(_slice(study, metric, complete), folder / "slice.png"))
        paths.append(_save(_parallel(study, metric, complete), folder / "parallel.png"))
        paths.append(_save(_curves(client, trials, metric, ref.name), folder / "curves.png"))
        paths.append(_save(_importance(study, metric, complete), folder / "importance.png"))
        rows = phase_rows(trials, metric)
        paths.append(_save(phase_figure(rows, metric, ref.name), folder / "phase.png"))
        paths.append(write_phase_table(rows, metric, folder / "phase.csv"))
    if log_to_mlflow:
        parent = parent_run(client, exp.experiment_id)
        if parent is None:
            raise SweeperError(f"sweep {ref.name!r} has no parent run (tag sweeper.role=sweep) to log the report to")
        for path in paths:  # only ours: --out may name a folder holding other files
            client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
    return paths


def _objective_from_runs(study: optuna.Study, trials) -> str:
    """For a sweep that stored no objective, the metric whose final values equal the study's values."""
    values = {round(t.value, 9) for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    names = {k for t in trials for k in t.metrics}
    # best_<m> (and <m>_best) equals <m> at the end of every trial that improved to its last evaluation
    derived = {k for m in names for k in (best_metric(m), best_value_key(m), best_step_key(m))}
    for name in sorted(names - derived):
        finals = {round(t.metrics[name], 9) for t in trials if t.status == COMPLETED and name in t.metrics}
        if values and finals == values:
            return name
    return "objective"


def _save(fig: plt.Figure, path: Path) -> Path:
    for ax in fig.axes:
        # Close values (a tiny sweep's FIDs differ in the 4th digit) otherwise get an offset
        # label ("+8.321") that collides with titles and makes the ticks unreadable.
        try:
            ax.ticklabel_format(axis="y", useOffset=False)
        except AttributeError:  # a categorical or log axis has no offset to switch off
            pass
    fig.savefig(path)
    plt.close(fig)
    return path


def _figure_of(axes) -> plt.Figure:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _title(ax, text: str, **kw) -> None:
    """Our title, replacing Optuna's (some of its plots put theirs on the left, where it would
    overlap ours)."""
    for loc in ("left", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(text, **kw)


def _placeholder(title: str, text: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.set_axis_off()
    _title(ax, title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    return fig


def _history(study: optuna.Study, metric: str, name: str) -> plt.Figure:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return _placeholder("Optimization history", "no completed trial yet")
    ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    _title(ax, f"Optimization history of sweep {name!r} (completed trials)")
    ax.set_xlabel("Optuna trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    fig = _figure_of(ax)
    fig.set_size_inches(8, 4.5)
    return fig


def _slice(study: optuna.Study, metric: str, complete) -> plt.Figure:
    if not complete:
        return _placeholder("Slice plot", "no completed trial yet")
    axes = optuna.visualization.matplotlib.plot_slice(study, target_name=metric)
    fig = _figure_of(axes)
    n = len(axes.flat) if hasattr(axes, "flat") else 1
    fig.set_size_inches(max(5.0, 4.2 * n), 4.2)
    fig.suptitle(f"{metric} of completed trials vs each parameter (colour: trial number)")
    return fig


def _parallel(study: optuna.Study, metric: str, complete) -> plt.Figure:
    if len(complete) < 2:
        return _placeholder("Parallel coordinates", f"needs at least 2 completed trials; this sweep has {len(complete)}")
    ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study, target_name=metric)
    _title(ax, f"Parallel coordinates of completed trials (colour: {metric})", pad=14)
    # Optuna colours the worst trial white, invisible on its grey background: use a colour map
    # whose both ends show, darkest for the best value.
    cmap = "viridis" if study.direction == optuna.study.StudyDirection.MINIMIZE else "viridis_r"
    for coll in ax.collections:
        if isinstance(coll, LineCollection) and coll.get_array() is not None:
            coll.set_cmap(cmap)
            if coll.colorbar is not None:
                coll.colorbar.update_normal(coll)
    fig = _figure_of(ax)
    fig.set_size_inches(9, 4.5)
    return fig


def _importance(study: optuna.Study, metric: str, complete) -> plt.Figure:
    title = f"Parameter importance for {metric} (fANOVA)"
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return _placeholder(title, f"needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials to mean anything; "
                                   f"this sweep has {len(complete)}")
    try:
        # A seeded forest: the same study gives the same picture on every run of the report.
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        ax = optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator, target_name=metric)
    except (ValueError, RuntimeError) as e:  # e.g. every trial has the same value of a parameter
        return _placeholder(title, f"not computable: {e}")
    _title(ax, title)
    fig = _figure_of(ax)
    fig.set_size_inches(8, 0.6 * max(3, len(study.best_params)) + 1.5)
    return fig


def _curves(client, trials, metric: str, name: str) -> plt.Figure:
    """Per-trial metric histories from MLflow; the style says how the trial ended."""
    panels = [metric] + ([MEMORIZED] if any(MEMORIZED in t.metrics for t in trials) and metric != MEMORIZED else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    ordered = sorted(trials, key=lambda t: (int(t.tags.get(OPTUNA_NUMBER_TAG) or 1e9), t.start_time))
    per_trial_legend = len(ordered) <= MAX_LEGEND_TRIALS
    for ax, key in zip(axes[0], panels):
        for i, t in enumerate(ordered):
            hist = sorted(client.get_metric_history(t.run_id, key), key=lambda m: m.step)
            if not hist:
                continue
            steps, values = [m.step for m in hist], [m.value for m in hist]
            style = {"color": cmap(i % 10), **STATUS_STYLE.get(t.status, STATUS_STYLE[RUNNING])}
            label = f"{t.run_name} ({t.status})"
            ax.plot(steps, values, marker="o", markersize=3, label=label, **style)
            if t.status == PRUNED:
                ax.plot(steps[-1], values[-1], marker="X", markersize=11, color="crimson", linestyle="none")
        ax.set_xlabel("training step")
        steps_seen = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
        if 0 < len(steps_seen) <= 12:
            ax.set_xticks(steps_seen)  # the evaluation steps themselves
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        _title(ax, f"{key} at each evaluation")
        ax.grid(alpha=0.3)
    if per_trial_legend:
        handles, labels = axes[0][0].get_legend_handles_labels()
    else:  # many trials: one entry per status, showing its line style
        statuses = sorted({t.status for t in trials})
        handles = [plt.Line2D([], [], **{"color": "0.2", **STATUS_STYLE.get(s, STATUS_STYLE[RUNNING])})
                   for s in statuses]
        labels = statuses
    if any(t.status == PRUNED for t in trials):
        handles.append(plt.Line2D([], [], marker="X", color="crimson", linestyle="none", markersize=9))
        labels.append("pruned here")
    axes[0][-1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                       title="run (status)" if per_trial_legend else "status")
    fig.suptitle(f"Training curves of sweep {name!r}: completed solid, pruned dashed (X = where the pruner stopped it),"
                 " failed dotted", fontsize=10)
    fig.tight_layout()
    return fig

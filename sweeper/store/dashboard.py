"""What the dashboards open on: a saved view of the MLflow runs page, and sample grids in Optuna.

    save_view(client, experiment_id, "fd_randcnn", "min", ["model.moca.layer", ...])  # an experiment tag
    view_url("http://127.0.0.1:5000", experiment_id)            # the runs table, trials compared
    view_url("http://127.0.0.1:5000", experiment_id, charts=True)  # the chart view of the same
    pictures = TrialPictures.for_trial(sweep, sweep_dir, "demo", 3)  # trial side; None if no journal
    pictures.attach("eval/samples_0000040.png")                 # shown beside trial 3 in optuna-dashboard

**MLflow.** The experiment page of MLflow 3 (checked in 3.17.2's bundled UI) restores a whole
view, the search facets (filter, sort) and the UI state (columns, charts, chart sections, which
rows are visible), from an experiment tag ``mlflow.sharedViewState.<id>`` when the URL carries
``viewStateShareKey=<id>``; its "saved views" menu lists the same tags by name. The tag value is a
JSON envelope ``{name, createdAt, updatedAt, state}`` whose ``state`` is the view as a JSON string
(the UI deflates it; plain JSON is read too). Three details shape the view below:

- the page ignores the saved view when the URL has facets of its own (``searchFilter``,
  ``orderByKey``, ...), so the URL carries only the key, ``workflowType`` and ``compareRunsMode``;
- a saved view does not restore ``runsExpanded``: trials nested under the collapsed sweep run would
  stay hidden, so the view filters on ``sweeper.role = 'trial'`` instead, and child runs whose parent
  is not among the rows are listed flat;
- charts show only visible rows (``runsHiddenMode``; the default is the first 10).

**Optuna.** optuna-dashboard shows a trial's artifacts (``optuna.artifacts.upload_artifact`` into a
``FileSystemArtifactStore``) beside the trial. Optuna refuses to change a finished trial, so the
grids are attached while the trial runs, by the trial itself (``TrialTracker.log_eval``), and only
where it can reach the sweep's journal (a local sweep; not a worker node of a cluster).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sweeper.keys import (COLLAPSED_TAG, DIVERSITY, FRACTIONS, MODE_TAG, OBJECTIVE_TAG, OPTUNA_JOURNAL_KEY, ROLE,  # noqa: F401
                          SPREAD, STATUS)

SAVED_VIEW_PREFIX = "mlflow.sharedViewState."  # + view id: an experiment tag holding a saved view
VIEW_ID = "sweeper-trials"
VIEW_TAG = SAVED_VIEW_PREFIX + VIEW_ID
SAMPLES = "samples"  # the image key of the sample grid (pictures named samples_<step>.png)
JOURNAL = "optuna.journal"  # the file name sweeper.search.study.default_storage gives the study
ARTIFACT_DIR = "optuna_artifacts"  # beside the journal: the trials' pictures for optuna-dashboard
MAX_TRIALS_SHOWN = 1000  # rows the view's charts draw (all of a sweep)


def best_metric(metric: str) -> str:
    """The name under which a trial logs the best value of the objective so far."""
    return f"best_{metric}"


def kernel_metric(metric: str) -> str | None:
    """The kernel distance logged beside a Frechet objective: ``fid`` -> ``kid``, ``fd_x`` -> ``kd_x``."""
    if metric == "fid":
        return "kid"
    return "kd_" + metric[3:] if metric.startswith("fd_") else None


def first_screen(metric: str, headline: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The metrics the view charts first, in order: the objective, its best so far, its kernel
    distance, the samples' pixel diversity, the three sample-type fractions, the family's own."""
    names = [metric, best_metric(metric), kernel_metric(metric), DIVERSITY, *FRACTIONS, *headline]
    return list(dict.fromkeys(n for n in names if n))


def split_prefixes(metric: str) -> list[str]:
    """The chart sections MLflow makes of the split values of the metrics that have them
    (``fid_split/0`` -> ``fid_split``): the objective, its kernel distance, the spread metrics."""
    spread = [f"{name}{space}" for name in SPREAD for space in ("", "_px")]
    return [f"{m}_split" for m in (metric, kernel_metric(metric), *spread) if m]


# ---------------------------------------------------------------------------- the MLflow view
def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the runs table's canonical column id


def _line(uuid: str, section: str, metric: str) -> dict[str, Any]:
    return {"uuid": uuid, "type": "LINE", "metricSectionId": section, "deleted": False, "isGenerated": False,
            "runsCountToCompare": MAX_TRIALS_SHOWN, "metricKey": metric, "selectedMetricKeys": [metric],
            "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear", "xAxisKey": "step",
            "selectedXAxisMetricKey": "", "displayPoints": True, "yAxisKey": "metric", "yAxisExpressions": [],
            "ignoreOutliers": False, "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True,
            "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}}


def trials_view(metric: str, mode: str, swept: list[str], last_step: int = 0,
                headline: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The runs page of a sweep's experiment as the researcher wants it first: one row per trial
    (best first) with the objective, its best value, the kernel distance, ``diversity_px``, the
    memorised fraction, the status and the swept parameters; charts of the swept parameters
    against the objective (parallel coordinates), then over steps the objective, its best value,
    the kernel distance, the pixel diversity, the sample-type fractions and the family's
    ``headline`` metrics (``ModelFamily.HEADLINE``), and the sample grids with MLflow's step slider,
    opened at ``last_step``. Every other metric MLflow charts by itself under "Model metrics"; the
    split values of the standard errors (``fid_split/0`` ...) go to sections that start folded.
    """
    section, pictures = "sweeper-trials-compared", "sweeper-trials-pictured"
    shown = first_screen(metric, headline)
    charts = [
        {"uuid": "sweeper-parallel", "type": "PARALLEL", "metricSectionId": section, "deleted": False,
         "isGenerated": False, "runsCountToCompare": MAX_TRIALS_SHOWN, "selectedParams": list(swept),
         "selectedMetrics": [metric], "showAllRuns": True},
        *(_line(f"sweeper-{name}", section, name) for name in shown),
        {"uuid": "sweeper-samples", "type": "IMAGE", "metricSectionId": pictures, "deleted": False,
         "isGenerated": False, "runsCountToCompare": MAX_TRIALS_SHOWN, "imageKeys": [SAMPLES],
         "step": int(last_step), "showRunParams": False},
    ]
    sections = _sections(metric, section, pictures)
    table = [n for n in (metric, best_metric(metric), kernel_metric(metric), DIVERSITY, FRACTIONS[0]) if n]
    columns = [_column("metrics", m) for m in dict.fromkeys(table)] + [_column("tags", STATUS)] + \
        [_column("tags", COLLAPSED_TAG)] + [_column("params", p) for p in swept]
    return {
        # search facets
        "searchFilter": f"tags.`{ROLE}` = 'trial'",
        "orderByKey": _column("metrics", metric),
        "orderByAsc": mode == "min",
        # UI state
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: _width(c) for c in columns},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keep the sections in the order given, not sorted by name
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "viewMaximized": False,
        "runListHidden": False,
    }


def _width(column: str) -> int:
    """Narrow numbers, so that the status and the collapse verdict fit beside them on a laptop screen."""
    if column.startswith("metrics."):
        return 105
    return 260 if COLLAPSED_TAG in column else 100 if STATUS in column else 165


def _sections(metric: str, section: str, pictures: str) -> list[dict[str, Any]]:
    """The chart sections, in order. MLflow adds a chart for every other metric and picture, in a
    section named by the part of its key before "/" (the split values: "fid_split") or under
    "Model metrics", and sorts the sections by name unless the view says they were reordered
    (``isAccordionReordered``, which it does): the first screen, the pictures, "Model metrics",
    then the split sections folded (display False), "System metrics" last."""
    folded = [{"uuid": f"sweeper-{prefix}", "name": prefix, "display": False, "isReordered": False,
               "deleted": False, "isGenerated": True} for prefix in split_prefixes(metric)]
    return [
        {"uuid": section, "name": f"Trials compared: {metric}", "display": True, "isReordered": False,
         "deleted": False, "isGenerated": False, "columns": 3, "cardHeight": 360},
        # one card across the page: the trials' grids side by side ("compared" sorts before "pictured")
        {"uuid": pictures, "name": f"Trials pictured: {SAMPLES}", "display": True, "isReordered": False,
         "deleted": False, "isGenerated": False, "columns": 1, "cardHeight": 520},
        {"uuid": "sweeper-model-metrics", "name": "Model metrics", "display": True, "isReordered": False,
         "deleted": False, "isGenerated": True},
        *folded,
        {"uuid": "sweeper-system-metrics", "name": "System metrics", "display": True, "isReordered": False,
         "deleted": False, "isGenerated": True},
    ]


def view_tag_value(state: dict[str, Any], name: str, created_ms: int | None = None) -> str:
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": created_ms or now, "updatedAt": now,
                       "state": json.dumps(state, sort_keys=True)})


def saved_state(tag_value: str | None) -> dict[str, Any] | None:
    """The view state inside a saved-view tag value (None when absent or unreadable)."""
    try:
        return json.loads(json.loads(tag_value)["state"]) if tag_value else None
    except (ValueError, KeyError, TypeError):
        return None


def save_view(client, experiment_id: str, metric: str, mode: str, swept: list[str], last_step: int = 0,
              headline: tuple[str, ...] | list[str] = ()) -> bool:
    """Store the trials view (and the objective) with the experiment; True when it was written,
    False when the same view was already there."""
    state = trials_view(metric, mode, swept, last_step, headline)
    tags = client.get_experiment(experiment_id).tags
    current = tags.get(VIEW_TAG)
    if saved_state(current) == state and tags.get(OBJECTIVE_TAG) == metric and tags.get(MODE_TAG) == mode:
        return False
    created = None
    try:
        created = json.loads(current)["createdAt"] if current else None
    except (ValueError, KeyError, TypeError):
        pass
    client.set_experiment_tag(experiment_id, OBJECTIVE_TAG, metric)
    client.set_experiment_tag(experiment_id, MODE_TAG, mode)
    client.set_experiment_tag(experiment_id, VIEW_TAG, view_tag_value(state, f"sweeper: trials by {metric}", created))
    return True


def view_url(base_url: str, experiment_id: str, charts: bool = False, view_id: str = VIEW_ID) -> str:
    """The runs page of the experiment, opened on a saved view (default: the trials view).

    ``workflowType=machine_learning``: MLflow 3 otherwise opens experiments in its GenAI view.
    """
    mode = "CHART" if charts else "TABLE"
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&compareRunsMode={mode}&viewStateShareKey={view_id}")


# ---------------------------------------------------------------------------- Optuna artifacts
def journal_of(local_dir: str | Path) -> Path:
    return Path(local_dir) / JOURNAL


def artifact_dir_of(local_dir: str | Path) -> Path:
    return Path(local_dir) / ARTIFACT_DIR


def open_journal(path: str | Path):
    """The study storage of a journal file, as sweeper.search.study.open_storage opens it (same lock),
    without importing Ray."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


class TrialPictures:
    """Attaches pictures to one running Optuna trial, for optuna-dashboard to show beside it."""

    def __init__(self, journal: Path, study: str, number: int, metric: str | None = None):
        self.journal, self.study, self.number, self.metric = journal, study, number, metric
        self._storage, self._trial_id = None, None
        self._attached: set[str] = set()  # file names the trial already has (a resumed trial)

    @classmethod
    def for_trial(cls, sweep: dict[str, Any], sweep_dir: str, study: str, number: Any) -> "TrialPictures | None":
        """The trial's pictures, or None where this process cannot reach the sweep's journal (an
        s3:// sweep keeps it on the driver's disk) or the trial has no Optuna number."""
        if number is None or number == "":
            return None
        journal = sweep.get(OPTUNA_JOURNAL_KEY) or ("" if "://" in sweep_dir else str(journal_of(sweep_dir)))
        if not journal or not os.path.isfile(journal):
            return None
        return cls(Path(journal), study, int(number), (sweep.get("objective") or {}).get("metric"))

    def _open(self) -> None:
        import warnings

        import optuna

        self._storage = open_journal(self.journal)
        study_id = self._storage.get_study_id_from_name(self.study)
        self._trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        attrs = self._storage.get_trial(self._trial_id).system_attrs
        self._attached = {json.loads(v)["filename"] for k, v in attrs.items() if k.startswith("artifacts:") and v}
        if self.metric:
            # The objective's name for optuna-dashboard's plots (else "Objective 0"); a study
            # attribute, which Optuna lets anyone set at any time.
            study = optuna.load_study(study_name=self.study, storage=self._storage)
            if study.metric_names != [self.metric]:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # set_metric_names is marked experimental
                    study.set_metric_names([self.metric])

    def attach(self, path: str) -> bool:
        """Upload one file as an artifact of the trial, unless it has one of that name already;
        False (with a warning) when Optuna refuses, e.g. the trial has finished. Pictures are a
        convenience: never fail a trial over one."""
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        try:
            if self._storage is None:
                self._open()
            if os.path.basename(path) in self._attached:
                return True
            store_dir = artifact_dir_of(self.journal.parent)
            store_dir.mkdir(parents=True, exist_ok=True)
            upload_artifact(artifact_store=FileSystemArtifactStore(store_dir), file_path=path,
                            study_or_trial=self._storage.get_trial(self._trial_id), storage=self._storage)
            self._attached.add(os.path.basename(path))
            return True
        except Exception as e:  # noqa: BLE001 - Optuna raises several types (finished trial, lock, I/O)
            print(f"[sweeper] note: {os.path.basename(path)} not attached to Optuna trial {self.number} "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            return False

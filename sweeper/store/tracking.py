"""MLflow records of a sweep: one parent run per sweep, one nested child run per trial.

    uri = tracking_uri(sweep, sweep_dir)          # sqlite in the sweep folder unless a server is given
    parent = open_parent(uri, "demo", spec_path)   # driver side
    tr = TrialTracker.open(sweep, sweep_dir, cfg, config, trial_id, trial_name)   # trial side, rank 0
    tr.log_eval(step, metrics, artifacts, tags)   # metrics, best objective so far, pictures

Trial runs carry ``sweeper.role=trial`` (the parent ``sweeper.role=sweep``), and the first trial
stores the dashboard's trials view with the experiment (:mod:`sweeper.store.dashboard`). Each picture of
an evaluation is logged twice: as a plain artifact (``eval/step_XXXXXXXX/samples_XXXXXXX.png``) and
as an MLflow image under its key (``samples``, ``nearest``, ``clusters``, ...) with its step, which
the dashboard's image charts show with a step slider.

We use ``MlflowClient`` with explicit run ids rather than the fluent ``mlflow.start_run`` API:
trials run in parallel processes and a resumed trial must find its own run again (by the
``sweeper.trial_id`` tag) and continue it without logging a step twice.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sweeper.keys import (
    CHECKPOINT_DIR_TAG,
    CODE_VERSION_TAG,
    COMPLETED,
    FAILED,
    FAILED_AT_TAG,
    FAILURE_TAG,
    FINAL_STEP_TAG,
    HEADLINE_KEY,
    NODE_TAG,
    OPTUNA_NUMBER_TAG,
    PRUNED,
    ROLE,
    RUNNING,
    STATUS,
    SWEPT_TAG,
    TRACEBACK_TAG,
    TRIAL_NAME_TAG,
)
from sweeper.store.dashboard import SAMPLES, TrialPictures, best_metric, save_view
from sweeper.store import locations
from sweeper.errors import SweeperError
from sweeper.keys import (ACCELERATOR_S, CPU_S, OPTUNA_TRIAL_KEY, PARENT_RUN_KEY, RUN_TAGS_KEY, TRIAL_TAG,
                          WALL_S, best_step_key, best_value_key)

PICTURE_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_\-]+?)_(?P<step>\d+)\.png$")  # samples_0000040.png
# MLflow's file name of a logged image: images/<key>+step+<step>+timestamp+<ms>+<uuid>.png ("%" before 3.x)
LOGGED_IMAGE = re.compile(r"^images/(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%].*(?<!compressed)\.png$")


def mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def tracking_uri(sweep: dict[str, Any], sweep_dir: str) -> str:
    """The sweep's tracking URI: the spec's ``tracking``, else ``MLFLOW_TRACKING_URI``, else an
    embedded SQLite file in the sweep folder."""
    if sweep.get("tracking"):
        return str(sweep["tracking"])
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = os.path.abspath(locations.local_dir(sweep_dir))
    Path(local).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{os.path.abspath(os.path.join(local, 'mlflow.db'))}"


def artifact_root(sweep_dir: str) -> str:
    if "://" in sweep_dir:
        return sweep_dir.rstrip("/") + "/mlartifacts"
    return Path(os.path.abspath(sweep_dir), "mlartifacts").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is a user error, caught before any trial starts."""
    p = urlparse(uri)
    if p.scheme not in ("http", "https"):
        return
    port = p.port or (443 if p.scheme == "https" else 80)
    try:
        with socket.create_connection((p.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise SweeperError(
            f"sweep.tracking: MLflow tracking server {uri} is unreachable ({e.strerror or e}); "
            "start it (see `sweeper ui` or deploy/README.md) or fix sweep.tracking"
        ) from None


def experiment_id(client, name: str, sweep_dir: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A tracking server owns where artifacts go (its --artifacts-destination, proxied), unless
    # the sweep's storage is itself object storage every machine reaches: a local sweep folder
    # named as the artifact location would be a path on whichever machine ran the trial.
    server = urlparse(str(client.tracking_uri)).scheme in ("http", "https")
    location = artifact_root(sweep_dir) if not server or "://" in sweep_dir else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def code_version() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    from sweeper import __version__

    return __version__


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


# ---------------------------------------------------------------------------- the driver side
def open_parent(uri: str, name: str, sweep_dir: str, spec_path: str | None, resume: bool) -> str:
    """The sweep's parent run id (reused when the sweep resumes)."""
    client = mlflow_client(uri)
    exp = experiment_id(client, name, sweep_dir)
    if resume:
        found = client.search_runs([exp], filter_string=f"tags.`{ROLE}` = 'sweep'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(exp, run_name=name, tags={ROLE: "sweep", CODE_VERSION_TAG: code_version()})
    if spec_path:
        client.log_artifact(run.info.run_id, spec_path)
    return run.info.run_id


def find_trial_run(client, exp_id: str, trial_id: str):
    found = client.search_runs([exp_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return found[0] if found else None


def set_trial_status(uri: str, name: str, sweep_dir: str, trial_id: str, status: str, **tags: Any) -> None:
    """Driver-side final status of a trial's run (pruned trials never get to say it themselves)."""
    client = mlflow_client(uri)
    exp = experiment_id(client, name, sweep_dir)
    run = find_trial_run(client, exp, trial_id)
    if run is None:
        return
    rid = run.info.run_id
    client.set_tag(rid, STATUS, status)
    for k, v in tags.items():
        if v is not None:
            client.set_tag(rid, k, str(v)[:5000])
    mlflow_status = {COMPLETED: "FINISHED", PRUNED: "KILLED", FAILED: "FAILED"}.get(status)
    if mlflow_status:
        client.set_terminated(rid, status=mlflow_status)


def set_trial_state(uri: str, name: str, sweep_dir: str, trial_id: str, status: str | None, **tags: Any) -> None:
    """Driver-side state of a live trial's run (the promotion scheduler's ``paused``, then
    ``running`` again once promoted) with its tags; the run stays open (no end time)."""
    client = mlflow_client(uri)
    run = find_trial_run(client, experiment_id(client, name, sweep_dir), trial_id)
    if run is None:
        return
    if status is not None:
        client.set_tag(run.info.run_id, STATUS, status)
    for k, v in tags.items():
        if v is not None:
            client.set_tag(run.info.run_id, k, str(v))


def finish_parent(uri: str, run_id: str, summary: dict[str, Any], files: list[str]) -> None:
    client = mlflow_client(uri)
    for k, v in summary.items():
        if isinstance(v, (int, float)) and v is not None:
            client.log_metric(run_id, k, float(v))
        elif v is not None:
            client.set_tag(run_id, f"summary.{k}", str(v)[:5000])
    for f in files:
        client.log_artifact(run_id, f)
    client.set_terminated(run_id, status="FINISHED")


# ---------------------------------------------------------------------------- the trial side
class TrialTracker:
    def __init__(self, client, run_id: str, last_step: int, objective: dict[str, str] | None = None,
                 best: float | None = None, pictures: TrialPictures | None = None,
                 images: set[tuple[str, int]] | None = None, best_step: int | None = None):
        self.client, self.run_id, self.last_step = client, run_id, last_step
        self.best_step = best_step  # the step of ``best`` (the earliest, on a tie)
        self.spent: dict[str, float] = {}  # the cost metrics a restarted trial's earlier attempts logged
        self.objective = objective or {}  # {metric, mode} of the sweep; empty outside a sweep
        self.best = best  # the best objective value logged so far
        self.pictures = pictures  # the trial's Optuna artifacts (sample grids), where reachable
        self.images = images or set()  # (key, step) of the MLflow images the run already has

    @classmethod
    def open(cls, sweep: dict[str, Any], sweep_dir: str, cfg: dict[str, Any], config: dict[str, Any],
             trial_id: str, trial_name: str, checkpoint_dir: str = "", *, config_text: str,
             node_id: str | None = None) -> "TrialTracker":
        """The trial's MLflow run (created, or reopened on a restart). ``checkpoint_dir``: where Ray
        persists this trial's checkpoints in the sweep's storage (the trial computes it from the
        sweep folder; no developer API), kept as the ``sweeper.checkpoint_dir`` tag.
        ``config_text``: the run config as YAML, kept as the run's ``config.yaml`` artifact.
        ``node_id``: the Ray node that runs it now (the ``sweeper.node`` tag)."""
        from mlflow.entities import Param, RunTag

        uri = tracking_uri(sweep, sweep_dir)
        client = mlflow_client(uri)
        exp = experiment_id(client, cfg["name"], sweep_dir)
        objective = dict(sweep.get("objective") or {})
        pictures = TrialPictures.for_trial(sweep, sweep_dir, cfg["name"], config.get(OPTUNA_TRIAL_KEY))
        run = find_trial_run(client, exp, trial_id)
        if run is not None:
            return cls._reopen(client, run, objective, pictures, node_id)
        parent = sweep.get(PARENT_RUN_KEY)
        tags = {
            TRIAL_TAG: trial_id,
            ROLE: "trial",
            TRIAL_NAME_TAG: trial_name,
            OPTUNA_NUMBER_TAG: str(config.get(OPTUNA_TRIAL_KEY, "")),
            STATUS: RUNNING,
            CODE_VERSION_TAG: code_version(),
            CHECKPOINT_DIR_TAG: checkpoint_dir,
        }
        if node_id:
            tags[NODE_TAG] = node_id
        if parent:
            tags["mlflow.parentRunId"] = parent
        tags.update({k: str(v) for k, v in (config.get(RUN_TAGS_KEY) or {}).items()})  # a replicate's role, parent, name
        # "trial-3" (the Optuna number) reads better in the dashboard than Ray's "run_trial_1a2b3c4d",
        # which the sweeper.trial_name tag keeps.
        number = config.get(OPTUNA_TRIAL_KEY)
        name = tags.pop("mlflow.runName", None) or (f"trial-{number}" if number is not None else trial_name)
        run = client.create_run(exp, run_name=name, tags=tags)
        rid = run.info.run_id
        params = flatten(cfg)
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(rid, params=items[i : i + 100])
        swept = [k for k in config if not k.startswith("__")]
        client.log_batch(rid, tags=[RunTag(SWEPT_TAG, ",".join(swept))])
        client.log_text(rid, config_text, "config.yaml")
        if objective and tags[ROLE] == "trial":
            # Every trial of a sweep has the same objective and parameters: the first one stores
            # the view, later ones find it in place (a replicate, swept only by its seed, leaves it).
            save_view(client, exp, objective["metric"], objective["mode"], swept, cfg["train"]["steps"],
                      sweep.get(HEADLINE_KEY) or ())
        return cls(client, rid, 0, objective, None, pictures)

    @classmethod
    def _reopen(cls, client, run, objective: dict[str, str], pictures, node_id: str | None) -> "TrialTracker":
        """A restarted trial's run: RUNNING again, going on after the steps it logged before."""
        rid = run.info.run_id
        client.update_run(rid, status="RUNNING")
        if node_id:
            client.set_tag(rid, NODE_TAG, node_id)
        # Steps already logged before a restart are not logged again.
        hist = client.get_metric_history(rid, "steps_per_s")
        best, best_step = None, None
        if objective:
            found = best_point(client.get_metric_history(rid, objective["metric"]), objective["mode"])
            best, best_step = found if found else (None, None)
        tracker = cls(client, rid, max((m.step for m in hist), default=0), objective, best, pictures,
                      _logged_images(client, rid), best_step)
        tracker.spent = {k: v for k, v in run.data.metrics.items() if k in (ACCELERATOR_S, CPU_S, WALL_S)}
        return tracker

    def log_eval(self, step: int, metrics: dict[str, float], artifacts: list[str],
                 tags: dict[str, str] | None = None) -> None:
        """One evaluation: its pictures as artifacts and as step-indexed MLflow images, the sample
        grid as an artifact of the Optuna trial, then its metrics (and the best objective value so
        far) at ``step``. A step whose metrics are logged (a resumed trial) is skipped; the metrics
        go last, so a trial stopped half-way through an evaluation logs its pictures again on
        resume (and no picture twice) rather than none. ``tags``: the evaluation's verdicts
        (:func:`sweeper.eval.guards.guard_tags`: the broken sweep.constraints, ...), set on the run."""
        from mlflow.entities import Metric

        if step <= self.last_step:
            return
        now = int(time.time() * 1000)
        for a in artifacts:
            self.client.log_artifact(self.run_id, a, artifact_path=f"eval/step_{step:08d}")  # same path: replaced
            self._log_image(a, step, now)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        metric = self.objective.get("metric")
        if metric and isinstance(metrics.get(metric), (int, float)):
            value = float(metrics[metric])
            if _improves(value, self.best, self.objective.get("mode", "min")):
                self.best, self.best_step = value, step
            if self.best is not None:  # None while every value so far is NaN
                # The running best (the dashboard's curve), and the best with its step: their final
                # values are the trial's best evaluation, the one `sweeper best` ranks by.
                ms += [Metric(best_metric(metric), self.best, now, step),
                       Metric(best_value_key(metric), self.best, now, step),
                       Metric(best_step_key(metric), float(self.best_step), now, step)]
        for key, value in (tags or {}).items():  # the latest evaluation's verdicts
            self.client.set_tag(self.run_id, key, value)
        self.client.log_batch(self.run_id, metrics=ms)
        self.last_step = step

    def _log_image(self, path: str, step: int, now: int) -> None:
        from PIL import Image

        found = PICTURE_NAME.match(os.path.basename(path))
        if not found:
            return
        if (found["key"], step) not in self.images:
            with Image.open(path) as img:
                img.load()
                self.client.log_image(self.run_id, img, key=found["key"], step=step, timestamp=now)
            self.images.add((found["key"], step))
        if found["key"] == SAMPLES and self.pictures is not None:
            self.pictures.attach(path)

    def finish_training(self, step: int) -> None:
        self.client.set_tag(self.run_id, FINAL_STEP_TAG, str(step))

    def fail(self, err: BaseException, step: int) -> None:
        if isinstance(err, (SystemExit, KeyboardInterrupt)):
            # Ray stops a trial it prunes with SystemExit, and an interrupted sweep resumes the
            # trial: neither is a failure (the driver records pruned; a resume continues the run).
            return
        msg = f"{type(err).__name__}: {err}"
        self.client.set_tag(self.run_id, STATUS, FAILED)
        self.client.set_tag(self.run_id, FAILURE_TAG, msg[:5000])
        self.client.set_tag(self.run_id, FAILED_AT_TAG, str(getattr(err, "step", step)))
        self.client.set_tag(self.run_id, TRACEBACK_TAG, "".join(traceback.format_exception(err))[-5000:])


def _logged_images(client, run_id: str) -> set[tuple[str, int]]:
    found = set()
    for a in client.list_artifacts(run_id, "images"):
        m = LOGGED_IMAGE.match(a.path)
        if m:
            found.add((m["key"], int(m["step"])))
    return found


def _improves(value: float, best: float | None, mode: str) -> bool:
    if value != value:  # NaN never wins
        return False
    return best is None or (value < best if mode == "min" else value > best)


def best_point(history: list, mode: str) -> tuple[float, int] | None:
    """``(value, step)`` of the best finite value of a metric history (MLflow ``Metric`` objects),
    the earliest step on a tie; None when no value is finite."""
    best: tuple[float, int] | None = None
    for m in sorted(history, key=lambda m: m.step):
        if m.value == m.value and abs(m.value) != float("inf") and _improves(m.value, best and best[0], mode):
            best = (m.value, m.step)
    return best


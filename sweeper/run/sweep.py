"""`sweeper run SPACE.yaml`: a search space becomes a Ray Tune sweep with Optuna search and pruning.

    summary = run_sweep("search_spaces/demo.yaml")                 # local Ray on 127.0.0.1
    summary = run_sweep("search_spaces/SPACE.yaml", address="auto")   # join a running cluster

Order of work: validate everything a user can get wrong (spec, data, storage, tracking server,
inception weights, resources) before a single trial starts; compute the reference statistics
once; then run the Tuner. Re-running the same command resumes the sweep (unfinished trials continue
from their checkpoints, the Optuna history is kept, the planned trial count holds); ``restart=True``
starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from sweeper.store import locations
from sweeper.store import storage
from sweeper.config.run_config import set_dotted
from sweeper.errors import SweeperError
from sweeper.keys import COMPLETED, FAILED, HEADLINE_KEY, OPTUNA_JOURNAL_KEY, PARENT_RUN_KEY, PRUNED
from models import get_family
from sweeper.config.space import Spec, load_spec
from sweeper.run.callbacks import Progress, TrackingStatus  # noqa: F401  (replicates use them from here)



def sweep_dir_of(spec: Spec) -> str:
    return locations.sweep_dir(spec.run_config["storage"], spec.run_config["name"])


def local_dir_of(spec: Spec) -> Path:
    """A local folder for what cannot live on S3 (the Optuna journal, the SQLite tracking DB)."""
    return locations.local_dir(sweep_dir_of(spec))


# ---------------------------------------------------------------------------- pre-flight
def preflight(spec: Spec) -> Any:
    """Everything checkable without Ray; returns the training images. Raises SweeperError."""
    from sweeper.store.data import load_images
    from sweeper.store.tracking import check_reachable, tracking_uri

    from sweeper.store.data import training_images

    cfg = spec.run_config
    images = load_images(cfg["data"]["path"], cfg["data"]["image_size"], min_count=cfg["train"]["batch_size"])
    swept = spec.sweep["params"].get("data.subset")
    if swept is not None:  # the largest K a trial may draw must exist, before any trial starts
        sizes = [c for c in swept["choices"] if c is not None] if swept["type"] == "categorical" else [swept["high"]]
        largest = max(sizes, default=None)
        if largest is not None and largest > len(images):
            raise SweeperError(f"{spec.path}: sweep.params.data.subset reaches {largest} images, but "
                               f"{cfg['data']['path']} holds {len(images)}; lower it to at most {len(images)}")
    elif cfg["data"].get("subset") is not None:
        images = training_images(cfg["data"], min_count=cfg["train"]["batch_size"])  # the trials' reference set
    probe = storage.join(sweep_dir_of(spec), ".sweeper-write-check")
    storage.write_bytes(probe, b"ok")
    storage.delete(probe)
    workers = int(spec.sweep["resources"].get("workers", 1))
    if cfg["train"]["batch_size"] % workers:
        raise SweeperError(
            f"{spec.path}: train.batch_size {cfg['train']['batch_size']} does not split over "
            f"sweep.resources.workers={workers}; use a multiple of {workers}"
        )
    check_reachable(tracking_uri(spec.sweep, sweep_dir_of(spec)))
    return images


def check_resources(spec: Spec) -> None:
    """A trial that asks for more than any node has would wait forever: refuse it now."""
    import ray

    res = spec.sweep["resources"]
    workers = max(1, int(res.get("workers", 1)))
    gpus, cpus = float(res.get("gpus", 0)), float(res.get("cpus", 1))
    # The nodes alive now, and the node types an autoscaler may still add (a GPU pool at zero).
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] + autoscalable_node_resources()
    max_gpu = max((float(n.get("GPU", 0.0)) for n in nodes), default=0.0)
    max_cpu = max((float(n.get("CPU", 0.0)) for n in nodes), default=0.0)
    per_gpu = gpus / workers if workers > 1 else gpus
    per_cpu = max(1.0, cpus / workers) if workers > 1 else cpus
    if per_gpu > max_gpu:
        raise SweeperError(
            f"{spec.path}: sweep.resources.gpus asks for {per_gpu:g} GPU(s) per "
            f"{'worker' if workers > 1 else 'trial'}, but the largest node has {max_gpu:g}; "
            "lower sweep.resources.gpus, raise sweep.resources.workers, or add GPU nodes"
        )
    if per_cpu > max_cpu:
        raise SweeperError(
            f"{spec.path}: sweep.resources.cpus asks for {per_cpu:g} CPU(s) per "
            f"{'worker' if workers > 1 else 'trial'}, but the largest node has {max_cpu:g}; lower it"
        )


def ray_cluster_config():
    """The autoscaler's cluster config as Ray's GCS holds it (node groups with resources and max
    counts), or None. The one private Ray API sweeper uses: no public API exposes the node types an
    autoscaler may add. ``tests/test_ddp.py`` calls it on a live local Ray, so a Ray upgrade that
    moves it fails that test instead of silently skipping the resource check."""
    from ray._private.state import state

    return state.get_cluster_config()


def autoscalable_node_resources() -> list[dict[str, float]]:
    """Per-node resources of the node types an autoscaler can add: from the cluster config the
    autoscaler reports to Ray (KubeRay, autoscaler v2), else from the cluster launcher's
    ``~/ray_bootstrap_config.yaml`` on its head node. Empty when neither is known."""
    out: list[dict[str, float]] = []
    try:
        config = ray_cluster_config()
        for group in (config.node_group_configs if config is not None else []):
            if group.max_count != 0:
                out.append({k: float(v) for k, v in group.resources.items()})
    except Exception:
        pass
    boot = Path.home() / "ray_bootstrap_config.yaml"
    if not out and boot.is_file():
        import yaml

        try:
            types = (yaml.safe_load(boot.read_text()) or {}).get("available_node_types") or {}
        except (OSError, yaml.YAMLError):
            types = {}
        out = [{k: float(v) for k, v in (t.get("resources") or {}).items()}
               for t in types.values() if int(t.get("max_workers", 0) or 0) > 0]
    return out


# ---------------------------------------------------------------------------- Ray
def _live_cluster_address() -> str | None:
    """The address of a running Ray cluster on this machine, if its GCS answers (a stale
    /tmp/ray/ray_current_cluster from a killed cluster would make ray.init hang)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    # Where `ray start` (and ray.cluster_utils.Cluster) write it: $RAY_TMPDIR, else $TMPDIR, else /tmp.
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    f = Path(base) / "ray" / "ray_current_cluster"
    try:
        addr = f.read_text().strip()
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return addr
    except (OSError, ValueError):
        return None


def wants_local(address: str | None) -> bool:
    return address == "local" or (address is None and _live_cluster_address() is None)


def bind_loopback() -> None:
    """Make a local Ray bind every node to 127.0.0.1 (nothing else can join, no traffic leaves).

    Ray reads the switch when ``ray`` is first imported, so this must run before that import; if
    ray was imported already, its constant is set too. A real cluster node must not call this.
    """
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join a cluster (``address`` given, or a live one found) or start a local Ray on loopback.

    Returns True when this call started Ray (and should shut it down).
    """
    local = wants_local(address)
    if local:
        bind_loopback()
    import ray

    if ray.is_initialized():
        return False
    if local:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
        bad = [n["NodeManagerAddress"] for n in ray.nodes() if n["NodeManagerAddress"] != "127.0.0.1"]
        if bad:
            ray.shutdown()
            raise SweeperError(f"local Ray bound to {bad[0]}, not 127.0.0.1; import sweeper before ray, "
                               "or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
        return True
    ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR")
    return False


# ---------------------------------------------------------------------------- the sweep
def run_sweep(spec_path: str, restart: bool = False, address: str | None = None,
              num_cpus: int | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run or resume the sweep of a spec file; returns the summary (counts, best trial).

    ``overrides``: dotted keys replacing spec values, e.g. ``{"data.path": "s3://b/obama"}``;
    ``sweep.*`` keys go to the sweep section. Three stages: :func:`prepare` (every check that can
    fail on a user mistake, before Ray starts), :func:`build_tuner`, then the run itself.
    """
    if wants_local(address):
        bind_loopback()  # before the first import of ray
    spec = prepare(spec_path, restart=restart, overrides=overrides)
    started_ray = connect_ray(address, num_cpus)
    try:
        check_resources(spec)
        tuner, tracking, parent = build_tuner(spec)
        tuner.fit()
        from sweeper.search.study import default_storage, open_study
        from sweeper.search.summary import summarize

        ldir = local_dir_of(spec).absolute()
        summary = summarize(open_study(spec, default_storage(ldir), spec.run_config["name"]))
        _finish(spec, summary, tracking, parent, ldir)
        return summary
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def prepare(spec_path: str, restart: bool = False, overrides: dict[str, Any] | None = None) -> Spec:
    """Load the spec with its overrides, make its paths absolute, wipe it on ``restart``, run the
    preflight checks and compute the reference statistics once for the whole sweep."""
    from sweeper.eval.evaluator import Evaluator

    spec = load_spec(spec_path)
    for key, value in (overrides or {}).items():
        if key.startswith("sweep."):
            spec.sweep[key[len("sweep."):]] = value
        else:
            set_dotted(spec.run_config, key, value)
    cfg = spec.run_config
    # Ray Tune runs each trial in its own working folder: a relative path would name a different
    # place in every trial (reference-stats cache, tracking DB, user data). Make them absolute.
    if "://" not in cfg["storage"]:
        cfg["storage"] = os.path.abspath(os.path.expanduser(cfg["storage"]))
    dp = cfg["data"]["path"]
    if "://" not in dp and not dp.startswith("builtin:"):
        cfg["data"]["path"] = os.path.abspath(os.path.expanduser(dp))
    if restart:
        _wipe(sweep_dir_of(spec), local_dir_of(spec).absolute())
    images = preflight(spec)
    # Reference statistics once per sweep; every trial then only loads the cached file.
    print(f"[sweeper] {cfg['name']}: reference statistics ({cfg['eval']['features']}) ...", flush=True)
    Evaluator(cfg["eval"], images, storage=cfg["storage"], out_dir=tempfile.mkdtemp()).reference()
    return spec


def build_tuner(spec: Spec):
    """The Tuner (new, or restored from the sweep's Ray folder), the tracking URI and the parent run."""
    from ray import tune

    from sweeper.search.build import build_search
    from sweeper.search.study import default_storage
    from sweeper.store.tracking import open_parent, tracking_uri
    from sweeper.run.trial import run_trial

    cfg, sw = spec.run_config, spec.sweep
    sdir, ldir = sweep_dir_of(spec), local_dir_of(spec).absolute()
    ray_path = storage.join(sdir, locations.RAY_DIR)
    tracking = tracking_uri(sw, sdir)
    resuming = _can_restore(ray_path)
    parent = open_parent(tracking, cfg["name"], sdir, spec.path, resume=resuming)
    # The driver's tracking URI, resolved once, so every trial logs to the same store.
    # The journal path lets trials attach their pictures to their Optuna trials (local sweeps).
    sweep_for_trials = {**sw, "tracking": tracking, PARENT_RUN_KEY: parent, OPTUNA_JOURNAL_KEY: default_storage(ldir),
                        HEADLINE_KEY: list(get_family(cfg["model"]["family"]).HEADLINE)}
    searcher, scheduler = build_search(spec, default_storage(ldir), cfg["name"])
    if hasattr(scheduler, "tracking"):
        scheduler.tracking = (tracking, cfg["name"], sdir)  # the promotion scheduler tags paused runs
    trainable = tune.with_parameters(run_trial, base=cfg, sweep=sweep_for_trials, sweep_dir=sdir,
                                     families=shipped_families())
    trainable = tune.with_resources(trainable, trial_resources(sw))
    obj = sw["objective"]
    callbacks = [Progress(cfg["name"], obj["metric"], obj["mode"], int(sw["trials"]), scheduler,
                          collapse=sw.get("collapse")),
                 TrackingStatus(tracking, cfg["name"], sdir, scheduler)]
    if resuming:
        print(f"[sweeper] {cfg['name']}: resuming the sweep in {sdir}", flush=True)
        # Ray restores its searcher, scheduler and callbacks from the experiment folder.
        tuner = tune.Tuner.restore(_abs(ray_path), trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner, tracking, parent
    # reuse_actors: a trial's process runs the next trial too, so python, torch, the family's
    # module, MLflow and the evaluator are set up once per process, not once per trial (a 4-step
    # trial was mostly that: bench/bench_sweep.py --startup).
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=int(sw["trials"]),
                                    max_concurrent_trials=int(sw["max_concurrent"]), reuse_actors=True),
        run_config=tune.RunConfig(
            name=locations.RAY_DIR, storage_path=_abs(sdir), verbose=0, callbacks=callbacks,
            checkpoint_config=checkpoint_config(obj),
            failure_config=tune.FailureConfig(max_failures=int(sw.get("max_failures", 2))),
        ),
    )
    return tuner, tracking, parent


def shipped_families() -> dict[str, type]:
    """Families registered outside ``models/`` (a user's or a test's file): trial processes could
    not import them by name, so their classes travel with the trainable, pickled by value."""
    import sys

    import ray.cloudpickle
    from models import external_families

    found = external_families()
    for cls in found.values():
        mod = sys.modules.get(cls.__module__)
        if mod is not None and cls.__module__ != "__main__":
            ray.cloudpickle.register_pickle_by_value(mod)
    return found


def checkpoint_config(objective: dict[str, str]):
    """Per trial: the checkpoint of the best evaluation by the objective (the one `sweeper best`
    names) and, always kept by Ray besides, the latest one (to resume from)."""
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=objective["metric"],
                                 checkpoint_score_order=objective["mode"])


def trial_resources(sw: dict[str, Any]) -> dict[str, float]:
    res = sw["resources"]
    if int(res.get("workers", 1)) > 1:
        # The trial only supervises; its Ray Train workers ask for the CPUs/GPUs themselves.
        # (Ray refuses an all-zero bundle, so the supervisor holds a token share of a CPU.)
        return {"cpu": 0.01}
    return {"cpu": float(res.get("cpus", 1)), "gpu": float(res.get("gpus", 0))}


def _abs(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def _can_restore(ray_path: str) -> bool:
    from ray import tune

    try:
        return tune.Tuner.can_restore(_abs(ray_path))
    except Exception:
        return False


def _wipe(sdir: str, ldir: Path) -> None:
    if "://" in sdir:
        for uri in storage.list(sdir):
            if "/reference_stats/" not in uri:
                storage.delete(uri)
    elif Path(sdir).exists():
        for child in Path(sdir).iterdir():
            if child.name != "reference_stats":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    if ldir.exists() and str(ldir) != sdir:
        shutil.rmtree(ldir)


def sweep_cost_of(tracking: str, parent: str) -> dict[str, Any]:
    """The cost totals (sweeper.run.cost) of the sweep whose parent run is ``parent``: its trial
    runs and its replicate runs."""
    from sweeper.run.cost import experiment_cost
    from sweeper.store.tracking import mlflow_client

    client = mlflow_client(tracking)
    return experiment_cost(client, client.get_run(parent).info.experiment_id)


def best_se(tracking: str, parent: str, number: int, metric: str) -> float | None:
    """The standard error (``<metric>_se``) logged beside the objective at the best trial's last
    evaluation, the one whose value Optuna holds; None if that evaluation logged none."""
    from sweeper.eval.uncertainty import se_key
    from sweeper.keys import OPTUNA_NUMBER_TAG, ROLE
    from sweeper.store.tracking import mlflow_client

    client = mlflow_client(tracking)
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`{OPTUNA_NUMBER_TAG}` = '{number}' and tags.`{ROLE}` = 'trial'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    se = runs[0].data.metrics.get(se_key(metric)) if runs else None
    return float(se) if se is not None and se == se else None


def _finish(spec: Spec, summary: dict[str, Any], tracking: str, parent: str, ldir: Path) -> None:
    from sweeper.run.cost import cost_line
    from sweeper.store.tracking import finish_parent

    m = spec.sweep["objective"]["metric"]
    summary["cost"] = cost = sweep_cost_of(tracking, parent)
    best = summary.get("best") or {}
    if best:
        best["se"] = best_se(tracking, parent, best["number"], m)
    ldir.mkdir(parents=True, exist_ok=True)
    path = ldir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    flat = {
        "trials_completed": summary.get(COMPLETED),
        "trials_pruned": summary.get(PRUNED),
        "trials_failed": summary.get(FAILED),
        "best_value": best.get("value"),
        "best_se": best.get("se"),
        "best_trial": best.get("number"),
        "best_params": json.dumps(best.get("params")) if best else None,
        **{k: v for k, v in cost.items() if k not in (COMPLETED,)},  # accelerator_s, cpu_s, ... (metrics)
    }
    finish_parent(tracking, parent, flat, [str(path)])
    print(f"[sweeper] {spec.run_config['name']}: done: {summary.get(COMPLETED)} completed, "
          f"{summary.get(PRUNED)} pruned, {summary.get(FAILED)} failed", flush=True)
    for c in summary.get("collapsed_trials") or []:
        print(f"[sweeper] collapsed: optuna trial {c['number']} ({c['rule']}): never the best", flush=True)
    if best:
        se = f"standard error {best['se']:.2g}, " if best.get("se") is not None else ""
        print(f"[sweeper] best {m} = {best['value']:.4g} ({se}optuna trial {best['number']}): {best['params']}",
              flush=True)
    print(f"[sweeper] {cost_line(cost)}", flush=True)

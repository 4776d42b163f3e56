"""One sweep trial: a Ray Tune function trainable around the shared training loop.

With ``resources.workers: 1`` the trial trains in its own Tune process. With more workers it
launches a Ray Train ``TorchTrainer`` (DDP over NCCL on GPU, gloo on CPU) and relays the workers'
reports to Tune through ``TuneReportCallback``: the pattern Ray 2.x recommends now that
``Tuner(trainer)`` is deprecated.

Every evaluation reports ``step``, the metrics and a checkpoint (Tune keeps the best and the
latest); a restarted trial resumes from its latest checkpoint.

Start-up, measured: the first report of each trial carries ``startup``, the wall-clock times
(``time.time()``) at which this trial's process started (``process``), imported this module
(``imported``), entered the trainable (``entry``), finished its imports (``imports``), had the
training images (``data``), the model (``model``), the evaluator (``evaluator``), the reference
statistics (``reference``), the MLflow run (``tracking``) and began its first training step
(``first_step``); ``trials_before`` counts the trials this process ran before (Ray reuses actors).
Every report carries ``reported_at``. ``bench/bench_sweep.py`` turns these into where a short
trial's time goes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sweeper.store import locations
from sweeper.errors import TrainingDiverged
from sweeper.keys import FAILURE_KEY
from sweeper.run.trainer import Trainer, load_checkpoint

STATE_FILE = "state.pt"
IMPORTED_AT = time.time()  # when this process imported the trial module (torch, the loop, the store)
_TRIALS_RUN = 0  # trials this process has run (a reused Ray actor runs several)


def process_started_at() -> float | None:
    """When this process started, from Linux's /proc (None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def trial_config(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The run config of a trial: the spec's fixed config with the suggested values applied."""
    from sweeper.config.space import apply

    values = {k: v for k, v in config.items() if not k.startswith("__")}
    return apply(base, values)


def register_shipped(families: dict[str, type] | None) -> None:
    """Register the families the driver shipped (those defined outside ``models/``)."""
    from models import register_model

    for name, cls in (families or {}).items():
        register_model(name)(cls)


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any], sweep_dir: str,
              families: dict[str, type] | None = None) -> None:
    """The Tune trainable: ``tune.with_parameters(run_trial, base=..., sweep=..., sweep_dir=..., families=...)``."""
    entry = time.time()
    from ray import tune

    register_shipped(families)
    cfg = trial_config(base, config)
    workers = int(sweep["resources"].get("workers", 1))
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    if workers <= 1:
        # Ray persists the trial's checkpoints under the sweep's trials folder, in a folder named
        # like the trial's working folder (get_trial_dir is the staging copy, not the persisted one).
        ckpt_dir = locations.tune_trial_dir(sweep_dir, os.path.basename(ctx.get_trial_dir().rstrip("/")))
        _train_and_report(cfg, config, sweep, sweep_dir, trial_id, trial_name, in_train=False, checkpoint_dir=ckpt_dir,
                          entry=entry)
        return
    _run_ddp(cfg, config, sweep, sweep_dir, trial_id, trial_name, workers, families)


def _run_ddp(cfg, config, sweep, sweep_dir, trial_id, trial_name, workers: int, families=None) -> None:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = sweep["resources"]
    use_gpu = float(res.get("gpus", 0)) > 0
    per_worker = {"CPU": max(1.0, float(res.get("cpus", 1)) / workers)}
    if use_gpu:
        per_worker["GPU"] = float(res["gpus"]) / workers
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"cfg": cfg, "config": config, "sweep": sweep, "sweep_dir": sweep_dir,
                           "trial_id": trial_id, "trial_name": trial_name, "families": families,
                           "checkpoint_dir": locations.ddp_run_dir(sweep_dir, trial_name)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # Same name on a re-run of this trial: Ray Train then resumes from its latest checkpoint.
        # Tune's num_to_keep never sees these checkpoints (the callback forwards a path, not the
        # checkpoint): the Train run keeps the best by the objective, and Ray keeps the latest too.
        run_config=RunConfig(name=f"{trial_name}-ddp", storage_path=_ray_storage(sweep_dir),
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=1, checkpoint_score_attribute=sweep["objective"]["metric"],
                                 checkpoint_score_order=sweep["objective"]["mode"])),
    )
    trainer.fit()


def _ddp_worker(loop_cfg: dict[str, Any]) -> None:
    register_shipped(loop_cfg.get("families"))
    _train_and_report(loop_cfg["cfg"], loop_cfg["config"], loop_cfg["sweep"], loop_cfg["sweep_dir"],
                      loop_cfg["trial_id"], loop_cfg["trial_name"], in_train=True,
                      checkpoint_dir=loop_cfg.get("checkpoint_dir", ""))


def _ray_storage(sweep_dir: str) -> str:
    return sweep_dir if "://" in sweep_dir else os.path.abspath(sweep_dir)


def _train_and_report(cfg, config, sweep, sweep_dir, trial_id, trial_name, in_train: bool,
                      checkpoint_dir: str = "", entry: float | None = None) -> None:
    global _TRIALS_RUN
    startup = {"process": process_started_at(), "imported": IMPORTED_AT, "entry": entry or time.time(),
               "trials_before": _TRIALS_RUN}
    _TRIALS_RUN += 1
    if in_train:
        import ray.train as api
        from ray.train import Checkpoint
    else:
        from ray import tune as api
        from ray.tune import Checkpoint

    import ray

    from sweeper.config.run_config import dump_config
    from sweeper.run.cost import Meter
    from sweeper.store.tracking import TrialTracker

    node_id = ray.get_runtime_context().get_node_id()  # which machine ran it (a Tune result, an MLflow tag)
    meter = Meter(gpus=float(sweep["resources"].get("gpus", 0)))  # from here: data, model, evaluator count
    torch_threads_for(float(sweep["resources"].get("cpus", 1)) / (1 if not in_train else max(1, int(sweep["resources"].get("workers", 1)))))
    work = Path(tempfile.mkdtemp(prefix=f"sweeper-{trial_name}-"))
    startup["imports"] = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # gpu_mem_gb is this trial's peak, in a reused process too
    trainer = Trainer(cfg, out_dir=str(work), progress=False, share_evaluator=True)
    startup.update(trainer.startup)  # data, model, evaluator
    if trainer.evaluator is not None:
        trainer.evaluator.reference()  # the driver computed them: loaded now, not in the first evaluation
    startup["reference"] = time.time()
    ckpt = api.get_checkpoint()
    if ckpt is not None:
        _restore_newest_readable(trainer, ckpt)

    tracker = None
    if trainer.rank == 0:
        tracker = TrialTracker.open(sweep, sweep_dir, cfg, config, trial_id, trial_name, checkpoint_dir,
                                    config_text=dump_config(cfg), node_id=node_id)
        meter.offset.update(tracker.spent)  # a restarted trial goes on counting
    startup["tracking"] = time.time()
    on_eval = _reporter(api.report, Checkpoint, trainer, tracker, meter, sweep, node_id, work, startup)
    try:
        trainer.fit(on_eval=on_eval)
    except TrainingDiverged as e:
        # Deterministic: a retry from the last checkpoint would diverge again. End the trial with
        # a final result that names the failure; the searcher records FAIL, the sweep goes on.
        if tracker is not None:
            tracker.fail(e, e.step)
        shutil.rmtree(work, ignore_errors=True)
        api.report({"step": e.step, "node_id": node_id, FAILURE_KEY: str(e)})
        return
    except BaseException as e:
        if tracker is not None:
            tracker.fail(e, trainer.step)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if tracker is not None:
        tracker.finish_training(trainer.step)


def _reporter(report, Checkpoint, trainer: Trainer, tracker, meter, sweep: dict[str, Any], node_id: str,
              work: Path, startup: dict[str, Any]):
    """The loop's ``on_eval``: log the evaluation to MLflow, then report it (and its checkpoint) to
    Ray; the first report carries ``startup``."""
    from sweeper.eval.guards import guard_tags

    def on_eval(step: int, metrics: dict[str, float], artifacts: list[str], ckpt_uri: str | None) -> None:
        checkpoint = None
        if ckpt_uri is not None:
            d = Path(tempfile.mkdtemp(prefix="ckpt-", dir=work))
            shutil.move(ckpt_uri, d / STATE_FILE)  # Ray copies the folder to the sweep's storage
            checkpoint = Checkpoint.from_directory(str(d))
        if trainer.rank == 0:
            metrics = {**metrics, **meter.read()}
        if tracker is not None:
            tracker.log_eval(step, metrics, artifacts, guard_tags(metrics, sweep))
        extra = {"startup": {**startup, "first_step": trainer.first_step_at}} if startup else {}
        startup.clear()  # the first report only
        report({**metrics, "step": step, "node_id": node_id, "pid": os.getpid(), "reported_at": time.time(),
                **extra}, checkpoint=checkpoint)

    return on_eval


def _restore_newest_readable(trainer: Trainer, ckpt) -> None:
    """Restore from Ray's latest checkpoint; if it is unreadable (a truncated upload), say which
    and fall back to the newest readable sibling checkpoint Ray kept (the best one)."""
    import pyarrow.fs as pafs

    from sweeper.errors import SweeperError

    candidates = [ckpt]
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    try:
        infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
        older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != ckpt.path.rstrip("/")),
                       reverse=True)
        candidates += [type(ckpt)(p, filesystem=ckpt.filesystem) for p in older]  # Tune's or Train's class
    except OSError:
        pass
    for c in candidates:
        try:
            with c.as_directory() as d:
                trainer.restore(load_checkpoint(str(Path(d) / STATE_FILE), map_location=trainer.device))
            return
        except (SweeperError, FileNotFoundError, OSError) as e:
            print(f"[sweeper] warning: {e}; trying an older checkpoint", flush=True)
    raise SweeperError(f"{ckpt.path}: no readable checkpoint for this trial; delete the trial folder to restart it")


def torch_threads_for(cpus: float) -> None:
    """Each trial gets the CPU cores Ray reserved for it; more threads only fight each other."""
    torch.set_num_threads(max(1, int(cpus)))

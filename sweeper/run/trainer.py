"""One training run of one configuration: the loop a sweep trial and `sweeper train` share.

    run = Trainer(cfg, out_dir="runs/demo")
    result = run.fit(resume=True)          # {"step": ..., "metrics": {...}, "checkpoint": path}

The loop is generic: the model family (``models/``) owns its networks, optimisers, training step
and sampler; this file owns data, seeding, checkpoints, evaluation and progress. Every random
choice of a step (latents, augmentation, noise, batch, flips) is seeded from (seed, step, rank),
and a family keeps any generator of its own in its state_dict, so a run resumed from a
checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from sweeper.store import storage
from sweeper.config.run_config import dump_config
from sweeper.store.data import sample_batch, training_images
from sweeper.errors import SweeperError, TrainingDiverged

CKPT_PREFIX = "step_"
# One evaluator per process, for trials (``share_evaluator``): a Ray actor that runs trial after
# trial keeps its feature extractor, hashed training set and reference statistics instead of
# building and loading them again. Keyed by everything the evaluator is built from.
_SHARED: dict[str, Any] = {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SweeperError(f"train.device: {name!r} but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 8_191 + rank) % (2**63 - 1)


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}.pt"


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    out = []
    for uri in storage.list(ckpt_dir):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(CKPT_PREFIX) and name.endswith(".pt"):
            out.append((int(name[len(CKPT_PREFIX) : -3]), uri))
    return sorted(out)


def save_checkpoint(uri: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())  # atomic: a crash never leaves half a file under this name


def load_checkpoint(uri: str, map_location: Any = "cpu") -> dict[str, Any]:
    try:
        data = storage.read_bytes(uri)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except SweeperError:
        raise
    except Exception as e:  # truncated or corrupt file: name it
        raise SweeperError(f"{uri}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to resume from the one before") from None


def latest_checkpoint(ckpt_dir: str, log: Callable[[str], None] = print, map_location: Any = "cpu"):
    """The newest readable checkpoint; a corrupt newest one is reported and skipped."""
    for step, uri in reversed(list_checkpoints(ckpt_dir)):
        try:
            return step, uri, load_checkpoint(uri, map_location)
        except SweeperError as e:
            log(f"warning: {e}; falling back to the previous checkpoint")
    return None


# ---------------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, cfg: dict[str, Any], out_dir: str, log: Callable[[str], None] = print,
                 progress: bool = True, evaluate: bool = True, share_evaluator: bool = False):
        from models import build_model

        self.cfg, self.out_dir, self.log, self.progress = cfg, str(out_dir), log, progress
        self.rank, self.world = rank_world()
        t = cfg["train"]
        if t["batch_size"] % self.world:
            raise SweeperError(
                f"train.batch_size: {t['batch_size']} does not split evenly over {self.world} workers; "
                "use a multiple of the worker count"
            )
        self.device = resolve_device(t["device"])
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.startup: dict[str, float] = {}  # when each part was ready (time.time()): a trial reports them
        self.images = training_images(cfg["data"], min_count=t["batch_size"])  # data.subset applied
        self.images_dev = self.images.to(self.device)
        self.startup["data"] = time.time()
        self.model = build_model(cfg["model"], cfg["data"]["image_size"], seed=cfg["seed"], device=self.device,
                                 precision=t["precision"])
        self.model.sync_from_rank0()
        self.startup["model"] = time.time()
        self.ckpt_dir = storage.join(self.out_dir, "checkpoints")
        self.evaluator = None
        if evaluate and self.rank == 0:
            self.evaluator = self._evaluator(str(Path(self.local_dir()) / "eval"), share_evaluator)
            self.startup["evaluator"] = time.time()
        self.step = 0
        self.first_step_at: float | None = None  # time.time() when fit began its first training step
        self.history: list[dict[str, Any]] = []

    def _evaluator(self, out_dir: str, shared: bool):
        """This run's evaluator; with ``shared``, the process's one for the same eval, data,
        storage and device (its PNGs go to this run's ``out_dir``)."""
        from sweeper.eval.evaluator import Evaluator
        from sweeper.store.data import heldout_images

        cfg = self.cfg
        key = json.dumps([cfg["eval"], cfg["data"], cfg["storage"], str(self.device)], sort_keys=True, default=str)
        ev = _SHARED.get(key) if shared else None
        if ev is None:
            ev = Evaluator(cfg["eval"], self.images, storage=cfg["storage"], device=self.device, out_dir=out_dir,
                           heldout_images=heldout_images(cfg["data"]))
            if shared:
                _SHARED.clear()  # one kept: a sweep whose trials differ in data.subset holds the latest
                _SHARED[key] = ev
        ev.out_dir = out_dir
        return ev

    def local_dir(self) -> str:
        from sweeper.store.locations import scratch_dir

        return scratch_dir(self.out_dir)

    # -- state
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "config": self.cfg, "history": self.history}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))

    def try_resume(self) -> bool:
        found = latest_checkpoint(self.ckpt_dir, self.log, map_location=self.device)
        if found is None:
            return False
        step, uri, ckpt = found
        self.restore(ckpt)
        self.log(f"resumed from {uri} (step {step})")
        return True

    def init_from(self, uri: str, total: int) -> None:
        """Start from another run's checkpoint (``sweeper train --init-from``): its weights,
        optimiser states, step and history, so the run continues that run's schedule (the
        step-seeded batches and noise go on from its step) and writes to this run's folder."""
        ckpt = load_checkpoint(uri, map_location=self.device)
        theirs = (ckpt.get("config") or {}).get("model")
        if theirs is not None and theirs != self.cfg["model"]:
            diff = sorted(k for k in set(theirs) | set(self.cfg["model"]) if theirs.get(k) != self.cfg["model"].get(k))
            raise SweeperError(f"--init-from {uri}: its model differs from this config's in model.{', model.'.join(diff)}; "
                               "train the config `sweeper best` wrote for that checkpoint")
        if int(ckpt["step"]) >= total:
            raise SweeperError(f"--init-from {uri}: the checkpoint is at step {ckpt['step']} and this run trains to "
                               f"step {total}; pass --steps N with N above {ckpt['step']}")
        self.restore(ckpt)
        self.log(f"initialised from {uri} (step {self.step})")

    def save(self) -> str:
        uri = storage.join(self.ckpt_dir, checkpoint_name(self.step))
        save_checkpoint(uri, self.state())
        self.write_grid()
        return uri

    @torch.no_grad()
    def write_grid(self, n: int = 16) -> str:
        """A sample grid from fixed noise (``eval.seed``), so grids of successive checkpoints compare."""
        from torchvision.utils import save_image

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg["eval"]["seed"])
            img = self.model.sample(n, self.cfg["eval"]["seed"]).float().cpu()
        path = Path(self.local_dir()) / "samples" / f"step_{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(img * 0.5 + 0.5, path, nrow=int(math.sqrt(n)), padding=1)
        return str(path)

    # -- loop
    def fit(self, steps: int | None = None, resume: bool = False,
            on_eval: Callable[[int, dict[str, float], list[str], str | None], None] | None = None) -> dict[str, Any]:
        """Train to ``steps`` (default train.steps); evaluate and checkpoint on schedule.

        ``on_eval(step, metrics, artifacts, checkpoint_uri)`` runs after each evaluation
        (a sweep trial reports to Ray Tune there; other ranks get empty metrics).
        """
        cfg, t, e = self.cfg, self.cfg["train"], self.cfg["eval"]
        total = int(steps or t["steps"])
        if resume:
            self.try_resume()
        if self.rank == 0:
            storage.write_bytes(storage.join(self.out_dir, "config.yaml"), dump_config(cfg).encode())
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            # One rate on the bar (tqdm's own step/s); the postfix has the losses and the last evaluation.
            bar = tqdm(total=total, initial=self.step, desc=cfg["name"], unit="step", dynamic_ncols=True)
        last_ckpt, metrics = None, {}
        objective: tuple[str, float] | None = None
        t0, s0 = time.perf_counter(), self.step
        self.first_step_at = time.time()
        while self.step < total:
            torch.manual_seed(step_seed(cfg["seed"], self.step, self.rank))
            batch = sample_batch(self.images_dev, t["batch_size"], cfg["seed"], self.step, cfg["data"]["hflip"],
                                 self.rank, self.world)
            losses = self.model.train_step(batch, self.step)
            self.step += 1
            if not self.model.all_finite(losses):  # one all-reduced flag: every rank stops together
                raise TrainingDiverged(self.step, losses)
            rate = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.update(1)
                if self.step % t["log_every"] == 0 or self.step == total:
                    bar.set_postfix_str(progress_text(losses, objective), refresh=False)
            ckpt_due = self.step % t["checkpoint_every"] == 0 or self.step == total
            eval_due = self.step % e["every"] == 0 or self.step == total
            if not (ckpt_due or eval_due):
                continue
            metrics = {**losses, "steps_per_s": rate}
            if self.device.type == "cuda":
                metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            artifacts: list[str] = []
            if eval_due and self.evaluator is not None:
                m, artifacts = self.evaluator.evaluate(self.model, self.step)
                metrics.update(m)
                objective = _headline(m, objective)
            if self.rank == 0:
                self.history.append({"step": self.step, **metrics})
                last_ckpt = self.save()
            if eval_due and on_eval is not None:
                # Every rank calls it (Ray Train's report is collective); only rank 0 has metrics.
                on_eval(self.step, metrics if self.rank == 0 else {}, artifacts, last_ckpt if self.rank == 0 else None)
            if self.world > 1:
                dist.barrier()
        if bar is not None:
            bar.close()
        return {"step": self.step, "metrics": metrics, "checkpoint": last_ckpt, "history": self.history}


def _headline(metrics: dict[str, float], previous: tuple[str, float] | None) -> tuple[str, float] | None:
    """The evaluation's headline distance for the progress bar: fid, else the first fd_*."""
    for name in ["fid", *sorted(k for k in metrics if k.startswith("fd_"))]:
        if name in metrics:
            return name, float(metrics[name])
    return previous


def progress_text(losses: dict[str, float], objective: tuple[str, float] | None) -> str:
    """``d_real=0.812 g=1.204 | fid 41.20`` : losses, then the last evaluation's headline metric."""
    text = " ".join(f"{k.replace('loss_', '')}={v:.3f}" for k, v in losses.items())
    return f"{text} | {objective[0]} {objective[1]:.2f}" if objective else text

"""Model families, registered by name, and the contract every family fulfils.

A family is one file in this folder that decorates a :class:`ModelFamily` subclass with
``@register_model("name")``. ``sweeper/`` only ever calls :func:`build_model` and the methods of
:class:`ModelFamily`, so adding a family is one new file plus one search-space YAML (README,
"How to add a family", walks through ``models/patch_lut.py``).

>>> from models import build_model
>>> fam = build_model({"family": "patch_lut", **tiny_overrides}, image_size=32, seed=0)   # doctest: +SKIP
>>> losses = fam.train_step(real_images_in_minus1_1, step=0)    # doctest: +SKIP
>>> images = fam.sample(16, seed=1234)                          # doctest: +SKIP
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import math
import pkgutil
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from sweeper.errors import SweeperError

_REGISTRY: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_model("patch_lut")`` makes ``model.family: patch_lut`` build it."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.family_name = name
        return cls

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def families() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str | None) -> type:
    _load_all()
    if not name:
        raise SweeperError(f"model.family: missing; name one of the registered families: {', '.join(sorted(_REGISTRY))}")
    if name not in _REGISTRY:
        raise SweeperError(
            f"model.family: unknown model family {name!r}; registered families: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def external_families() -> dict[str, type]:
    """Families registered from outside this package (a user's or a test's file). A sweep ships
    these to its trial processes, which could not import them by name."""
    _load_all()
    return {n: c for n, c in _REGISTRY.items() if not c.__module__.startswith(__name__ + ".")}


def build_model(model_cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                precision: str = "fp32") -> "ModelFamily":
    """Build a model family from its resolved config section (``model:`` in a config YAML)."""
    cls = get_family(model_cfg.get("family"))
    return cls(model_cfg, image_size=image_size, seed=seed, device=device, precision=precision)


def noise(shape: tuple[int, ...], seed: int | torch.Generator, device: Any = "cpu") -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (an int or a CPU ``torch.Generator``),
    then moved to ``device``: the same numbers on every machine and accelerator."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen).to(device)


def cpu_generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int | torch.Generator | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    value = int(torch.randint(0, 2**62, (1,), generator=seed)) if isinstance(seed, torch.Generator) else int(seed)
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(value)
        if cuda:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(value)
        yield


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ModelFamily(abc.ABC):
    """What ``sweeper/`` relies on. A GAN, a VAE, a VQ-VAE with a learned prior and an iterative
    denoiser all fit it; nothing in ``sweeper/`` knows which one it holds.

    A family owns:

    - its config: ``DEFAULTS`` (every key with its default; the config loader rejects others),
      ``IMAGE_SIZES`` (what it can train on), ``validate(cfg, image_size)`` (raises
      ``SweeperError("model.<key>: <what is wrong>; <what to do>")``) and ``TINY`` (overrides that
      make the smallest model exercising every code path: the contract tests and CPU spaces use it);
    - its networks **and optimisers** (learning rates, betas, EMA are family config), built in
      ``__init__(cfg, image_size, seed, device, precision)``;
    - ``train_step(batch, step) -> {name: float}``: any number of optimiser updates on a batch of
      real images in [-1, 1]; ``step`` lets a family switch phase (an autoencoder, then its prior);
    - ``sample(n, seed) -> (n, 3, S, S) in [-1, 1]``: draws its own noise from ``seed`` (vectors,
      image-shaped noise, addresses) and runs its own sampler (one call or many steps), in eval
      mode, changing no state. The same seed gives the same images in every trial built from the
      same weights (common random numbers); the evaluator asks for one batch at a time;
    - ``state_dict()`` / ``load_state_dict(sd)``: everything needed to resume bit for bit;
    - ``networks()``: its modules by name (rank-0 sync, parameter counts, the contract tests);
    - ``LOSSES``: the names ``train_step`` returns (with the registered metrics' ``reports``, what
      lets the spec check refuse an objective or constraint nothing reports);
    - ``HEADLINE``: the names of its own metrics a researcher compares first (the MLflow view charts
      them beside the objective, diversity and sample types);
    - ``SWEEP_FIXED``: config keys that set how one of its reported metrics is measured (a bound's
      sample count, the images it averages over); a sweep that searches one is refused, so every
      trial of a sweep measures alike;
    - ``generation_ready`` (a property, True unless the family overrides it): whether ``sample``
      now draws generations. A two-phase family (an autoencoder, then a prior over its codes) says
      False until its prior has learned; evaluations before then report no generation metric.

    It inherits the data-parallel hooks (:meth:`sync_from_rank0`, :meth:`average_gradients`,
    :meth:`all_finite`) and may offer optional hooks:

    - ``pictures(out_dir, step, seed) -> [png paths]``: family pictures at every evaluation
      (a dictionary tiled as an image, reconstructions, memory entries beside samples);
    - ``cluster_assignments(n, seed) -> (images, assign (n, h, w), n_clusters) | None``: the
      built-in cluster-usage metric and maps use it;
    - metrics of its own: ``@register_metric("name", family="<family>")`` in its file
      (:mod:`sweeper.eval.registry`).
    """

    family_name: str = ""
    DEFAULTS: dict[str, Any] = {}
    IMAGE_SIZES: tuple[int, ...] = (32, 64, 128, 256)
    TINY: dict[str, Any] = {}
    SWEEP_FIXED: tuple[str, ...] = ()
    HEADLINE: tuple[str, ...] = ()  # its own metrics the dashboard charts on its first screen
    LOSSES: tuple[str, ...] | None = None  # the names train_step returns (shell patterns); None: undeclared

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32") -> None:
        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        self.device, self.precision = torch.device(device), precision

    # ------------------------------------------------------------------ config
    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        """Check the family's config for this image size; subclasses call ``super().validate`` first."""
        if image_size not in cls.IMAGE_SIZES:
            raise SweeperError(
                f"data.image_size: {image_size} px is not supported by {cls.family_name}; "
                f"use one of {', '.join(map(str, cls.IMAGE_SIZES))}"
            )

    @staticmethod
    def need(ok: bool, key: str, msg: str) -> None:
        """``need(cfg["width"] > 0, "width", "must be > 0")`` -> ``SweeperError("model.width: must be > 0")``."""
        if not ok:
            raise SweeperError(f"model.{key}: {msg}")

    # ------------------------------------------------------------------ the contract
    @abc.abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every module of the family by name (trained, EMA and frozen ones alike)."""

    @abc.abstractmethod
    def train_step(self, batch: torch.Tensor, step: int) -> dict[str, float]:
        """Optimiser updates on ``batch`` (real images in [-1, 1]) at training step ``step``."""

    @abc.abstractmethod
    def sample(self, n: int, seed: int | torch.Generator) -> torch.Tensor:
        """``n`` images in [-1, 1], (n, 3, S, S), from noise drawn with ``seed``; no state changes."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers and any other state: a resumed run continues bit for bit."""

    @abc.abstractmethod
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...

    @property
    def generation_ready(self) -> bool:
        """Whether ``sample()`` draws generations now. True for every family unless it says
        otherwise: a family whose samples are meaningless for a while (decoded uniform codes before
        a VQ-VAE's prior has learned) returns False until then, by a rule it documents and keeps
        in its state (a resumed run agrees). While False the evaluator samples nothing and runs
        only the metrics registered with ``generation=False`` (reconstructions, held-out bounds),
        so no generation objective, pruning decision or kept checkpoint comes from that time."""
        return True

    # ------------------------------------------------------------------ helpers a family may use
    @contextlib.contextmanager
    def sampling(self, *modules: nn.Module, seed: int | torch.Generator | None = None) -> Iterator[None]:
        """Eval mode (memory writes off, BatchNorm frozen) and no autograd for ``modules`` (default:
        all networks); each module's train/eval flag is restored afterwards. With ``seed``, torch's
        global RNG (CPU and the family's GPU) is forked and seeded from it, so layers that draw
        from it (noise injection) are deterministic too, and the training stream is untouched."""
        mods = modules or tuple(self.networks().values())
        flags = [(m, m.training) for mod in mods for m in mod.modules()]
        for mod in mods:
            mod.eval()
        try:
            with torch.no_grad(), _forked_rng(self.device, seed):
                yield
        finally:
            for m, was in flags:
                m.train(was)

    def autocast(self):
        """bf16 autocast on CUDA when ``train.precision: bf16``; a no-op otherwise."""
        on = self.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # ------------------------------------------------------------------ data parallel
    def sync_from_rank0(self) -> None:
        """Every data-parallel rank starts from rank 0's parameters and buffers."""
        if not distributed():
            return
        for mod in self.networks().values():
            for t in list(mod.parameters()) + list(mod.buffers()):
                dist.broadcast(t.data, 0)

    @staticmethod
    def average_gradients(*modules: nn.Module) -> None:
        """Data-parallel gradient averaging in one flat all-reduce (gloo on CPU, NCCL on GPU).

        By hand rather than DistributedDataParallel: families call their networks several times
        before one backward (a GAN's D on real, then fake), which DDP's reducer rejects.
        """
        if not distributed():
            return
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    def all_finite(self, losses: dict[str, float]) -> bool:
        """Whether every rank's losses were finite this step, agreed by one all-reduced flag: a
        rank that diverges alone must not leave the others waiting in the next all-reduce."""
        ok = all(math.isfinite(v) for v in losses.values())
        if not distributed():
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0.5)

    # ------------------------------------------------------------------ optional hooks
    def pictures(self, out_dir: str, step: int, seed: int) -> list[str]:
        """Family pictures written at an evaluation (PNG paths); none by default."""
        return []


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Exponential moving average of trained weights; everything not trained by gradients
    (buffers, no-grad parameters such as a momentum encoder or a memory) is copied."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            if p.requires_grad:
                pe.lerp_(p, 1.0 - decay)
            else:
                pe.copy_(p)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)

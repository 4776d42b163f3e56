"""Evaluate a generator: FID/KID (or fd_/kd_randcnn), memorisation, pictures. Deterministic and cheap.

The trial loop builds one :class:`Evaluator` per trial and calls it every ``eval.every`` steps:

>>> ev = Evaluator(cfg["eval"], real_images, storage="s3://bucket/sweep", device="cuda", out_dir="out")  # doctest: +SKIP
>>> metrics, artifacts = ev.evaluate(family, step=1000)     # a model family, or any fn(n, seed) -> images  # doctest: +SKIP
>>> metrics                                                                                           # doctest: +SKIP
{'fid': 41.2, 'fid_se': 0.21, 'fid_split/0': 43.0, ..., 'kid': 0.031, 'kid_se': 0.002, ..., 'memorized_frac': 0.0}

What makes it cheap:

- The reference side (training-set features, mean, covariance, its square root, the
  memorisation calibration) is computed once per (image content, image size, extractor and its
  weights, mode, pipeline version) and stored as ``<storage>/reference_stats/<key>.npz``; every
  later evaluation, in any trial or process, only loads it (``ev.real_feature_calls`` stays 0).
- Generated images never touch the disk: generator -> uint8 (as a PNG would hold them) ->
  clean-fid's resize -> extractor, batch by batch.
- The Frechet distance reuses a cached factor of sigma_ref (see :mod:`sweeper.eval.distances`).

What makes it deterministic:

- Common random numbers without a bank: batch ``b`` of every evaluation is
  ``family.sample(batch_size, seed=batch_seed(eval.seed, b))``; the family draws its own noise
  (latent vectors, image-shaped noise, memory addresses) from that seed, so every trial and every
  evaluation sees the same noise (differences between trials are far less noisy), and only one
  batch of noise exists at a time (an image-shaped bank of 5000 at 256 px would be ~3.9 GB).
- Metrics come from the registry (:mod:`sweeper.eval.registry`): each is one function over an
  :class:`EvalContext` in which the features and distances are computed once.
- Sampling runs in eval mode, under ``torch.random.fork_rng()`` re-seeded with ``eval.seed``, so
  noise-injection layers draw the same noise every time and the training RNG stream is untouched.
  Each module's train/eval flag is restored afterwards.
- KID subsets come from a generator seeded with ``eval.seed``.

What it says about its own noise: every distance comes with ``<name>_se`` from ``eval.se_splits``
disjoint splits of the same features, and the split values, which pair up across trials
(:mod:`sweeper.eval.uncertainty`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from sweeper.store import storage as store
from sweeper.errors import SweeperError
from sweeper.eval.features import FeatureExtractor, build_extractor, quantize
from sweeper.eval.memorization import NearestTrainingImages, leave_one_out_distances, memorization_threshold
from sweeper.eval.distances import ReferenceGaussian
from sweeper.eval import pictures
from sweeper.eval.context import EVAL_DEFAULTS, EvalContext, batch_seed
from sweeper.eval.registry import MetricEntry, metrics_for
from sweeper.eval.sample_types import thumbnails

# Bump when the cached file's layout or anything computed into it (e.g. the LOO calibration) changes.
REFERENCE_STATS_VERSION = 1
CACHE_FOLDER = "reference_stats"
NEAREST_ROWS = 6  # generated samples shown beside their nearest training images (registry.NEAREST_K)
THUMBNAIL_METRICS = ("sample_types", "diversity")  # metrics that read every sample's thumbnail (ctx.gen_thumbs)


# ---------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    """Everything an evaluation needs from the training set, as cached in storage."""

    key: str
    feats: np.ndarray  # (N, d) float32: KID and nearest neighbours
    gaussian: ReferenceGaussian  # mu, sigma, a factor of sigma, tr(sigma): the Frechet distance
    loo_distances: np.ndarray  # leave-one-out NN distances: the memorisation threshold
    meta: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict, repr=False)  # training-side values metrics keep (not stored)

    @property
    def memorization_threshold(self) -> float:
        return memorization_threshold(self.loo_distances)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            feats=self.feats,
            mu=self.gaussian.mu,
            sigma=self.gaussian.sigma,
            sigma_root=self.gaussian.root,
            loo_distances=self.loo_distances,
            meta=np.frombuffer(json.dumps({**self.meta, "key": self.key}).encode(), dtype=np.uint8),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ReferenceStats":
        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(z["meta"].tobytes().decode())
        sigma = z["sigma"]
        gauss = ReferenceGaussian(z["mu"], sigma, z["sigma_root"], float(np.trace(sigma)))
        return cls(meta.pop("key"), z["feats"], gauss, z["loo_distances"], meta)


def reference_key(real_images: torch.Tensor, extractor: FeatureExtractor) -> tuple[str, dict[str, Any]]:
    """sha256 over the image bytes, their shape, and everything else that changes the features."""
    images = real_images.detach().cpu().contiguous()
    ident = {
        "shape": list(images.shape),
        "dtype": str(images.dtype),
        "stats_version": REFERENCE_STATS_VERSION,
        **extractor.pipeline_identity(),
    }
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    h.update(images.numpy().data)  # the buffer itself: no copy of a large training set
    return h.hexdigest()[:32], ident


def compute_reference_stats(real_images: torch.Tensor, extractor: FeatureExtractor, key: str, meta: dict) -> ReferenceStats:
    feats = extractor(real_images)
    loo = leave_one_out_distances(feats, seed=0, device=extractor.device)
    return ReferenceStats(key, feats, ReferenceGaussian.from_features(feats), loo, meta)


def sampler_of(model: Any) -> Callable[[int, int], torch.Tensor]:
    """``model.sample`` (a family), or ``model`` itself when it is a plain ``fn(n, seed)``."""
    fn = getattr(model, "sample", None)
    if callable(fn):
        return fn
    if callable(model):
        return model
    raise ValueError(f"{type(model).__name__} has no sample(n, seed); pass a model family or a sample function")


# ---------------------------------------------------------------------------- the evaluator
class Evaluator:
    """FID/KID, memorisation, the registered metrics and pictures for one trial; see the module
    docstring.

    ``eval_cfg``: the ``eval:`` section of a run config (missing keys take ``EVAL_DEFAULTS``).
    ``real_images``: uint8 (N, 3, S, S), the training set as the model sees it.
    ``storage``: a local folder or ``s3://bucket/prefix``; the cache goes to ``<storage>/reference_stats/``.
    ``out_dir``: a local folder for the PNGs.
    """

    def __init__(
        self,
        eval_cfg: dict[str, Any],
        real_images: torch.Tensor,
        storage: str,
        device: str | torch.device = "cpu",
        out_dir: str = ".",
        heldout_images: torch.Tensor | None = None,
    ):
        self.heldout_images = heldout_images
        self.cfg = {**EVAL_DEFAULTS, **(eval_cfg or {})}
        if not isinstance(real_images, torch.Tensor) or real_images.dtype != torch.uint8 or real_images.ndim != 4 \
                or real_images.shape[1] != 3:
            got = f"{real_images.dtype} {tuple(real_images.shape)}" if isinstance(real_images, torch.Tensor) else type(real_images).__name__
            raise ValueError(f"real_images must be a uint8 tensor (N, 3, S, S), got {got}")
        if len(real_images) < 2:
            raise SweeperError(f"data: {len(real_images)} training image(s); FID, KID and memorisation need at least 2")
        self.real_images = real_images.cpu()
        self.storage = storage
        self.device = torch.device(device)
        self.out_dir = out_dir
        self.seed = int(self.cfg["seed"])
        self.n_gen = int(self.cfg["n_gen"])
        self.batch_size = int(self.cfg["batch_size"])
        self.extractor = build_extractor(
            self.cfg["features"], self.cfg["mode"], self.device, self.cfg["inception_weights"], self.batch_size
        )
        self.real_feature_calls = 0  # real-image feature extractions run by this evaluator (0 on a warm cache)
        self.last_timings: dict[str, float] = {}
        self._reference: ReferenceStats | None = None
        self._key: tuple[str, dict[str, Any]] | None = None

    # -- reference side
    def _reference_key(self) -> tuple[str, dict[str, Any]]:
        if self._key is None:  # hashing the images once: a large training set takes seconds
            self._key = reference_key(self.real_images, self.extractor)
        return self._key

    @property
    def cache_uri(self) -> str:
        """Where this training set's reference statistics live: ``<storage>/reference_stats/<key>.npz``."""
        return store.join(self.storage, CACHE_FOLDER, f"{self._reference_key()[0]}.npz")

    def reference(self) -> ReferenceStats:
        """Load the cached reference statistics, computing and storing them on a miss.

        The sweep driver may call this once before starting trials so that no trial pays for it.
        """
        if self._reference is not None:
            return self._reference
        key, ident = self._reference_key()
        uri = self.cache_uri
        if store.exists(uri):
            try:
                ref = ReferenceStats.from_bytes(store.read_bytes(uri))
                if ref.key == key:
                    self._reference = ref
                    return ref
            except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
                pass  # a damaged entry (e.g. a copy cut short): recompute and overwrite it
        self.real_feature_calls += 1
        ref = compute_reference_stats(self.real_images, self.extractor, key, {**ident, "n_images": len(self.real_images)})
        store.write_bytes(uri, ref.to_bytes())
        self._reference = ref
        return ref

    # -- generated side
    @contextlib.contextmanager
    def _seeded_rng(self, seed: int) -> Iterator[None]:
        """torch.random.fork_rng() + manual_seed(eval.seed), for the CPU and the evaluation GPU only:
        noise layers draw the same noise every evaluation, and every other RNG stream is left as it was
        (a plain torch.manual_seed would also reseed GPUs that fork_rng did not save)."""
        cuda = self.device.type == "cuda"
        idx = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else 0
        with torch.random.fork_rng(devices=[idx] if cuda else [], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(idx):
                    torch.cuda.manual_seed(seed)
            yield

    @contextlib.contextmanager
    def _modes_kept(self, model: Any) -> Iterator[None]:
        """Whatever a sampler does to train/eval flags, the model comes back as it was."""
        nets = model.networks().values() if hasattr(model, "networks") else \
            ([model] if isinstance(model, nn.Module) else [])
        flags = [(m, m.training) for net in nets for m in net.modules()]
        try:
            yield
        finally:
            for m, was in flags:
                m.train(was)

    def evaluate(self, model: Any, step: int, seed: int | None = None) -> tuple[dict[str, float], list[str]]:
        """Every registered metric that applies (``eval.metrics`` picks) and the PNGs written.

        ``model``: a model family (its ``sample(n, seed)``, optional ``cluster_assignments`` and
        ``pictures`` hooks, and its own registered metrics are used) or a plain ``fn(n, seed)``.
        ``seed``: another latent bank than ``eval.seed``'s (``sweeper best --reeval``).
        While the family's ``generation_ready`` is False nothing is sampled and only the metrics
        registered with ``generation=False`` run: no generation objective exists before then.
        """
        seed = self.seed if seed is None else int(seed)
        t_start = time.perf_counter()
        self.last_timings = timings = {k: 0.0 for k in ("reference", "generate", "features", "nearest", "metrics", "pictures")}
        t = time.perf_counter()
        ref = self.reference()
        timings["reference"] = time.perf_counter() - t
        family = getattr(model, "family_name", None) or None
        ready = bool(getattr(model, "generation_ready", True))
        chosen = [m for m in metrics_for(family, self.cfg.get("metrics")) if ready or not m.generation]
        memorize = ready and bool(self.cfg["memorization"]) and any(m.name == "memorization" for m in chosen)
        with self._modes_kept(model), torch.no_grad(), self._seeded_rng(seed):
            ctx = EvalContext(
                model=model, family=family, step=step, seed=seed, cfg=self.cfg, device=self.device,
                real_images=self.real_images, ref=ref, fd_name=self.extractor.metric_names[0],
                kd_name=self.extractor.metric_names[1], gen_feats=np.empty((0, ref.feats.shape[1]), np.float32),
                grid=torch.empty(0), nn_dist=None, closest=[], index=None, out_dir=self.out_dir,
                heldout_images=self.heldout_images, extractor=self.extractor, generation=ready,
            )
            if ready:
                self._generate(ctx, sampler_of(model), memorize, any(m.name in THUMBNAIL_METRICS for m in chosen))
            self._pictures(ctx, model)
            metrics = self._metrics(ctx, chosen)
        timings["total"] = time.perf_counter() - t_start
        return metrics, ctx.artifacts

    def _generate(self, ctx: EvalContext, sample: Callable[[int, int], torch.Tensor], memorize: bool,
                  keep_thumbs: bool) -> None:
        """One pass over the latent bank: features of every sample, the grid, every sample's
        thumbnail (<= 64 px, 12 KB: the sample-type pictures need no re-sampling) and, with
        ``memorize``, each sample's nearest training image (only the closest few images kept)."""
        timings, grid_n = self.last_timings, max(0, min(int(self.cfg["grid_size"]), self.n_gen))
        index = NearestTrainingImages(ctx.ref.feats, self.device) if memorize else None
        feats, nn_dist, grid, thumbs = [], [], [], []
        closest: list[tuple[float, int, torch.Tensor, np.ndarray]] = []  # (dist, index, image, feature)
        for b, start in enumerate(range(0, self.n_gen, self.batch_size)):
            n = min(self.batch_size, self.n_gen - start)
            t = time.perf_counter()
            out = sample(n, batch_seed(ctx.seed, b))
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[:2] != (n, 3):
                raise ValueError(f"sample({n}, seed) must return ({n}, 3, S, S) images, got {getattr(out, 'shape', type(out))}")
            u8 = quantize(out).cpu()
            timings["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            f = self.extractor(u8)
            timings["features"] += time.perf_counter() - t
            feats.append(f)
            if sum(len(g) for g in grid) < grid_n:
                grid.append(u8)
            if keep_thumbs:
                thumbs.append(thumbnails(u8))
            if memorize:
                t = time.perf_counter()
                d, _ = index.query(f, k=1)
                nn_dist.append(d[:, 0])
                closest.extend((float(d[i, 0]), start + i, u8[i], f[i]) for i in range(len(u8)))
                closest = sorted(closest, key=lambda c: (c[0], c[1]))[:NEAREST_ROWS]  # memory O(rows)
                timings["nearest"] += time.perf_counter() - t
        ctx.gen_feats = np.concatenate(feats)
        ctx.grid = torch.cat(grid)[:grid_n] if grid else torch.empty(0)
        ctx.gen_thumbs = torch.cat(thumbs) if thumbs else None
        ctx.nn_dist, ctx.closest, ctx.index = (np.concatenate(nn_dist), closest, index) if memorize else (None, [], None)

    def _pictures(self, ctx: EvalContext, model: Any) -> None:
        """The sample grid (when there are samples) and the family's own pictures."""
        t = time.perf_counter()
        if len(ctx.grid):
            ctx.add_artifact(pictures.save_grid(ctx.grid, ctx.path("samples")))
        hook = getattr(model, "pictures", None)
        if callable(hook):
            os.makedirs(self.out_dir, exist_ok=True)
            ctx.artifacts.extend(hook(self.out_dir, ctx.step, ctx.seed))
        self.last_timings["pictures"] += time.perf_counter() - t

    def _metrics(self, ctx: EvalContext, chosen: list[MetricEntry]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for entry in chosen:
            t = time.perf_counter()
            metrics.update(entry.fn(ctx))
            self.last_timings[entry.name] = time.perf_counter() - t
        return metrics

"""Evaluate a generator: FID/KID (or fd_/kd_randcnn), memorisation, pictures. Deterministic and cheap.

The trial loop builds one :class:`Evaluator` per trial and calls it every ``eval.every`` steps:

>>> ev = Evaluator(cfg["eval"], real_images, storage="s3://bucket/sweep", device="cuda", out_dir="out")  # doctest: +SKIP
>>> metrics, artifacts = ev.evaluate(model.generator_ema, step=1000)                                  # doctest: +SKIP
>>> metrics                                                                                           # doctest: +SKIP
{'fid': 41.2, 'kid': 0.031, 'memorized_frac': 0.0, 'nn_dist_median': 17.9}

What makes it cheap:

- The reference side (training-set features, mean, covariance, its square root, the
  memorisation calibration) is computed once per (image content, image size, extractor and its
  weights, mode, pipeline version) and stored as ``<storage>/reference_stats/<key>.npz``; every
  later evaluation, in any trial or process, only loads it (``ev.real_feature_calls`` stays 0).
- Generated images never touch the disk: generator -> uint8 (as a PNG would hold them) ->
  clean-fid's resize -> extractor, batch by batch.
- The Frechet distance reuses a cached factor of sigma_ref (see :mod:`sweeper.metrics`).

What makes it deterministic:

- One latent bank per sweep: ``z = randn(n_gen, z_dim)`` from a ``torch.Generator`` seeded with
  ``eval.seed``; every trial and every evaluation sees the same z (common random numbers make
  differences between trials far less noisy).
- Sampling runs in eval mode, under ``torch.random.fork_rng()`` re-seeded with ``eval.seed``, so
  noise-injection layers draw the same noise every time and the training RNG stream is untouched.
  Each module's train/eval flag is restored afterwards.
- KID subsets come from a generator seeded with ``eval.seed``.
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
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from sweeper import storage as store
from sweeper.errors import SweeperError
from sweeper.features import FeatureExtractor, build_extractor, quantize
from sweeper.memorization import (
    NearestTrainingImages,
    leave_one_out_distances,
    memorization_metrics,
    memorization_threshold,
)
from sweeper.metrics import ReferenceGaussian, frechet_to_reference, kernel_distance
from sweeper import pictures

# Bump when the cached file's layout or anything computed into it (e.g. the LOO calibration) changes.
REFERENCE_STATS_VERSION = 1
CACHE_FOLDER = "reference_stats"
NEAREST_ROWS = 6  # generated samples shown beside their 3 nearest training images
NEAREST_K = 3
CLUSTER_MAP_SAMPLES = 8


# ---------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    """Everything an evaluation needs from the training set, as cached in storage."""

    key: str
    feats: np.ndarray  # (N, d) float32: KID and nearest neighbours
    gaussian: ReferenceGaussian  # mu, sigma, a factor of sigma, tr(sigma): the Frechet distance
    loo_distances: np.ndarray  # leave-one-out NN distances: the memorisation threshold
    meta: dict[str, Any] = field(default_factory=dict)

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


# ---------------------------------------------------------------------------- the evaluator
def latent_bank(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """The sweep's fixed latents: the same (n, z_dim) tensor on every machine for the same seed."""
    return torch.randn((n, z_dim), generator=torch.Generator().manual_seed(seed))


class Evaluator:
    """FID/KID, memorisation and pictures for one trial; see the module docstring.

    ``eval_cfg``: the ``eval:`` section of a run config (missing keys take ``DEFAULTS["eval"]``).
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
    ):
        from sweeper.config import DEFAULTS

        self.cfg = {**DEFAULTS["eval"], **(eval_cfg or {})}
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
        self._bank: torch.Tensor | None = None
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
    def latent_bank(self, z_dim: int) -> torch.Tensor:
        if self._bank is None or self._bank.shape[1] != z_dim:
            self._bank = latent_bank(self.n_gen, z_dim, self.seed)
        return self._bank

    @contextlib.contextmanager
    def _seeded_rng(self) -> Iterator[None]:
        """torch.random.fork_rng() + manual_seed(eval.seed), for the CPU and the evaluation GPU only:
        noise layers draw the same noise every evaluation, and every other RNG stream is left as it was
        (a plain torch.manual_seed would also reseed GPUs that fork_rng did not save)."""
        cuda = self.device.type == "cuda"
        idx = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else 0
        with torch.random.fork_rng(devices=[idx] if cuda else [], device_type="cuda"):
            torch.default_generator.manual_seed(self.seed)
            if cuda:
                with torch.cuda.device(idx):
                    torch.cuda.manual_seed(self.seed)
            yield

    def evaluate(self, generator: nn.Module, step: int) -> tuple[dict[str, float], list[str]]:
        """Metrics (``fid``/``kid`` or ``fd_<x>``/``kd_<x>``, ``memorized_frac``, ``nn_dist_median``,
        ``cluster_perplexity`` for models with memory clusters) and the paths of the PNGs written."""
        t_start = time.perf_counter()
        timings = {"reference": 0.0, "generate": 0.0, "features": 0.0, "nearest": 0.0, "metrics": 0.0, "pictures": 0.0}
        t = time.perf_counter()
        ref = self.reference()
        timings["reference"] = time.perf_counter() - t
        wrapped = isinstance(generator, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        core = generator.module if wrapped else generator  # z_dim and cluster_assignments live on the model
        z_dim = getattr(core, "z_dim", None)
        if z_dim is None:
            raise ValueError(f"{type(generator).__name__} has no attribute z_dim; the evaluator needs the latent width")
        bank = self.latent_bank(int(z_dim))
        memorize = bool(self.cfg["memorization"])
        grid_n = max(0, min(int(self.cfg["grid_size"]), self.n_gen))

        index = NearestTrainingImages(ref.feats, self.device) if memorize else None
        feats, nn_dist, grid = [], [], []
        closest: list[tuple[float, int, torch.Tensor, np.ndarray]] = []  # (dist, index, image, feature)
        modes = {m: m.training for m in generator.modules()}
        generator.eval()
        try:
            with torch.no_grad(), self._seeded_rng():
                for start in range(0, self.n_gen, self.batch_size):
                    t = time.perf_counter()
                    out = generator(bank[start : start + self.batch_size].to(self.device))
                    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[1] != 3:
                        raise ValueError(f"generator(z) must return (n, 3, S, S) images, got {getattr(out, 'shape', type(out))}")
                    u8 = quantize(out).cpu()
                    timings["generate"] += time.perf_counter() - t
                    t = time.perf_counter()
                    f = self.extractor(u8)
                    timings["features"] += time.perf_counter() - t
                    feats.append(f)
                    if len(grid) * self.batch_size < grid_n:
                        grid.append(u8)
                    if memorize:
                        t = time.perf_counter()
                        d, _ = index.query(f, k=1)
                        nn_dist.append(d[:, 0])
                        # Keep only the few closest samples' images: memory stays O(rows) for any n_gen.
                        closest.extend((float(d[i, 0]), start + i, u8[i], f[i]) for i in range(len(u8)))
                        closest = sorted(closest, key=lambda c: (c[0], c[1]))[:NEAREST_ROWS]
                        timings["nearest"] += time.perf_counter() - t
            t = time.perf_counter()
            clusters = self._cluster_assignments(core, bank)
            timings["pictures"] += time.perf_counter() - t
        finally:
            for m, was_training in modes.items():
                m.train(was_training)

        t = time.perf_counter()
        all_feats = np.concatenate(feats)
        fd_name, kd_name = self.extractor.metric_names
        metrics = {
            fd_name: frechet_to_reference(all_feats, ref.gaussian, device=self.device),
            kd_name: kernel_distance(all_feats, ref.feats, int(self.cfg["kid_subsets"]), seed=self.seed, device=self.device),
        }
        if memorize:
            metrics.update(memorization_metrics(np.concatenate(nn_dist), ref.memorization_threshold))
        if clusters is not None:
            usage = pictures.cluster_usage(clusters[1], clusters[2])
            p = usage[usage > 0]
            metrics["cluster_perplexity"] = float(np.exp(-(p * np.log(p)).sum()))  # effective clusters in use
        timings["metrics"] = time.perf_counter() - t

        t = time.perf_counter()
        artifacts = []
        if grid_n:
            artifacts.append(pictures.save_grid(torch.cat(grid)[:grid_n], self._path("samples", step)))
        if memorize and closest:
            rows_feats = np.stack([c[3] for c in closest])
            d3, i3 = index.query(rows_feats, k=NEAREST_K)
            artifacts.append(pictures.save_nearest(
                torch.stack([c[2] for c in closest]), self.real_images, i3, d3, ref.memorization_threshold,
                self._path("nearest", step),
            ))
        if clusters is not None:
            images, assign, n_clusters = clusters
            k = min(CLUSTER_MAP_SAMPLES, len(images))
            artifacts.append(pictures.save_cluster_map(images[:k], assign[:k], n_clusters, self._path("clusters", step)))
            artifacts.append(pictures.save_cluster_histogram(assign, n_clusters, self._path("cluster_usage", step)))
        timings["pictures"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        self.last_timings = timings
        return metrics, artifacts

    def _cluster_assignments(self, generator: nn.Module, bank: torch.Tensor):
        """(uint8 images, assign, n_clusters) over the grid's latents, or None for models without clusters."""
        fn = getattr(generator, "cluster_assignments", None)
        if fn is None:
            return None
        n = max(CLUSTER_MAP_SAMPLES, min(int(self.cfg["grid_size"]), self.n_gen))
        images, assigns, n_clusters = [], [], None
        with torch.no_grad(), self._seeded_rng():
            for start in range(0, min(n, self.n_gen), self.batch_size):
                got = fn(bank[start : min(start + self.batch_size, n)].to(self.device))
                if got is None:
                    return None
                img, assign, n_clusters = got
                images.append(quantize(img).cpu())
                assigns.append(assign.cpu().long())
        return torch.cat(images), torch.cat(assigns), int(n_clusters)

    def _path(self, what: str, step: int) -> str:
        return os.path.join(self.out_dir, f"{what}_{int(step):07d}.png")

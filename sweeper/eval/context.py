"""What one evaluation computes once, for every registered metric to read; the evaluation's
defaults; and the noise seed of each evaluation batch (common random numbers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

# The eval: section of a run config (sweeper.config.run_config takes it from here).
EVAL_DEFAULTS: dict[str, Any] = {
    "every": 500,  # evaluate (and checkpoint) every this many steps and at the end
    "n_gen": 5000,
    "batch_size": 50,
    "features": "inception",  # inception | randcnn
    "mode": "clean",  # clean | legacy_pytorch | legacy_tensorflow
    "inception_weights": None,  # local inception-2015-12-05.pt; env SWEEPER_INCEPTION_WEIGHTS
    "kid_subsets": 100,
    "memorization": True,
    "grid_size": 64,
    "seed": 1234,  # sampling noise and KID subsets: the same for every trial of a sweep
    "se_splits": 8,  # standard errors from this many disjoint splits of the samples; 0: none
    "metrics": None,  # null: every registered metric that applies to the family; or a list of names
    "sample_space": "features",  # sample types' distances: features (the evaluation's) | pixels (<= 64 px)
    "prdc_k": 5,  # k of the k-nearest-neighbour balls of precision / recall / density / coverage (Naeem et al.)
}


def batch_seed(seed: int, index: int) -> int:
    """The noise seed of evaluation batch ``index``: every trial and every evaluation of a sweep
    draws batch ``index`` from the same seed (common random numbers), and only one batch of
    noise exists at a time, whatever shape the family's noise has."""
    return (int(seed) * 1_000_003 + int(index) * 7_919) % (2**63 - 1)


def latent_bank(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """A fixed (n, z_dim) latent tensor for a seed; tests and benchmarks that need one use this."""
    return torch.randn((n, z_dim), generator=torch.Generator().manual_seed(seed))


@dataclass
class EvalContext:
    """What one evaluation computed once, for every registered metric to read.

    Before a family's samples are generations (``family.generation_ready`` False, e.g. a VQ-VAE
    before its prior has learned) nothing is sampled: ``generation`` is False, ``gen_feats`` has
    no rows and ``grid`` is empty, and only metrics registered with ``generation=False`` run.
    """

    model: Any  # the family (or a sample function)
    family: str | None
    step: int
    seed: int
    cfg: dict[str, Any]
    device: torch.device
    real_images: torch.Tensor  # uint8 (N, 3, S, S)
    ref: Any  # sweeper.eval.evaluator.ReferenceStats
    fd_name: str
    kd_name: str
    gen_feats: np.ndarray  # (n_gen, d)
    grid: torch.Tensor  # uint8, the first grid_size samples
    nn_dist: np.ndarray | None  # distance of each sample to its nearest training image (features)
    closest: list  # (distance, index, uint8 image, feature) of the samples nearest the training set
    index: Any  # sweeper.eval.memorization.NearestTrainingImages | None
    out_dir: str
    gen_thumbs: torch.Tensor | None = None  # uint8 (n_gen, 3, <=64, <=64) when a metric of THUMBNAIL_METRICS runs
    artifacts: list[str] = field(default_factory=list)
    heldout_images: torch.Tensor | None = None  # uint8 images data.subset left out of training, if any
    extractor: Any = None  # the evaluation's sweeper.eval.features.FeatureExtractor (uint8 -> features)
    generation: bool = True  # False: the family's samples are not generations yet (nothing sampled)

    def path(self, what: str) -> str:
        """``<out_dir>/<what>_<step>.png``: the file name prefix is the picture's name."""
        return os.path.join(self.out_dir, f"{what}_{int(self.step):07d}.png")

    def add_artifact(self, path: str) -> None:
        self.artifacts.append(path)

    def batches(self, n: int) -> Iterator[tuple[int, int]]:
        """(batch index, size) of the evaluation's batching for ``n`` samples: a metric that
        samples again (cluster maps) sees the same noise as the main pass."""
        for b, start in enumerate(range(0, n, int(self.cfg["batch_size"]))):
            yield b, min(int(self.cfg["batch_size"]), n - start)

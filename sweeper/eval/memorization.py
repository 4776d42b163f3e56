"""How many generated samples are near-copies of a training image.

With 100 training images a generator can win on FID by reproducing them, so every evaluation also
reports, in the same feature space as FID/KID:

- ``nn_dist_median``: the median over generated samples of the Euclidean distance to the nearest
  training image;
- ``memorized_frac``: the fraction of generated samples closer to a training image than a
  threshold calibrated on the training set itself (:func:`memorization_threshold`).

The threshold rule (what the README quotes):

    For every training image, its leave-one-out nearest-neighbour distance d_i is the distance to
    the closest *other* training image (computed for every image, or for a seeded random 2000 of
    them against the whole set when the set is larger). The threshold is

        tau = 1.0 * quantile_0.05(d_i)

    and a generated sample counts as memorised when its nearest-training-image distance is < tau.

Why this rule: a fresh sample from the data distribution is about as far from its nearest training
image as a training image is from its nearest other training image, so it falls below the
q-quantile of d_i with probability about q. The rule is therefore calibrated: a generator that
produces genuinely new images scores memorized_frac ~ 0.05, and values well above 0.05 mean
copying. q = 0.05 rather than the minimum keeps one or two near-duplicate pairs inside the
training set from pulling tau to zero (with 100 images it is the 5th-smallest d_i). Factor 1.0:
features of natural images are high-dimensional, their NN distances concentrate (Inception, LFW
faces: 5 %-quantile 0.91 x the median), so any factor much below 1 would only catch exact copies.
Measured (tests' data: 50 LFW faces as training set, 50 other faces as "new"; Inception / randcnn
features), fraction flagged: new faces 6 % / 0 %; training faces blurred 78 % / 34 %, shifted by
1 px 94 % / 60 %, brightened 100 % / 2 %, exact copies 100 % / 100 %; non-faces and noise 0 %.
(Per-pixel noise on a 32 px image is a new texture to Inception after the upscale to 299: such
"copies" are not flagged there, but are in randcnn space.) The rule is scale-free: no constant
depends on the extractor. randcnn's pooled features tell individual faces apart less well, so judge
memorisation on Inception features when it matters.

>>> loo = leave_one_out_distances(feats_real)          # doctest: +SKIP
>>> tau = memorization_threshold(loo)                  # doctest: +SKIP
>>> d, idx = NearestTrainingImages(feats_real).query(feats_fake, k=1)   # doctest: +SKIP
>>> memorization_metrics(d[:, 0], tau)                 # doctest: +SKIP
{'memorized_frac': 0.02, 'nn_dist_median': 41.3}
"""

from __future__ import annotations

import numpy as np
import torch

QUANTILE = 0.05
FACTOR = 1.0
MAX_CALIBRATION_QUERIES = 2000  # LOO queries against the whole set; ~100 below a 5 % quantile


class NearestTrainingImages:
    """Exact Euclidean nearest-neighbour search over the training features, kept on ``device``.

    float64 throughout, so an exact copy comes out at ~1e-8 of the feature norm, not float32 noise.
    Build it once per evaluation; query it batch by batch.

    >>> index = NearestTrainingImages(feats_real)                # doctest: +SKIP
    >>> dist, idx = index.query(feats_fake_batch, k=3)           # (n, 3) each, nearest first
    """

    def __init__(self, refs: np.ndarray, device: str | torch.device = "cpu"):
        self.refs = torch.from_numpy(np.asarray(refs, dtype=np.float64)).to(device)
        self.sq_norms = (self.refs * self.refs).sum(dim=1)
        self.device = device

    def query(self, queries: np.ndarray, k: int = 1, exclude: np.ndarray | None = None,
              chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Distances (n, k) and indices (n, k); ``exclude[i]`` is a ref index query i may not match."""
        k = min(k, len(self.refs) - (1 if exclude is not None else 0))
        dists, idxs = [], []
        for start in range(0, len(queries), chunk):
            q = torch.from_numpy(np.asarray(queries[start : start + chunk], dtype=np.float64)).to(self.device)
            d2 = (q * q).sum(dim=1, keepdim=True) + self.sq_norms[None, :] - 2 * q @ self.refs.T
            if exclude is not None:
                rows = torch.arange(len(q), device=self.device)
                cols = torch.from_numpy(np.asarray(exclude[start : start + chunk])).to(self.device)
                d2[rows, cols] = float("inf")
            val, idx = torch.topk(d2, k, dim=1, largest=False)
            dists.append(val.clamp(min=0).sqrt().cpu().numpy())
            idxs.append(idx.cpu().numpy())
        return np.concatenate(dists), np.concatenate(idxs)


def nearest_neighbours(
    queries: np.ndarray,
    refs: np.ndarray,
    k: int = 1,
    exclude: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """One-off search: distances (n, k) and indices (n, k) of each query's k nearest refs."""
    return NearestTrainingImages(refs, device).query(queries, k, exclude)


def leave_one_out_distances(feats: np.ndarray, seed: int = 0, device: str | torch.device = "cpu") -> np.ndarray:
    """Each training image's distance to its nearest other training image (at most 2000 of them)."""
    n = len(feats)
    if n < 2:
        return np.zeros(0)
    if n > MAX_CALIBRATION_QUERIES:
        query = np.sort(np.random.default_rng(seed).choice(n, MAX_CALIBRATION_QUERIES, replace=False))
    else:
        query = np.arange(n)
    d, _ = nearest_neighbours(feats[query], feats, k=1, exclude=query, device=device)
    return d[:, 0]


def memorization_threshold(loo_distances: np.ndarray, quantile: float = QUANTILE, factor: float = FACTOR) -> float:
    """tau = factor * quantile(loo_distances); see the module docstring for why."""
    if len(loo_distances) == 0:
        return 0.0
    return float(factor * np.quantile(np.asarray(loo_distances, dtype=np.float64), quantile))


def memorization_metrics(nn_dist: np.ndarray, threshold: float) -> dict[str, float]:
    """``memorized_frac`` (share of samples with NN distance < threshold) and ``nn_dist_median``."""
    nn_dist = np.asarray(nn_dist, dtype=np.float64)
    return {
        "memorized_frac": float((nn_dist < threshold).mean()),
        "nn_dist_median": float(np.median(nn_dist)),
    }

"""How varied the samples are, and how much of the data they cover: diversity and k-NN precision,
recall, density and coverage.

A generator that draws one image (a mean face) can win FID against a hundred reference images at
low resolution; these numbers say so directly. For samples F (M rows) and training images R (N
rows), as vectors in one space (the evaluation's features, or the pixels of the thumbnails):

- ``diversity``: the mean distance between two different samples over the mean distance between two
  different training images (both over every unordered pair): 1.0 as varied as the data, 0 one
  image repeated. Each mean is an average over all pairs (a U-statistic), so it does not depend on
  how many rows there are, only its noise does.
- after Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for Generative Models"), with
  ``r_i`` the distance from R_i to its k-th nearest other training image and ``s_j`` the same for
  F_j among the samples (balls are open: ``d < r``):

      precision = share of samples inside at least one training image's ball        (fidelity)
      recall    = share of training images inside at least one sample's ball         (Kynkaanniemi et al.)
      density   = mean over samples of the number of training balls holding it, / k  (1.0: like the data)
      coverage  = share of training images whose ball holds at least one sample

  The training set itself reads 1 on all five. One image repeated reads diversity 0 and recall 0
  (its ball among the samples has radius 0); its coverage is the share of training balls around
  that image (exactly 1/N with k = 1 when it is a training image).

``k = min(eval.prdc_k, N - 1, M - 1)``: a ball needs k other rows. Distances are Euclidean, in
float64 (a chunked matmul on the evaluation device), so a sample equal to a training image is at
~0 and not at float32 rounding of |a|^2 + |b|^2 - 2ab. A distance within 1e-9 (relative) of a
radius counts as on the boundary, so outside: the matmul rounds d(a, b) and d(b, a) differently, and
the k-th neighbour that sets a ball's radius must not fall inside it by rounding.

>>> prdc(train_feats, gen_feats, k=5)                       # doctest: +SKIP
{'precision': 0.91, 'recall': 0.42, 'density': 0.97, 'coverage': 0.88}
>>> diversity(gen_feats, mean_pairwise_distance(train_feats))   # doctest: +SKIP
0.83
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sweeper.eval.uncertainty import with_uncertainties

PRDC = ("precision", "recall", "density", "coverage")
CHUNK = 1024  # rows of a distance block: CHUNK x N float64 at a time
BOUNDARY = 1e-9  # within this relative distance of a ball's radius is on its boundary: outside (balls are open)


def _tensor(x: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(device)


def distance_blocks(a: np.ndarray, b: np.ndarray, device: str | torch.device = "cpu",
                    chunk: int = CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, D)`` for row blocks of ``a``: D[i, j] the Euclidean distance from a[start + i] to b[j]."""
    bt = _tensor(b, device)
    b_sq = (bt * bt).sum(1)
    for start in range(0, len(a), chunk):
        q = _tensor(a[start : start + chunk], device)
        d2 = (q * q).sum(1, keepdim=True) + b_sq[None, :] - 2 * q @ bt.T
        yield start, d2.clamp(min=0).sqrt()


def self_distances(x: np.ndarray, k: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[float, np.ndarray | None]:
    """One pass over the rows' distance matrix: the mean distance over every unordered pair of
    different rows (0.0 for one row), and with ``k`` (1 <= k < len(x)) each row's distance to its
    k-th nearest *other* row."""
    n = len(x)
    total, radii = 0.0, []
    for start, d in distance_blocks(x, x, device):
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + start] = 0.0  # a row and itself: not a pair (float rounding would leave ~1e-8)
        total += float(d.sum())
        if k is not None:
            d[rows, rows + start] = float("inf")  # a row is not its own neighbour
            radii.append(torch.kthvalue(d, k, dim=1).values.cpu().numpy())
    mean = total / (n * (n - 1)) if n >= 2 else 0.0  # every pair counted twice, from each end
    return mean, (np.concatenate(radii) if radii else np.zeros(0)) if k is not None else None


def mean_pairwise_distance(x: np.ndarray, device: str | torch.device = "cpu") -> float:
    """The mean Euclidean distance over every unordered pair of different rows (0.0 for one row)."""
    return self_distances(x, None, device)[0]


def knn_radii(x: np.ndarray, k: int, device: str | torch.device = "cpu") -> np.ndarray:
    """Each row's distance to its k-th nearest *other* row (k >= 1, k < len(x))."""
    return self_distances(x, k, device)[1]


def diversity(samples: np.ndarray, train_mean_distance: float, device: str | torch.device = "cpu") -> float:
    """Mean pairwise distance among ``samples`` over the training images' (``train_mean_distance``)."""
    return ratio(mean_pairwise_distance(samples, device), train_mean_distance)


def ratio(samples_mean: float, train_mean: float) -> float:
    return samples_mean / train_mean if train_mean > 0 else float("nan")  # identical training images: no scale


def usable_k(k: int, n_train: int, n_samples: int) -> int:
    """The k a ball can have: at most one less than the rows of either set."""
    return max(1, min(int(k), n_train - 1, n_samples - 1))


def prdc(train: np.ndarray, samples: np.ndarray, k: int, device: str | torch.device = "cpu",
         train_radii: np.ndarray | None = None, sample_radii: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage of ``samples`` against ``train`` (see the module
    docstring); ``train_radii`` / ``sample_radii``: the balls already computed for this k."""
    n, m = len(train), len(samples)
    if n < 2 or m < 2:
        return {}
    k = usable_k(k, n, m)
    r = _tensor(train_radii if train_radii is not None else knn_radii(train, k, device), device) * (1 - BOUNDARY)
    s = _tensor(sample_radii if sample_radii is not None else knn_radii(samples, k, device), device) * (1 - BOUNDARY)
    inside_any = torch.zeros(m, dtype=torch.bool, device=r.device)  # sample j in some training ball
    balls_held = torch.zeros(m, dtype=torch.float64, device=r.device)  # training balls holding sample j
    recalled = torch.zeros(n, dtype=torch.bool, device=r.device)  # training image i in some sample's ball
    nearest = torch.full((n,), float("inf"), dtype=torch.float64, device=r.device)  # i's nearest sample
    for start, d in distance_blocks(samples, train, device):  # d: (samples block, n)
        inside = d < r[None, :]
        inside_any[start : start + len(d)] = inside.any(1)
        balls_held[start : start + len(d)] = inside.sum(1).double()
        recalled |= (d < s[start : start + len(d), None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
    return {"precision": float(inside_any.double().mean()), "recall": float(recalled.double().mean()),
            "density": float(balls_held.mean() / k), "coverage": float((nearest < r).double().mean())}


def pixel_vectors(thumbs: torch.Tensor) -> np.ndarray:
    """uint8 thumbnails (n, 3, s, s) -> (n, 3 s s) float64 in [0, 1]: the pixel space of the ``_px`` metrics."""
    return thumbs.reshape(len(thumbs), -1).numpy().astype(np.float64) / 255


def spread_metrics(samples: np.ndarray, train: np.ndarray, k: int, splits: list[slice], suffix: str = "",
                   device: str | torch.device = "cpu", memo: dict | None = None) -> dict[str, float]:
    """``diversity<suffix>`` and precision / recall / density / coverage ``<suffix>`` of ``samples``
    against ``train``, each with its standard error and split values (:mod:`sweeper.eval.uncertainty`).
    ``memo``: a dict kept across evaluations of one training set (its mean distance and balls)."""
    memo = {} if memo is None else memo
    if "mean" not in memo:
        memo["mean"] = mean_pairwise_distance(train, device)

    def values(x: np.ndarray) -> dict[str, float]:
        kk = usable_k(k, len(train), len(x))
        if kk not in memo:
            memo[kk] = knn_radii(train, kk, device)
        mean, radii = self_distances(x, kk, device)
        out = {"diversity": ratio(mean, memo["mean"]), **prdc(train, x, kk, device, memo[kk], radii)}
        return {f"{name}{suffix}": v for name, v in out.items()}

    return with_uncertainties(values, samples, splits)

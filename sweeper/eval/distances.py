"""Frechet distance and kernel (KID) distance between feature sets, in float64.

Same values as clean-fid's ``frechet_distance`` and ``kernel_distance``, computed so that an
evaluation pays only for its own side:

- Frechet: ``d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``. Write each covariance
  through a factor, ``S = F^T F``. Then ``S1 S2`` has the same non-zero eigenvalues as the
  symmetric PSD matrix ``C C^T`` with ``C = F2 F1^T``, so ``tr sqrt(S1 S2)`` is the sum of square
  roots of ``eigvalsh(C C^T)`` (or of ``C^T C``, whichever is smaller): no scipy ``sqrtm`` of a
  non-symmetric product (30 s at 2048-d on two CPU cores). The reference's factor is cached with
  it: its centred features when it has fewer images than dimensions (100-shot sets with Inception:
  a 100 x 2048 factor, and each evaluation is a 100 x 100 eigenproblem), else ``sqrt(S_ref)``
  (d x d, from one eigh per sweep). The generated side uses its centred features, or its
  covariance when that is cheaper (:func:`frechet_to_reference`).
- KID: the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged
  over random subsets drawn by a seeded generator (not numpy's global RNG), so two evaluations of
  the same features give the same number.

>>> mu, sigma = feature_stats(feats_real)                               # doctest: +SKIP
>>> ref = ReferenceGaussian.from_features(feats_real)                   # doctest: +SKIP
>>> frechet_to_reference(feats_fake, ref)                               # doctest: +SKIP
>>> kernel_distance(feats_fake, feats_real, num_subsets=100, seed=1234) # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov`` convention: divide by n - 1) in float64."""
    x = np.asarray(feats, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance via eigh; round-off negatives are clipped to 0."""
    s = torch.from_numpy(np.asarray(sigma, dtype=np.float64))
    s = (s + s.T) / 2
    w, v = torch.linalg.eigh(s)
    return ((v * w.clamp(min=0).sqrt()) @ v.T).numpy()


def _trace_sqrt_psd(m: torch.Tensor) -> float:
    """tr sqrt(M) for a symmetric PSD matrix: the sum of the square roots of its eigenvalues."""
    m = (m + m.T) / 2
    return float(torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum())


def _trace_sqrt_of_factors(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """tr sqrt(S1 S2) for S1 = f1^T f1 and S2 = f2^T f2: the nuclear norm of f1 f2^T."""
    c = f1 @ f2.T
    return _trace_sqrt_psd(c @ c.T if c.shape[0] <= c.shape[1] else c.T @ c)


@dataclass
class ReferenceGaussian:
    """The reference side of the Frechet distance: mean, covariance, and a cached factor of it.

    ``root`` (r, d) satisfies ``root.T @ root == sigma``: the centred, 1/sqrt(n-1)-scaled features
    when n - 1 < d, else the symmetric square root of sigma.
    """

    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    root: np.ndarray  # (r, d)
    trace_sigma: float

    @classmethod
    def from_stats(cls, mu: np.ndarray, sigma: np.ndarray) -> "ReferenceGaussian":
        sigma = np.asarray(sigma, dtype=np.float64)
        return cls(np.asarray(mu, dtype=np.float64), sigma, sqrt_psd(sigma), float(np.trace(sigma)))

    @classmethod
    def from_features(cls, feats: np.ndarray) -> "ReferenceGaussian":
        x = np.asarray(feats, dtype=np.float64)
        n, d = x.shape
        if n - 1 >= d:
            return cls.from_stats(*feature_stats(x))
        mu, sigma = feature_stats(x)
        root = (x - mu) / np.sqrt(n - 1)
        return cls(mu, sigma, root, float(np.trace(sigma)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); clean-fid's value, via eigh.

    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
    2.0
    """
    return frechet_from_stats(mu1, sigma1, ReferenceGaussian.from_stats(mu2, sigma2))


def frechet_from_stats(mu: np.ndarray, sigma: np.ndarray, ref: ReferenceGaussian, device: str | torch.device = "cpu") -> float:
    """Frechet distance of N(mu, sigma) to a reference whose covariance factor is already known."""
    r = torch.from_numpy(ref.root).to(device)
    s = torch.from_numpy(np.asarray(sigma, dtype=np.float64)).to(device)
    diff = np.asarray(mu, dtype=np.float64) - ref.mu
    tr_covmean = _trace_sqrt_psd(r @ s @ r.T)
    return float(diff @ diff + np.trace(sigma) + ref.trace_sigma - 2 * tr_covmean)


def frechet_to_reference(feats: np.ndarray, ref: ReferenceGaussian, device: str | torch.device = "cpu") -> float:
    """Frechet distance of a feature set (n, d) to the reference Gaussian.

    Two equal routes, the cheaper one taken: the factor route (``C = root Y^T``, Y the centred
    features / sqrt(n-1); cost ~ r d n) or the covariance route (``root (Y^T Y) root^T``; ~ n d^2).
    """
    x = torch.from_numpy(np.asarray(feats, dtype=np.float64)).to(device)
    n, d = x.shape
    if n < 2:
        raise ValueError("the Frechet distance needs at least 2 samples")
    mu = x.mean(dim=0)
    y = (x - mu) / np.sqrt(n - 1)
    root = torch.from_numpy(ref.root).to(device)
    r = root.shape[0]
    lo, hi = min(r, n), max(r, n)
    cost_factor = r * d * n + lo * lo * hi + lo**3
    cost_covariance = n * d * d + 2 * r * d * d + r**3
    if cost_factor <= cost_covariance:
        tr_covmean = _trace_sqrt_of_factors(root, y)
    else:
        tr_covmean = _trace_sqrt_psd(root @ (y.T @ y) @ root.T)
    diff = mu.cpu().numpy() - ref.mu
    trace_sigma = float((y * y).sum())
    return float(diff @ diff + trace_sigma + ref.trace_sigma - 2 * tr_covmean)


def kid_subset_size(n_a: int, n_b: int, max_subset_size: int = 1000) -> int:
    return min(n_a, n_b, max_subset_size)


def kernel_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    route: str = "auto",
) -> float:
    """KID: mean over ``num_subsets`` subsets of size ``min(n_a, n_b, max_subset_size)`` of the
    unbiased MMD^2 with kernel ``(x.y/d + 1)^3``. Subsets come from ``numpy.random.default_rng(seed)``.

    When both sets have exactly the subset size every subset is the whole set, so the value equals
    clean-fid's ``kernel_distance`` whatever the random draws. ``route`` (``auto``, ``whole``,
    ``subsets``) only chooses how the same number is computed.
    """
    a = torch.from_numpy(np.asarray(feats_a, dtype=np.float64)).to(device)
    b = torch.from_numpy(np.asarray(feats_b, dtype=np.float64)).to(device)
    d = a.shape[1]
    m = kid_subset_size(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)) for _ in range(num_subsets)]

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / d + 1) ** 3

    n_all = len(a) + len(b)
    cost_whole = n_all * n_all * (d + num_subsets)  # kernels over everything, then subset sums by matmul
    cost_subsets = num_subsets * 3 * m * m * d  # kernels per subset
    whole = {"auto": cost_whole < cost_subsets and n_all <= 8000, "whole": True, "subsets": False}[route]
    if whole:
        # Sums over a subset's block of a kernel matrix K are w_i^T K w_j with 0/1 indicator rows w:
        # all subsets at once with two matmuls instead of gathering blocks one by one.
        wa = torch.zeros(num_subsets, len(a), dtype=torch.float64, device=a.device)
        wb = torch.zeros(num_subsets, len(b), dtype=torch.float64, device=b.device)
        for s, (ia, ib) in enumerate(draws):
            wa[s, torch.from_numpy(ia)] = 1
            wb[s, torch.from_numpy(ib)] = 1
        k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
        sum_aa = ((wa @ k_aa) * wa).sum(1) - wa @ k_aa.diagonal()
        sum_bb = ((wb @ k_bb) * wb).sum(1) - wb @ k_bb.diagonal()
        sum_ab = ((wa @ k_ab) * wb).sum(1)
        mmd = (sum_aa + sum_bb) / (m * (m - 1)) - 2 * sum_ab / (m * m)
        return float(mmd.mean())
    # Kernels per subset, a chunk of subsets per batched matmul: a few large ops instead of three
    # small ones per subset (the per-split KIDs of an evaluation run hundreds of small subsets).
    ia = torch.from_numpy(np.stack([d_[0] for d_ in draws])).to(a.device)
    ib = torch.from_numpy(np.stack([d_[1] for d_ in draws])).to(b.device)
    chunk = max(1, min(num_subsets, 2**22 // max(m * max(m, d), 1)))  # <= ~32 MB per float64 block
    total = 0.0
    for s in range(0, num_subsets, chunk):
        x, y = a[ia[s : s + chunk]], b[ib[s : s + chunk]]  # (c, m, d)
        kaa, kbb = (x @ x.transpose(1, 2) / d + 1) ** 3, (y @ y.transpose(1, 2) / d + 1) ** 3
        kab = (x @ y.transpose(1, 2) / d + 1) ** 3
        diag = kaa.diagonal(dim1=1, dim2=2).sum(1) + kbb.diagonal(dim1=1, dim2=2).sum(1)
        off_diag = (kaa.sum((1, 2)) + kbb.sum((1, 2)) - diag) / (m * (m - 1))
        total += float((off_diag - 2 * kab.sum((1, 2)) / (m * m)).sum())
    return total / num_subsets

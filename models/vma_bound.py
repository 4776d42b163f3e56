"""The VMA-VAE's numerics: the address posterior's similarity, the multi-sample bound and its two
gradient estimators, the discretised pixel likelihood, and the address statistics.

    bound, surrogate = vimco_surrogate(log_w, log_q_a)      # (B,), (B,): maximise surrogate.mean()
    log_px = discretized_logistic_log_prob(x, mean, log_scale).sum((1, 2, 3))   # <= 0 per pixel
    mi = address_mutual_information(log_q)                  # I(a; x) in nats over the rows of log_q

Pure functions of tensors: ``models/vma_vae.py`` wires them into the family and
``tests/test_vma_vae.py`` checks each against a literal reference or a case with a known answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
HALF_BIN = 1.0 / 255.0  # half the width of one 8-bit value on the [-1, 1] scale (u / 127.5 - 1)


def similarity(e_mem: torch.Tensor, e_query: torch.Tensor, kind: str = "normalized_inner") -> torch.Tensor:
    """Scores (Q, M) of queries (Q, e) against memory embeddings (M, e): the paper's Eq. 5
    ``<e_a, e_q> / ||e_a||`` (normalized_inner), or the two alternatives it tried."""
    dots = e_query @ e_mem.t()
    if kind == "inner":
        return dots
    scores = dots / e_mem.norm(dim=1).clamp_min(1e-6)
    if kind == "cosine":
        scores = scores / e_query.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return scores


def log_mean_exp(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return torch.logsumexp(x, dim) - math.log(x.shape[dim])


# ============================================================================ estimators
def vimco_surrogate(log_w: torch.Tensor, log_q_a: torch.Tensor, baseline: str = "geometric"):
    """``(L_K, surrogate)`` per target from K samples: log importance weights ``log_w`` (B, K)
    and the addresses' ``log q(a_k|x)`` (B, K). The surrogate's value is L_K; its gradient is
    VIMCO's estimate of grad L_K: continuous parameters get IWAE's gradient through ``log_w``,
    and each address's score ``grad log q(a_k|x)`` is weighted by its leave-one-out learning signal
    ``L_K - L_K^{-k}`` (the ``-w_k`` of the paper's Eq. 8 comes from the ``-log q(a_k|x)`` inside
    ``log_w``). ``L_K^{-k}`` replaces ``w_k`` by the geometric mean of the others (Mnih & Rezende)
    or, ``arithmetic``, is the mean of the others (the form printed in the paper's Eq. 8); both are
    independent of ``a_k``, so both estimators are unbiased.
    """
    B, K = log_w.shape
    bound = log_mean_exp(log_w)
    lw = log_w.detach()
    eye = torch.eye(K, dtype=torch.bool, device=lw.device)
    if baseline == "geometric":
        others = (lw.sum(1, keepdim=True) - lw) / (K - 1)  # mean log w of the other samples
        loo = log_mean_exp(torch.where(eye, others.unsqueeze(2), lw.unsqueeze(1)), 2)
    else:
        loo = torch.logsumexp(lw.unsqueeze(1).masked_fill(eye, -math.inf), 2) - math.log(K - 1)
    signal = bound.detach().unsqueeze(1) - loo
    return bound, bound + (signal * log_q_a).sum(1)


def score_function_surrogate(log_w: torch.Tensor, log_q_a: torch.Tensor, baseline: float | torch.Tensor = 0.0):
    """``(L_K, surrogate)`` with the plain score-function (REINFORCE) estimator: every address's
    learning signal is ``L_K - baseline``. With K = 1 and a running-mean baseline this is how the
    family trains; with a constant baseline it is the reference VIMCO's variance is measured against."""
    bound = log_mean_exp(log_w)
    signal = (bound.detach() - baseline).unsqueeze(1)
    return bound, bound + (signal * log_q_a).sum(1)


# ============================================================================ densities
def log_normal(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(u) of 8-bit values under a logistic distribution discretised to their bins (the
    pixel likelihood of PixelCNN++ and of Kingma et al.'s IAF VAE): ``x`` holds the values as
    ``u / 127.5 - 1``; P(u) is the logistic mass of [x - 1/255, x + 1/255], and the two edge bins
    take the tails (u = 0: (-inf, -1 + 1/255], u = 255: [1 - 1/255, inf)), so the 256
    probabilities sum to 1 and every log P(u) is <= 0.

    With a = (x - 1/255 - mean) / s and b = (x + 1/255 - mean) / s,
    sigmoid(b) - sigmoid(a) = (e^b - e^a) / ((1 + e^a)(1 + e^b)), so
    log P = b + log(1 - e^(a - b)) - softplus(a) - softplus(b): no cancellation in either tail or
    for a scale far wider than a bin. An edge bin's missing side is a finite stand-in (+-1e4 scales)
    that the formula turns into exactly log sigmoid(b) or log(1 - sigmoid(a)), with finite gradients."""
    inv = torch.exp(-log_scale)
    a = torch.where(x < -1 + HALF_BIN, torch.full_like(x, -1e4), (x - HALF_BIN - mean) * inv)
    b = torch.where(x > 1 - HALF_BIN, torch.full_like(x, 1e4), (x + HALF_BIN - mean) * inv)
    return b + torch.log(-torch.expm1(a - b)) - F.softplus(a) - F.softplus(b)


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    """Nats per image to bits per dimension (every channel of every pixel is a dimension)."""
    return nats_per_image / (dims * math.log(2))


# ============================================================================ address statistics
def address_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q(a|x) || p(a)) per row, exact over the memory; hidden entries (q = 0) add nothing."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(1)


def entropy(log_q: torch.Tensor) -> torch.Tensor:
    """H(q) per row in nats; entries with q = 0 add nothing."""
    q = log_q.exp()
    return torch.where(q > 0, -q * log_q, torch.zeros_like(q)).sum(1)


def address_mutual_information(log_q: torch.Tensor) -> float:
    """I(a; x) = H(mean_x q(a|x)) - mean_x H(q(a|x)) in nats, x uniform over the rows of
    ``log_q`` (n, M), one memory for all rows. 0 when q(a|x) is the same for every x; at most
    min(log M, log n). Unlike KL(q(a|x) || p(a)) it does not count a q that merely differs from
    the prior in the same way for every image: it is what the address tells about *which* image."""
    log_q = log_q.detach().double()
    q_bar = log_q.exp().mean(0, keepdim=True)
    return float(entropy(q_bar.log())[0] - entropy(log_q).mean())


def bound_summary(s: dict[str, torch.Tensor], K: int, dims: int) -> dict[str, float]:
    """What an evaluation reports from K posterior samples per image (``log_w``, ``log_px``,
    ``kl_z``: (n, K); ``log_q``, ``log_p``: (n, M)), in nats per image unless named otherwise:

    - ``nll_k<K>``: -L_K, the K-sample bound (log-mean-exp over the samples, mean over images);
      ``bpd_k<K>`` the same in bits per dimension (``dims`` = channels x pixels);
    - ``nll_k1``: -E[log w], the single-sample bound (every sample counted), which decomposes as
      ``recon_nll`` (-E log P(x|z, a)) + ``z_kl`` (E_q[log q(z|x,m_a) - log p(z|m_a)]) +
      ``address_kl`` (KL(q(a|x) || p(a)), exact over M);
    - ``address_entropy`` H(q(a|x)), ``address_mi`` I(a; x) over these images, and
      ``entries_effectively_used`` = exp(address_mi).
    """
    nll = float(-log_mean_exp(s["log_w"]).mean())
    mi = address_mutual_information(s["log_q"])
    return {f"nll_k{K}": nll, f"bpd_k{K}": bits_per_dim(nll, dims), "nll_k1": float(-s["log_w"].mean()),
            "recon_nll": float(-s["log_px"].mean()), "z_kl": float(s["kl_z"].mean()),
            "address_kl": float(address_kl(s["log_q"], s["log_p"]).mean()),
            "address_entropy": float(entropy(s["log_q"]).mean()), "address_mi": mi,
            "entries_effectively_used": math.exp(mi)}

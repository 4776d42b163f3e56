"""The VMA-VAE's networks (Bornschein et al. 2017, Sec. 4.2): the address embeddings h and h_q,
the conditional VAE q(z|x, m), p(z|m), p(x|z, m), and, with ``memory.size: 0``, the same VAE with
no memory (the paper's "baseline VAE with the same architecture, but without the top level
mixture distribution": q(z|x), p(z) = N(0, I), p(x|z)).

    net = VMANet(cfg, image_size=32)
    log_q_scores, prior_scores = net.address_scores(memory, x)      # S(m_a, x), S(m_a, e_p)
    log_px, log_pz, log_qz = net.continuous_terms(x, m, eps)         # per row, z = mu + sigma * eps
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vma_bound import discretized_logistic_log_prob, log_normal, similarity

LOG_SCALE_RANGE = (-7.0, 5.0)  # numerical guard only: the discretised likelihood penalises a tiny scale itself


def full(t: torch.Tensor) -> torch.Tensor:
    """float32 from a bf16 autocast result; float32 and float64 stay as they are (the tests run
    the networks in float64 to check the estimator to 1e-6)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rows_per_forward(device: torch.device) -> int:
    """Images per forward pass where a step or a metric has many (h on |M| entries, the metrics'
    images x samples). On a CPU, blocks of 128 stay in cache: h's cost per entry is then the same
    at |M| = 1024 as at 64, where one 1024-image batch cost twice as much per entry
    (bench/bench_vma_vae.py). A GPU takes larger blocks."""
    return 128 if device.type == "cpu" else 1024


class Pyramid(nn.Module):
    """The paper's convolutional downscaling pyramid: per level a 3x3 conv and a 3x3 stride-2
    conv, from S down to 4 x 4 (32 px: 6 layers, as the paper's 28 px Omniglot nets)."""

    def __init__(self, in_ch: int, width: int, levels: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(levels):
            self.blocks.append(nn.Sequential(
                nn.Conv2d(in_ch if i == 0 else width, width, 3, 1, 1), nn.ReLU(),
                nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(),
            ))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats  # S/2, S/4, ..., 4


def mlp_head(width: int, hidden: int, out: int) -> nn.Module:
    """The fully connected head after a pyramid: one hidden layer (the paper's)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(width * 16, hidden), nn.ReLU(), nn.Linear(hidden, out))


class Embedder(nn.Module):
    """h (memory entries) or h_q (queries): an image to a point in the matching space."""

    def __init__(self, width: int, hidden: int, embed_dim: int, levels: int):
        super().__init__()
        self.pyramid = Pyramid(3, width, levels)
        self.head = mlp_head(width, hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pyramid(x)[-1])


class Decoder(nn.Module):
    """p(x|z, m): [z, c(m)] to 4 x 4, then transposed convolutions back to S, with skip
    connections from the memory pyramid at every resolution and m itself at the last layer
    (the paper's high-bandwidth path from m to x). ``conditional=False``: z alone, no skips."""

    def __init__(self, width: int, z_dim: int, levels: int, conditional: bool = True):
        super().__init__()
        self.width, self.conditional = width, conditional
        c = 2 if conditional else 1
        self.fc = nn.Linear(c * z_dim, width * 16)
        self.ups = nn.ModuleList(nn.Sequential(
            nn.ConvTranspose2d(c * width, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
        ) for _ in range(levels))
        self.out = nn.Conv2d(width + (3 if conditional else 0), 3, 3, 1, 1)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None, skips: list[torch.Tensor] | None,
                m: torch.Tensor | None) -> torch.Tensor:
        if not self.conditional:
            h = F.relu(self.fc(z)).view(-1, self.width, 4, 4)
            for up in self.ups:
                h = up(h)
            return torch.tanh(self.out(h))
        h = F.relu(self.fc(torch.cat([z, context], 1))).view(-1, self.width, 4, 4)
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(torch.cat([h, skip], 1))
        return torch.tanh(self.out(torch.cat([h, m], 1)))


class VMANet(nn.Module):
    """Every trained piece: the addressing (h, h_q, the prior's query e_p), the conditional VAE
    (memory pyramid shared by p(z|m) and p(x|z,m), as the paper ties them; q(z|x,m); decoder;
    per-channel pixel scale) and, with ``memory.source: learned``, the memory itself. With
    ``memory.size: 0`` only q(z|x), the decoder and the pixel scale exist (a plain VAE)."""

    def __init__(self, cfg: dict[str, Any], image_size: int):
        super().__init__()
        w, hid, zd, ed = cfg["width"], cfg["hidden"], cfg["z_dim"], cfg["embed_dim"]
        levels = int(math.log2(image_size // 4))
        self.similarity = cfg["similarity"]
        self.has_memory = cfg["memory"]["size"] > 0
        self.embed_memory = self.embed_query = self.prior_query = self.memory = None
        if self.has_memory:
            self.embed_memory = Embedder(w, hid, ed, levels)  # h
            self.embed_query = Embedder(w, hid, ed, levels)  # h_q (untied from h, as in the paper)
            self.prior_query = nn.Parameter(torch.randn(ed)) if cfg["prior"] == "learned" else None  # e_p
            self.context = Pyramid(3, w, levels)
            self.prior_head = mlp_head(w, hid, 2 * zd)  # p(z|m)
            self.context_vec = nn.Sequential(nn.Flatten(), nn.Linear(w * 16, zd))  # m -> |z| for the decoder
        self.posterior = Pyramid(6 if self.has_memory else 3, w, levels)
        self.posterior_head = mlp_head(w, hid, 2 * zd)  # q(z|x, m)
        self.decoder = Decoder(w, zd, levels, conditional=self.has_memory)
        # p(x|z,m): a logistic per channel (log scale; starts at a standard deviation of 0.1),
        # discretised to the 256 values of a pixel
        self.log_scale = nn.Parameter(torch.full((1, 3, 1, 1), math.log(0.1 * math.sqrt(3) / math.pi)))
        if self.has_memory and cfg["memory"]["source"] == "learned":  # "initialise M randomly": uniform over the image range
            self.memory = nn.Parameter(torch.rand(cfg["memory"]["size"], 3, image_size, image_size) * 2 - 1)

    def addressing_parameters(self) -> list[nn.Parameter]:
        """The parameters that act on the address only (h, h_q, e_p): what VIMCO's signal trains."""
        if not self.has_memory:
            return []
        ps = list(self.embed_memory.parameters()) + list(self.embed_query.parameters())
        return ps + ([self.prior_query] if self.prior_query is not None else [])

    def embed_entries(self, memory: torch.Tensor) -> torch.Tensor:
        """e_a = h(m_a) for every entry (M, e), in blocks of rows_per_forward."""
        return full(torch.cat([self.embed_memory(m) for m in memory.split(rows_per_forward(memory.device))]))

    def address_scores(self, memory: torch.Tensor, x: torch.Tensor, e_mem: torch.Tensor | None = None):
        """S(m_a, x) (B, M) for q(a|x) and S(m_a, e_p) (M,) for the learned prior (None: flat);
        ``e_mem``: h(M) when the caller already has it (an evaluation embeds M once)."""
        e_mem = self.embed_entries(memory) if e_mem is None else e_mem
        s_q = similarity(e_mem, full(self.embed_query(x)), self.similarity)
        s_p = None if self.prior_query is None else similarity(e_mem, self.prior_query[None], self.similarity)[0]
        return s_q, s_p

    def pixel_log_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(*LOG_SCALE_RANGE)

    def prior(self, m: torch.Tensor | None, rows: int):
        """(memory pyramid features, mu, log sigma) of p(z|m); N(0, I) without a memory."""
        if m is None:
            zero = self.log_scale.new_zeros(rows, self.posterior_head[-1].out_features // 2)
            return None, zero, zero
        feats = self.context(m)
        mu, log_sigma = full(self.prior_head(feats[-1])).chunk(2, 1)
        return feats, mu, log_sigma.clamp(*LOG_SCALE_RANGE)

    def decode(self, z: torch.Tensor, feats: list[torch.Tensor] | None, m: torch.Tensor | None) -> torch.Tensor:
        context = None if m is None else self.context_vec(feats[-1])
        return full(self.decoder(z, context, feats, m))

    def continuous_terms(self, x: torch.Tensor, m: torch.Tensor | None, eps: torch.Tensor):
        """Per row: log P(x|z,m) (discretised, <= 0), log p(z|m), log q(z|x,m) at z = mu_q + sigma_q * eps."""
        feats, mu_p, ls_p = self.prior(m, len(x))
        inputs = x if m is None else torch.cat([x, m], 1)
        mu_q, ls_q = full(self.posterior_head(self.posterior(inputs)[-1])).chunk(2, 1)
        ls_q = ls_q.clamp(*LOG_SCALE_RANGE)
        z = mu_q + torch.exp(ls_q) * eps
        mean = self.decode(z, feats, m)
        log_px = discretized_logistic_log_prob(x, mean, self.pixel_log_scale()).sum((1, 2, 3)).to(mu_q.dtype)
        return log_px, log_normal(z, mu_p, ls_p).sum(1), log_normal(z, mu_q, ls_q).sum(1)

    def generate(self, m: torch.Tensor | None, z_noise: torch.Tensor, pixel_noise: torch.Tensor | None = None):
        """x for memory rows m (None: no memory): z ~ p(z|m), then the decoder mean (plus standard
        logistic ``pixel_noise`` times the pixel scale: a sample of p(x|z, m) before quantisation)."""
        feats, mu, ls = self.prior(m, len(z_noise))
        x = self.decode(mu + torch.exp(ls) * z_noise, feats, m)
        if pixel_noise is not None:
            x = x + torch.exp(self.pixel_log_scale()) * pixel_noise
        return x.clamp(-1.0, 1.0)

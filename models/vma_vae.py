"""VMA-VAE: Variational Memory Addressing in a VAE (Bornschein et al., NeurIPS 2017).

    fam = build_model({"family": "vma_vae", **VMAVAE.TINY}, image_size=32)
    losses = fam.train_step(real, step=0)  # real: (n, 3, 32, 32) in [-1, 1]
    img = fam.sample(4, seed=0)            # a ~ p(a|M), z ~ p(z|m_a), x = decoder mean

The generative model is a mixture over memory entries, p(x|M) = sum_a p(a|M) int p(z|m_a)
p(x|z, m_a) dz: sample an address, read the entry, let a conditional VAE with the entry as
context produce x. The address is a discrete latent with its own posterior q(a|x), proportional to
exp S(m_a, x), so KL(q(a|x) || p(a)) measures, in nats, how much a lookup tells the model.
Training maximises the K-sample bound L_K with VIMCO gradients for the address (Mnih & Rezende
2016); K = 1 falls back to REINFORCE with a running-mean baseline.

Memory (``memory.source``): ``learned`` is a parameter tensor of ``memory.size`` images trained by
the gradient of the bound; ``data`` holds raw training images. The family only sees minibatches,
so it keeps a pool of the distinct training images it has seen (up to mirroring, FIFO beyond
``memory.pool_size``) in its state; before each update M is a draw of ``memory.size`` pool images
that are not in the minibatch (the paper's few-shot set-up: targets disjoint from M). On the very
first step the pool holds only the batch itself, so the batch is split instead (first
min(size, B // 2) images are M, the rest, minus any duplicate of those, are targets). Sampling and
the metrics draw M from the pool with the caller's seed, so they are deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, distributed, noise, register_model
from sweeper.metric_registry import register_metric

SIMILARITIES = ("normalized_inner", "inner", "cosine")
LOG_2PI = math.log(2 * math.pi)


def rows_per_forward(device: torch.device) -> int:
    """Images per forward pass where a step or a metric has many (h on |M| entries, the metrics'
    images x samples). On a CPU, blocks of 128 stay in cache: h's cost per entry is then the same
    at |M| = 1024 as at 64, where one 1024-image batch cost twice as much per entry
    (bench/bench_vma_vae.py). A GPU takes larger blocks."""
    return 128 if device.type == "cpu" else 1024


# ============================================================================ the estimator
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
    family trains; with baseline 0 it is the high-variance reference VIMCO improves on."""
    bound = log_mean_exp(log_w)
    signal = (bound.detach() - baseline).unsqueeze(1)
    return bound, bound + (signal * log_q_a).sum(1)


def _log_normal(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mu) * torch.exp(-log_sigma)) ** 2 - log_sigma - 0.5 * LOG_2PI


# ============================================================================ networks
class _Pyramid(nn.Module):
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


def _mlp(width: int, hidden: int, out: int) -> nn.Module:
    """The fully connected head after a pyramid: one hidden layer (the paper's)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(width * 16, hidden), nn.ReLU(), nn.Linear(hidden, out))


class _Embedder(nn.Module):
    """h (memory entries) or h_q (queries): an image to a point in the matching space."""

    def __init__(self, width: int, hidden: int, embed_dim: int, levels: int):
        super().__init__()
        self.pyramid = _Pyramid(3, width, levels)
        self.head = _mlp(width, hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pyramid(x)[-1])


class _Decoder(nn.Module):
    """p(x|z, m): [z, c(m)] to 4 x 4, then transposed convolutions back to S, with skip
    connections from the memory pyramid at every resolution and m itself at the last layer
    (the paper's high-bandwidth path from m to x)."""

    def __init__(self, width: int, z_dim: int, levels: int):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(2 * z_dim, width * 16)
        self.ups = nn.ModuleList(nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
        ) for _ in range(levels))
        self.out = nn.Conv2d(width + 3, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor], m: torch.Tensor):
        h = F.relu(self.fc(torch.cat([z, context], 1))).view(-1, self.width, 4, 4)
        for up, skip in zip(self.ups, reversed(skips)):
            h = up(torch.cat([h, skip], 1))
        return torch.tanh(self.out(torch.cat([h, m], 1)))


class VMANet(nn.Module):
    """Every trained piece: the addressing (h, h_q, the prior's query e_p), the conditional VAE
    (memory pyramid shared by p(z|m) and p(x|z,m), as the paper ties them; q(z|x,m); decoder;
    per-channel pixel scale) and, with ``memory.source: learned``, the memory itself."""

    def __init__(self, cfg: dict[str, Any], image_size: int):
        super().__init__()
        w, hid, zd, ed = cfg["width"], cfg["hidden"], cfg["z_dim"], cfg["embed_dim"]
        levels = int(math.log2(image_size // 4))
        self.similarity = cfg["similarity"]
        self.embed_memory = _Embedder(w, hid, ed, levels)  # h
        self.embed_query = _Embedder(w, hid, ed, levels)  # h_q (untied from h, as in the paper)
        self.prior_query = nn.Parameter(torch.randn(ed)) if cfg["prior"] == "learned" else None  # e_p
        self.context = _Pyramid(3, w, levels)
        self.prior_head = _mlp(w, hid, 2 * zd)  # p(z|m)
        self.context_vec = nn.Sequential(nn.Flatten(), nn.Linear(w * 16, zd))  # m -> |z| for the decoder
        self.posterior = _Pyramid(6, w, levels)
        self.posterior_head = _mlp(w, hid, 2 * zd)  # q(z|x, m)
        self.decoder = _Decoder(w, zd, levels)
        self.log_sigma = nn.Parameter(torch.full((1, 3, 1, 1), math.log(0.1)))  # p(x|z,m): Gaussian, per channel
        self.memory = None
        if cfg["memory"]["source"] == "learned":  # "initialise M randomly": uniform over the image range
            self.memory = nn.Parameter(torch.rand(cfg["memory"]["size"], 3, image_size, image_size) * 2 - 1)

    def addressing_parameters(self) -> list[nn.Parameter]:
        """The parameters that act on the address only (h, h_q, e_p): what VIMCO's signal trains."""
        ps = list(self.embed_memory.parameters()) + list(self.embed_query.parameters())
        return ps + ([self.prior_query] if self.prior_query is not None else [])

    def embed_entries(self, memory: torch.Tensor) -> torch.Tensor:
        """e_a = h(m_a) for every entry (M, e), in blocks of rows_per_forward."""
        return torch.cat([self.embed_memory(m) for m in memory.split(rows_per_forward(memory.device))]).float()

    def address_scores(self, memory: torch.Tensor, x: torch.Tensor):
        """S(m_a, x) (B, M) for q(a|x) and S(m_a, e_p) (M,) for the learned prior (None: flat)."""
        e_mem = self.embed_entries(memory)
        s_q = similarity(e_mem, self.embed_query(x).float(), self.similarity)
        s_p = None if self.prior_query is None else similarity(e_mem, self.prior_query[None].float(), self.similarity)[0]
        return s_q, s_p

    def _prior(self, m: torch.Tensor):
        feats = self.context(m)
        mu, log_sigma = self.prior_head(feats[-1]).float().chunk(2, 1)
        return feats, mu, log_sigma.clamp(-7.0, 5.0)

    def continuous_terms(self, x: torch.Tensor, m: torch.Tensor, eps: torch.Tensor):
        """Per row: log p(x|z,m), log p(z|m), log q(z|x,m) at z = mu_q + sigma_q * eps."""
        feats, mu_p, ls_p = self._prior(m)
        mu_q, ls_q = self.posterior_head(self.posterior(torch.cat([x, m], 1))[-1]).float().chunk(2, 1)
        ls_q = ls_q.clamp(-7.0, 5.0)
        z = mu_q + torch.exp(ls_q) * eps
        mean = self.decoder(z, self.context_vec(feats[-1]), feats, m).float()
        log_px = _log_normal(x.float(), mean, self.log_sigma.clamp(-7.0, 5.0)).sum((1, 2, 3))
        return log_px, _log_normal(z, mu_p, ls_p).sum(1), _log_normal(z, mu_q, ls_q).sum(1)

    def generate(self, m: torch.Tensor, z_noise: torch.Tensor, pixel_noise: torch.Tensor | None = None):
        """x for memory rows m: z ~ p(z|m), then the decoder mean (plus pixel noise: a sample)."""
        feats, mu, ls = self._prior(m)
        z = mu + torch.exp(ls) * z_noise
        x = self.decoder(z, self.context_vec(feats[-1]), feats, m).float()
        if pixel_noise is not None:
            x = x + torch.exp(self.log_sigma.clamp(-7.0, 5.0)) * pixel_noise
        return x.clamp(-1.0, 1.0)


# ============================================================================ memory images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 as a PNG holds them (sweeper.features.quantize's arithmetic):
    exact for images that came from uint8 as ``u / 127.5 - 1``."""
    return x.detach().float().add(1).mul(0.5).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # the same operations as sweeper.data.sample_batch


def image_keys(u8: torch.Tensor) -> list[int]:
    """One 63-bit content key per uint8 image, the same for an image and its mirror image
    (the trainer flips batches at random): two keys are equal iff the images are the same
    training image, up to a hash collision."""
    arr = u8.detach().cpu().contiguous().numpy()
    out = []
    for img in arr:
        a = hashlib.blake2b(img.tobytes(), digest_size=8).digest()
        b = hashlib.blake2b(np.ascontiguousarray(img[..., ::-1]).tobytes(), digest_size=8).digest()
        out.append(int.from_bytes(min(a, b), "little") >> 1)
    return out


# ============================================================================ the family
@register_model("vma_vae")
class VMAVAE(ModelFamily):
    DEFAULTS: dict[str, Any] = {
        "width": 64,  # feature maps of every conv layer (the paper's Omniglot nets: 48 or 64)
        "hidden": 256,  # hidden units of the MLP after each pyramid
        "z_dim": 64,  # |z| (the paper's Omniglot)
        "embed_dim": 128,  # |e|, the matching space of h and h_q (the paper's)
        "memory": {
            "source": "data",  # data: raw training images, disjoint from the targets | learned: a parameter
            "size": 64,  # |M|
            "pool_size": 512,  # data: distinct training images kept to draw M from (FIFO)
        },
        "similarity": "normalized_inner",  # <e_a, e_q> / ||e_a|| (Eq. 5) | inner | cosine
        "prior": "learned",  # p(a) from a learned query e_p | flat: 1/|M|
        "samples": 4,  # K posterior samples per target (the paper's); 1: REINFORCE + running-mean baseline
        "vimco_baseline": "geometric",  # leave-one-out: geometric (Mnih & Rezende) | arithmetic (Eq. 8)
        "score_baseline_decay": 0.9,  # K = 1 only: decay of the running-mean baseline
        "sample_mode": "mean",  # sampling: decoder mean | sample (mean + pixel noise)
        "lr": 3.0e-4,  # Adam (the paper's best of 1e-4, 3e-4)
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,  # L2 on everything but M (the paper's regularised Omniglot model: 3e-4)
        "eval_samples": 64,  # K of the bound the metrics report (nll_k<K>): fixed, so trials compare
        "eval_images": 256,  # training images the metrics use (a seeded draw)
    }
    TINY: dict[str, Any] = {
        "width": 4, "hidden": 8, "z_dim": 4, "embed_dim": 4, "samples": 3,
        "memory": {"source": "data", "size": 2, "pool_size": 16}, "eval_samples": 4, "eval_images": 16,
    }

    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        need, mem = cls.need, cfg["memory"]

        def count(key: str, value: Any) -> None:
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
                 f"must be an integer >= 1, got {value!r}")

        for key in ("width", "hidden", "z_dim", "embed_dim", "samples", "eval_samples", "eval_images"):
            count(key, cfg[key])
        need(mem["source"] in ("data", "learned"), "memory.source", f"{mem['source']!r}: use data or learned")
        count("memory.size", mem["size"])
        count("memory.pool_size", mem["pool_size"])
        need(mem["source"] != "data" or mem["size"] <= mem["pool_size"], "memory.size",
             f"{mem['size']} is more than memory.pool_size {mem['pool_size']}, the images M is drawn from; "
             f"raise memory.pool_size")
        need(cfg["similarity"] in SIMILARITIES, "similarity", f"{cfg['similarity']!r}: use one of {', '.join(SIMILARITIES)}")
        need(cfg["prior"] in ("learned", "flat"), "prior", f"{cfg['prior']!r}: use learned or flat")
        need(cfg["vimco_baseline"] in ("geometric", "arithmetic"), "vimco_baseline",
             f"{cfg['vimco_baseline']!r}: use geometric or arithmetic")
        need(0 <= cfg["score_baseline_decay"] < 1, "score_baseline_decay",
             f"must be in [0, 1), got {cfg['score_baseline_decay']}")
        need(cfg["sample_mode"] in ("mean", "sample"), "sample_mode", f"{cfg['sample_mode']!r}: use mean or sample")
        need(cfg["lr"] > 0, "lr", f"must be > 0, got {cfg['lr']}")
        need(isinstance(cfg["betas"], list) and len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]),
             "betas", f"must be two numbers in [0, 1), got {cfg['betas']!r}")
        need(cfg["weight_decay"] >= 0, "weight_decay", f"must be >= 0, got {cfg['weight_decay']}")

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        self.K, self.source = cfg["samples"], cfg["memory"]["source"]
        self.memory_size, self.pool_size = cfg["memory"]["size"], cfg["memory"]["pool_size"]
        torch.manual_seed(seed)
        self.net = VMANet(cfg, image_size).to(self.device)
        rest = [p for n, p in self.net.named_parameters() if n != "memory"]
        groups = [{"params": rest, "weight_decay": cfg["weight_decay"]}]
        if self.net.memory is not None:
            groups.append({"params": [self.net.memory], "weight_decay": 0.0})
        self.opt = torch.optim.Adam(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        # data memory: distinct training images seen so far, their keys, the next FIFO slot
        self.pool = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=self.device)
        self.pool_keys = torch.empty(0, dtype=torch.long)
        self.pool_next = 0
        self.baseline = torch.zeros(())  # K = 1: running mean of the bound
        self.baseline_set = False
        self.last_memory = self.last_targets = None  # what the last train_step read and modelled

    def networks(self) -> dict[str, nn.Module]:
        return {"vae": self.net}

    # ------------------------------------------------------------------ addressing
    def address_log_probs(self, memory: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None):
        """log q(a|x) (B, M) and log p(a) (B or 1, M). ``mask`` (B, M), True where an entry is
        hidden from that target (the metrics hide a target's own image)."""
        s_q, s_p = self.net.address_scores(memory, x)
        if mask is not None:
            s_q = s_q.masked_fill(mask, -math.inf)
        log_q = torch.log_softmax(s_q, 1)
        if s_p is None:  # flat: 1 / (number of entries the target sees)
            visible = torch.ones_like(s_q[:1], dtype=torch.bool) if mask is None else ~mask
            return log_q, torch.where(visible, -torch.log(visible.sum(1, keepdim=True).float()), -math.inf)
        s_p = s_p[None] if mask is None else s_p[None].masked_fill(mask, -math.inf)
        return log_q, torch.log_softmax(s_p, 1)

    def prior_probs(self, memory: torch.Tensor) -> torch.Tensor:
        """p(a) over the entries of ``memory`` (exactly 1/|M| with ``prior: flat``)."""
        M = memory.shape[0]
        if self.net.prior_query is None:
            return torch.full((M,), 1.0 / M, device=memory.device)
        with torch.no_grad():
            e_mem = self.net.embed_entries(memory)
            return torch.softmax(similarity(e_mem, self.net.prior_query[None].float(), self.net.similarity)[0], 0)

    def log_weights(self, x: torch.Tensor, memory: torch.Tensor, K: int, gen: torch.Generator | None = None,
                    mask: torch.Tensor | None = None):
        """log w (B, K) of K samples a_k ~ q(a|x), z_k ~ q(z|x, m_a), their log q(a_k|x) (B, K),
        and the parts the metrics report. Draws from torch's RNG, or from ``gen`` when given."""
        with self.autocast():
            log_q, log_p = self.address_log_probs(memory, x, mask)
            B = x.shape[0]
            probs = log_q.detach().exp()
            if gen is None:
                a = torch.multinomial(probs, K, replacement=True)
                eps = torch.randn(B * K, self.cfg["z_dim"], device=self.device)
            else:
                a = torch.multinomial(probs.cpu(), K, replacement=True, generator=gen).to(self.device)
                eps = noise((B * K, self.cfg["z_dim"]), gen, self.device)
            log_px, log_pz, log_qz = self.net.continuous_terms(x.repeat_interleave(K, 0), memory[a.reshape(-1)], eps)
        log_q_a = log_q.gather(1, a)
        log_w = log_p.expand(B, -1).gather(1, a) + (log_px + log_pz - log_qz).view(B, K) - log_q_a
        return log_w, log_q_a, {"a": a, "log_q": log_q, "log_p": log_p, "log_px": log_px.view(B, K),
                                "kl_z": (log_qz - log_pz).view(B, K)}

    # ------------------------------------------------------------------ training
    def train_step(self, batch: torch.Tensor, step: int = 0) -> dict[str, float]:
        """One Adam update on -L_K with VIMCO's address gradient (K = 1: REINFORCE, running-mean baseline)."""
        memory, targets = self._training_memory(batch.to(self.device))
        if targets is None:  # a lone image and an empty pool: nothing to model it against yet
            return {}
        log_w, log_q_a, parts = self.log_weights(targets, memory, self.K)
        if self.K > 1:
            bound, surrogate = vimco_surrogate(log_w, log_q_a, self.cfg["vimco_baseline"])
        else:
            if not self.baseline_set:
                self.baseline, self.baseline_set = _mean_over_ranks(log_w.detach().mean()).cpu(), True
            bound, surrogate = score_function_surrogate(log_w, log_q_a, self.baseline.to(self.device))
            d = self.cfg["score_baseline_decay"]
            self.baseline = d * self.baseline + (1 - d) * _mean_over_ranks(bound.detach().mean()).cpu()
        self.opt.zero_grad(set_to_none=True)
        (-surrogate.mean()).backward()
        self.average_gradients(self.net)
        self.opt.step()
        self.last_memory, self.last_targets = memory.detach(), targets.detach()
        return {"nll_bound": -bound.mean().item(), "kl_a": _address_kl(parts["log_q"], parts["log_p"]).mean().item(),
                "kl_z": parts["kl_z"].mean().item(), "recon_nll": -parts["log_px"].mean().item()}

    def _training_memory(self, batch: torch.Tensor):
        """(M, targets) for a minibatch: learned M and the whole batch, or (data) a draw from the
        pool disjoint from the batch, the batch split in two while the pool has nothing else."""
        if self.source == "learned":
            return self.net.memory, batch
        u8 = to_uint8(batch)
        self._remember(_all_gathered(u8))
        keys = image_keys(u8)
        batch_keys = set(keys)
        eligible = [i for i, k in enumerate(self.pool_keys.tolist()) if k not in batch_keys]
        if eligible:
            pick = torch.randperm(len(eligible))[: self.memory_size]  # torch's RNG: seeded per step
            idx = torch.tensor(eligible)[pick].to(self.device)
            return to_float(self.pool[idx]), batch
        n_mem = min(self.memory_size, batch.shape[0] // 2)
        mem_keys = set(keys[:n_mem])
        rest = [i for i in range(n_mem, batch.shape[0]) if keys[i] not in mem_keys]
        if n_mem == 0 or not rest:
            return None, None
        return batch[:n_mem], batch[torch.tensor(rest, device=self.device)]

    def _remember(self, u8: torch.Tensor) -> None:
        """Add the distinct images of a batch to the pool (FIFO once it holds pool_size)."""
        known = set(self.pool_keys.tolist())
        for img, key in zip(u8, image_keys(u8)):
            if key in known:
                continue
            known.add(key)
            if len(self.pool) < self.pool_size:
                self.pool = torch.cat([self.pool, img[None].to(self.device)])
                self.pool_keys = torch.cat([self.pool_keys, torch.tensor([key])])
            else:
                known.discard(int(self.pool_keys[self.pool_next]))
                self.pool[self.pool_next] = img
                self.pool_keys[self.pool_next] = key
                self.pool_next = (self.pool_next + 1) % self.pool_size

    # ------------------------------------------------------------------ sampling
    def memory_for(self, gen: torch.Generator) -> tuple[torch.Tensor, list[int] | None]:
        """M for sampling and the metrics, and its entries' image keys (data memory): the learned
        memory, or a draw of memory.size pool images from ``gen``; before any training batch the
        data memory is one blank image."""
        if self.source == "learned":
            return self.net.memory, None
        if len(self.pool) == 0:
            return torch.zeros(1, 3, self.image_size, self.image_size, device=self.device), [-1]
        idx = torch.randperm(len(self.pool), generator=gen)[: self.memory_size]
        return to_float(self.pool[idx.to(self.device)]), self.pool_keys[idx].tolist()

    def sample(self, n: int, seed) -> torch.Tensor:
        """a ~ p(a|M), z ~ p(z|m_a), x = decoder mean (``sample_mode: sample`` adds pixel noise)."""
        return self.sample_with_addresses(n, seed)[0]

    def sample_with_addresses(self, n: int, seed, rows: int = 1):
        """(images, the memory entries they came from): ``n // rows`` addresses drawn from p(a),
        each used for ``rows`` samples with different z (rows = 1: what ``sample`` returns)."""
        gen = cpu_generator(seed)
        with self.sampling(self.net, seed=gen):
            memory, _ = self.memory_for(gen)
            a = torch.multinomial(self.prior_probs(memory).cpu(), max(1, -(-n // rows)), replacement=True,
                                  generator=gen).repeat_interleave(rows)[:n].to(self.device)
            z = noise((n, self.cfg["z_dim"]), gen, self.device)
            pixel = noise((n, 3, self.image_size, self.image_size), gen, self.device) \
                if self.cfg["sample_mode"] == "sample" else None
            with self.autocast():
                x = self.net.generate(memory[a], z, pixel)
            return x.float(), memory[a].detach().clamp(-1, 1)

    # ------------------------------------------------------------------ metrics
    def memory_report(self, images: torch.Tensor, seed: int, suffix: str = "") -> dict[str, float]:
        """The bound and the address statistics on uint8 ``images`` (a seeded draw of at most
        eval_images of them), with M from ``memory_for(seed)`` and each target's own image hidden
        from it: nll_k<K> (-L_K, nats per image), address_kl = KL(q(a|x) || p(a)) and
        address_entropy = H(q(a|x)) (nats, exact over M), z_kl (E_q KL(q(z|x,m_a) || p(z|m_a)),
        nats), memory_used (entries any posterior sample chose) and memory_used_frac (of |M|)."""
        gen = cpu_generator(seed)
        K = self.cfg["eval_samples"]
        with self.sampling(self.net, seed=gen):
            memory, mem_keys = self.memory_for(gen)
            pick = torch.randperm(len(images), generator=gen)[: self.cfg["eval_images"]]
            sums = {"nll": 0.0, "kl_a": 0.0, "ent": 0.0, "kl_z": 0.0}
            used = torch.zeros(memory.shape[0], dtype=torch.bool)
            for chunk in pick.split(max(1, rows_per_forward(self.device) // K)):
                u8 = images[chunk]
                mask = _own_image_mask(image_keys(u8), mem_keys, self.device)
                log_w, _, parts = self.log_weights(to_float(u8.to(self.device)), memory, K, gen, mask)
                sums["nll"] -= float(log_mean_exp(log_w).sum())
                sums["kl_a"] += float(_address_kl(parts["log_q"], parts["log_p"]).sum())
                sums["ent"] += float(_address_kl(parts["log_q"], torch.zeros_like(parts["log_q"])).neg().sum())
                sums["kl_z"] += float(parts["kl_z"].mean(1).sum())
                used[parts["a"].reshape(-1).unique().cpu()] = True
        n = len(pick)
        out = {f"nll_k{K}": sums["nll"] / n, "address_kl": sums["kl_a"] / n, "address_entropy": sums["ent"] / n,
               "z_kl": sums["kl_z"] / n, "memory_used": float(used.sum()), "memory_used_frac": float(used.float().mean())}
        return {k + suffix: v for k, v in out.items()}

    def lookups(self, images: torch.Tensor, seed: int, n: int = 6, top: int = 5) -> tuple[torch.Tensor, int]:
        """(uint8 tiles, tiles per row) for a picture: each of ``n`` images, then its ``top``
        entries by q(a|x)."""
        gen = cpu_generator(seed)
        with self.sampling(self.net, seed=gen):
            memory, mem_keys = self.memory_for(gen)
            u8 = images[torch.randperm(len(images), generator=gen)[:n]]
            log_q, _ = self.address_log_probs(memory, to_float(u8.to(self.device)),
                                              _own_image_mask(image_keys(u8), mem_keys, self.device))
            best = log_q.topk(min(top, memory.shape[0]), 1).indices
            rows = [torch.cat([u8[i: i + 1].to(self.device), to_uint8(memory[best[i]])]) for i in range(len(u8))]
        return torch.cat(rows).cpu(), 1 + best.shape[1]

    def pictures(self, out_dir: str, step: int, seed: int) -> list[str]:
        """``memory_samples_<step>.png``: rows of a memory entry drawn from p(a), then 7 samples
        generated from it (different z), as the paper's Figure 4A."""
        import os

        from sweeper.pictures import save_grid

        x, m = self.sample_with_addresses(6 * 7, seed, rows=7)
        tiles = torch.cat([torch.cat([m[i: i + 1], x[i: i + 7]]) for i in range(0, len(x), 7)])
        return [save_grid(to_uint8(tiles).cpu(), os.path.join(out_dir, f"memory_samples_{step:07d}.png"), nrow=8)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "pool": self.pool.cpu().clone(),
                "pool_keys": self.pool_keys.clone(), "pool_next": self.pool_next,
                "baseline": self.baseline.clone(), "baseline_set": self.baseline_set}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.load_state_dict(sd["net"])
        self.opt.load_state_dict(sd["opt"])
        self.pool = sd["pool"].to(self.device)
        self.pool_keys, self.pool_next = sd["pool_keys"].clone(), int(sd["pool_next"])
        self.baseline, self.baseline_set = sd["baseline"].clone(), bool(sd["baseline_set"])


def _address_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q(a|x) || p(a)) per target, exact over the memory; hidden entries (q = 0) add nothing."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(1)


def _own_image_mask(keys: list[int], mem_keys: list[int] | None, device) -> torch.Tensor | None:
    """(B, M) True where a memory entry is the target's own image; None for a learned memory."""
    if mem_keys is None:
        return None
    mask = (torch.tensor(keys)[:, None] == torch.tensor(mem_keys)[None]).to(device)
    return mask & ~mask.all(1, keepdim=True)  # a memory that is only the target itself stays visible


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over data-parallel ranks (every rank keeps the same K = 1 baseline)."""
    if not distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _all_gathered(u8: torch.Tensor) -> torch.Tensor:
    """Every data-parallel rank's batch, in rank order, so every rank's pool stays identical."""
    if not distributed():
        return u8
    parts = [torch.empty_like(u8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, u8.contiguous())
    return torch.cat(parts)


@register_metric("vma_memory", family="vma_vae")
def vma_memory_metric(ctx) -> dict[str, float]:
    """The bound and the memory's use on the training images (``*_heldout`` too when the
    evaluation has held-back images), and ``address_lookups_<step>.png``: training images beside
    the entries q(a|x) ranks highest."""
    fam = ctx.model
    out = fam.memory_report(ctx.real_images, ctx.seed)
    held = getattr(ctx, "heldout_images", None)
    if held is not None and len(held):
        out.update(fam.memory_report(held, ctx.seed, suffix="_heldout"))
    from sweeper.pictures import save_grid

    tiles, per_row = fam.lookups(ctx.real_images, ctx.seed)
    ctx.add_artifact(save_grid(tiles, ctx.path("address_lookups"), nrow=per_row))
    return out

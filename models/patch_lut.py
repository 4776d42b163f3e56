"""Patch-LUT denoiser: a patch transformer that paints every patch from a learned dictionary.

After the post "Generating cats with learned lookup tables" (shared/papers/patch-lut-denoiser-post.txt):
the image is cut into p x p patches (one token each), ``depth`` self-attention blocks run over
the tokens plus ``static_tokens`` learned tokens, and each patch's output is a weight vector over
a lookup table (LUT) of p x p RGB patterns; the patch is their weighted sum.

    fam = build_model({"family": "patch_lut", **PatchLUT.DEFAULTS, "dictionary_size": 64}, image_size=64)
    losses = fam.train_step(real, step=0)   # x_t = lerp(x_0, noise, t), predict x_0
    img = fam.sample(16, seed=0)            # from Gaussian noise, sample_steps steps toward x_0

The memory is the static dictionary (K learned patterns). Knobs: ``dictionary_size`` K (the
memory-size axis), ``weights: softmax`` (convex combinations: every patch lies in the convex hull
of its LUT's entries) or ``tanh`` (unnormalised: the post's second variant), ``gram_penalty``
(pushes the normalised dictionary toward orthogonal patterns), ``dynamic_lut`` (the post's
"compute the LUT dynamically": ``dynamic_patterns`` extra LUT entries per image, each colour
channel an outer product of two p-vectors, weighted by the same softmax/tanh as the static
entries), ``dictionary: false`` (the ablation: predict pixels directly).

Choices where the post is open (models/README.md, "Patch-LUT denoiser"): the denoiser is told t
through a sinusoidal embedding added to every token; the sampler is the deterministic Euler step
of the lerp path (predict x_0, infer the noise, re-lerp to the next t), clamping x_0 to [-1, 1];
t is drawn U(0, 1) (``schedule: uniform``) or sigmoid(N(0, 1)) (``logit_normal``): the post does
not say how; the dynamic entries are per image, computed from the mean of the final tokens.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, ema_update, noise, register_model
from sweeper.eval.registry import register_metric

USAGE_FLOOR = 0.1  # a static entry is "active" when its share of the samples' usage is above 0.1 / K
USAGE_SAMPLES = 64  # generated images whose final-step weights measure dictionary use
ATTRACTOR_T0 = 0.5  # the attractor check re-noises a sample to this t and denoises it again
ATTRACTOR_RADIUS = 0.1  # "returned": RMS pixel distance (images in [-1, 1]) below this
ATTRACTOR_SAMPLES = 32  # samples the attractor check re-noises


# ---------------------------------------------------------------------------- the network
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3*p*p), patches in raster order."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(t: torch.Tensor, p: int, size: int) -> torch.Tensor:
    """(B, N, 3*p*p) -> (B, 3, size, size), the inverse of :func:`patchify`."""
    b, g = t.shape[0], size // p
    return t.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, size, size)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    ang = t.float()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([ang.sin(), ang.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class Block(nn.Module):
    """Pre-norm transformer block: fused attention (SDPA), then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


@dataclass
class LUTRead:
    """One call of the network: the predicted x_0 and how the LUT painted it.

    ``weights`` (B, N, K + P): each patch's weights over its LUT, the K static entries first, then
    the image's P dynamic ones; ``static`` / ``dynamic`` (B, N, 3*p*p): the two parts of each
    output patch (``static + dynamic`` is the patch); ``entries`` (B, P, 3*p*p): the dynamic
    entries. All None without a dictionary (``dynamic`` and ``entries`` without dynamic entries)."""

    image: torch.Tensor
    weights: torch.Tensor | None = None
    static: torch.Tensor | None = None
    dynamic: torch.Tensor | None = None
    entries: torch.Tensor | None = None


class PatchLUTNet(nn.Module):
    """x_t, t -> :class:`LUTRead`: the predicted x_0, every patch painted from the LUT (the static
    dictionary plus, with ``dynamic_lut``, the image's own dynamic entries)."""

    def __init__(self, image_size: int, cfg: dict[str, Any]):
        super().__init__()
        p, d = cfg["patch"], cfg["width"]
        self.p, self.size = p, image_size
        self.n_tokens = (image_size // p) ** 2
        pix = 3 * p * p
        self.use_dictionary, self.weights = bool(cfg["dictionary"]), cfg["weights"]
        self.dynamic = int(cfg["dynamic_patterns"]) if cfg["dynamic_lut"] else 0
        self.embed = nn.Linear(pix, d)
        self.pos = nn.Parameter(torch.randn(1, self.n_tokens, d) * 0.02)
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.static = nn.Parameter(torch.randn(1, cfg["static_tokens"], d) * 0.02) if cfg["static_tokens"] else None
        self.blocks = nn.ModuleList(Block(d, cfg["heads"]) for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(d)
        if not self.use_dictionary:
            self.to_pixels = nn.Linear(d, pix)
            return
        self.to_weights = nn.Linear(d, cfg["dictionary_size"] + self.dynamic)  # logits over the whole LUT
        # Pixel std 0.5 per entry: a softmax average of K random entries starts near 0 (grey).
        self.dictionary = nn.Parameter(torch.randn(cfg["dictionary_size"], pix) * 0.5)
        if self.dynamic:
            # per image: `dynamic` entries, each colour channel the outer product of two p-vectors
            # (the post's N * (3 * 2 * 8) outputs). Each vector starts with std ~0.7 (LayerNorm'd
            # input), so an entry's pixels start near the dictionary's std 0.5, not at a saddle at 0.
            self.to_dynamic = nn.Linear(d, self.dynamic * 3 * 2 * p)
            nn.init.normal_(self.to_dynamic.weight, std=0.7 / math.sqrt(d))
            nn.init.zeros_(self.to_dynamic.bias)

    def lut_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) if self.weights == "softmax" else torch.tanh(logits)

    def dynamic_entries(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, P, 3*p*p): rank-1 tiles per colour channel, u v^T from two p-vectors."""
        b, p = pooled.shape[0], self.p
        uv = self.to_dynamic(pooled).reshape(b, self.dynamic, 3, 2, p)
        return (uv[..., 0, :, None] * uv[..., 1, None, :]).reshape(b, self.dynamic, 3 * p * p)

    def tokens(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The final (normalised) tokens: N patch tokens, then the static tokens."""
        h = self.embed(patchify(x_t, self.p)) + self.pos
        h = h + self.time(time_embedding(t, h.shape[-1]))[:, None]
        if self.static is not None:
            h = torch.cat([h, self.static.expand(x_t.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> LUTRead:
        h = self.tokens(x_t, t)
        patch_h = h[:, : self.n_tokens]
        if not self.use_dictionary:
            return LUTRead(unpatchify(self.to_pixels(patch_h), self.p, self.size))
        w = self.lut_weights(self.to_weights(patch_h))  # (B, N, K + P): one weighting over the whole LUT
        k = self.dictionary.shape[0]
        static = w[..., :k] @ self.dictionary  # (B, N, 3*p*p)
        dynamic = entries = None
        patches = static
        if self.dynamic:
            entries = self.dynamic_entries(h.mean(1))  # per image, from all final tokens
            dynamic = w[..., k:] @ entries  # (B, N, P) @ (B, P, 3*p*p)
            patches = static + dynamic
        return LUTRead(unpatchify(patches, self.p, self.size), w, static, dynamic, entries)


def gram_offdiag_mass(dictionary: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the Gram matrix of the unit-normalised dictionary."""
    dn = F.normalize(dictionary, dim=1)
    g = dn @ dn.t()
    k = g.shape[0]
    off = g - torch.diag_embed(torch.diagonal(g))
    return (off**2).sum() / max(k * (k - 1), 1)


# ---------------------------------------------------------------------------- measuring use
def blend_distribution(weights: torch.Tensor) -> torch.Tensor:
    """Each patch's weights as a distribution over its LUT: |w| / sum |w| (softmax: w itself)."""
    a = weights.abs().double()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-300)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last axis; 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


class UsageTally:
    """How the LUT is used, accumulated over the final denoising step of many samples.

    - ``dictionary_blend_perplexity``: exp of the mean over patches of the entropy of each patch's
      blend (over all its K + P entries): how many entries one patch mixes (1: one entry paints it).
    - ``dictionary_usage_perplexity``: exp of the entropy of the static part of the blends averaged
      over all patches of all samples, renormalised over the K entries: how many static entries
      the samples use at all.
    - ``dictionary_active``: static entries whose share of that average is above USAGE_FLOOR / K.
    - ``dictionary_share``: sum over patches of ||static part||^2 over the sum of ||static||^2 +
      ||dynamic||^2: the fraction of the painted energy that comes from the static dictionary
      (1.0 without dynamic entries; the cross term is left out, so the share lies in [0, 1])."""

    def __init__(self, k: int):
        self.k, self.patches, self.entropy = k, 0, 0.0
        self.usage = torch.zeros(k, dtype=torch.float64)
        self.static_energy, self.dynamic_energy = 0.0, 0.0

    def add(self, read: LUTRead) -> None:
        q = blend_distribution(read.weights.reshape(-1, read.weights.shape[-1])).cpu()
        self.patches += q.shape[0]
        self.entropy += float(entropy(q).sum())
        self.usage += q[:, : self.k].sum(0)
        self.static_energy += float(read.static.double().pow(2).sum())
        if read.dynamic is not None:
            self.dynamic_energy += float(read.dynamic.double().pow(2).sum())

    def metrics(self) -> dict[str, float]:
        u = self.usage / self.usage.sum().clamp_min(1e-300)
        energy = self.static_energy + self.dynamic_energy
        return {"dictionary_blend_perplexity": math.exp(self.entropy / max(self.patches, 1)),
                "dictionary_usage_perplexity": float(entropy(u).exp()),
                "dictionary_active": float((u > USAGE_FLOOR / self.k).sum()),
                "dictionary_share": self.static_energy / energy if energy > 0 else 1.0}


# ---------------------------------------------------------------------------- the family
@register_model("patch_lut")
class PatchLUT(ModelFamily):
    DEFAULTS: dict[str, Any] = {
        "patch": 8,  # p: patch side in pixels (one token per patch)
        "width": 256,  # token width
        "depth": 16,  # self-attention blocks (the post: 16)
        "heads": 4,
        "static_tokens": 4,  # learned tokens appended to the sequence
        "dictionary": True,  # false: the ablation that predicts pixels directly
        "dictionary_size": 512,  # K, the memory-size axis (the post: 512 and 64)
        "weights": "softmax",  # softmax (convex combination) | tanh (unnormalised)
        "gram_penalty": 0.0,  # weight of the off-diagonal Gram mass of the normalised dictionary
        "dynamic_lut": False,  # also put per-image rank-1 RGB entries in the LUT
        "dynamic_patterns": 4,  # how many per image, when dynamic_lut is on
        "schedule": "uniform",  # t ~ U(0, 1) | logit_normal (the post does not say)
        "sample_steps": 32,  # denoising steps from noise to image
        "lr": 3.0e-4,  # AdamW
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "ema_decay": 0.999,  # the sampler uses the EMA network
    }
    LOSSES = ("loss_denoise", "loss_gram")  # what train_step returns (checked in tests/test_family_contract.py)
    HEADLINE = ("dictionary_share", "dictionary_usage_perplexity")  # how much the memory paints, how much of it
    TINY: dict[str, Any] = {"width": 16, "depth": 1, "heads": 2, "static_tokens": 2, "dictionary_size": 8,
                            "dynamic_lut": True, "dynamic_patterns": 1, "sample_steps": 3, "gram_penalty": 0.1}

    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        need = cls.need
        need(isinstance(cfg["patch"], int) and cfg["patch"] >= 1 and image_size % cfg["patch"] == 0, "patch",
             f"{cfg['patch']!r} must be a positive integer dividing the image size {image_size}")
        need(isinstance(cfg["heads"], int) and cfg["heads"] >= 1, "heads", f"must be an integer >= 1, got {cfg['heads']!r}")
        need(isinstance(cfg["width"], int) and cfg["width"] >= 1 and cfg["width"] % cfg["heads"] == 0, "width",
             f"must be a positive integer divisible by heads ({cfg['heads']}), got {cfg['width']!r}")
        need(isinstance(cfg["depth"], int) and cfg["depth"] >= 1, "depth", f"must be an integer >= 1, got {cfg['depth']!r}")
        need(isinstance(cfg["static_tokens"], int) and cfg["static_tokens"] >= 0, "static_tokens",
             f"must be an integer >= 0, got {cfg['static_tokens']!r}")
        need(isinstance(cfg["dictionary"], bool), "dictionary", f"use true or false, got {cfg['dictionary']!r}")
        need(isinstance(cfg["dictionary_size"], int) and cfg["dictionary_size"] >= 2, "dictionary_size",
             f"must be an integer >= 2, got {cfg['dictionary_size']!r}")
        need(cfg["weights"] in ("softmax", "tanh"), "weights", f"{cfg['weights']!r}: use softmax or tanh")
        need(cfg["gram_penalty"] >= 0, "gram_penalty", f"must be >= 0, got {cfg['gram_penalty']}")
        need(isinstance(cfg["dynamic_lut"], bool), "dynamic_lut", f"use true or false, got {cfg['dynamic_lut']!r}")
        need(cfg["dictionary"] or not cfg["dynamic_lut"], "dynamic_lut",
             "the dynamic entries live in the dictionary's LUT; with dictionary: false set dynamic_lut: false")
        need(isinstance(cfg["dynamic_patterns"], int) and cfg["dynamic_patterns"] >= 1, "dynamic_patterns",
             f"must be an integer >= 1, got {cfg['dynamic_patterns']!r}")
        need(cfg["schedule"] in ("uniform", "logit_normal"), "schedule", f"{cfg['schedule']!r}: use uniform or logit_normal")
        need(isinstance(cfg["sample_steps"], int) and cfg["sample_steps"] >= 1, "sample_steps",
             f"must be an integer >= 1, got {cfg['sample_steps']!r}")
        need(cfg["lr"] > 0, "lr", f"must be > 0, got {cfg['lr']}")
        need(isinstance(cfg["betas"], list) and len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]),
             "betas", f"must be two numbers in [0, 1), got {cfg['betas']!r}")
        need(cfg["weight_decay"] >= 0, "weight_decay", f"must be >= 0, got {cfg['weight_decay']}")
        need(0 <= cfg["ema_decay"] < 1, "ema_decay", f"must be in [0, 1), got {cfg['ema_decay']}")

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        torch.manual_seed(seed)
        self.net = PatchLUTNet(image_size, cfg).to(self.device)
        self.ema = copy.deepcopy(self.net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                     weight_decay=cfg["weight_decay"])

    def networks(self) -> dict[str, nn.Module]:
        return {"net": self.net, "ema": self.ema}

    # ------------------------------------------------------------------ training
    def draw_t(self, n: int) -> torch.Tensor:
        if self.cfg["schedule"] == "logit_normal":
            return torch.sigmoid(torch.randn(n, device=self.device))
        return torch.rand(n, device=self.device)

    def losses(self, x0: torch.Tensor, t: torch.Tensor | None = None,
               eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Denoising loss (x_t = lerp(x_0, noise, t), predict x_0; t from the schedule and the noise
        standard normal unless given), plus the Gram penalty on the static dictionary."""
        t = self.draw_t(len(x0)) if t is None else t
        eps = torch.randn_like(x0) if eps is None else eps
        x_t = torch.lerp(x0, eps, t[:, None, None, None])  # t = 0: the image, t = 1: pure noise
        with self.autocast():
            pred = self.net(x_t, t).image
        out = {"loss_denoise": F.mse_loss(pred.float(), x0)}
        if self.net.use_dictionary and self.cfg["gram_penalty"] > 0:
            out["loss_gram"] = self.cfg["gram_penalty"] * gram_offdiag_mass(self.net.dictionary)
        return out

    def train_step(self, batch: torch.Tensor, step: int = 0) -> dict[str, float]:
        parts = self.losses(batch.to(self.device))
        loss = sum(parts.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(self.net)
        self.opt.step()
        ema_update(self.ema, self.net, self.cfg["ema_decay"])
        return {k: float(v.detach()) for k, v in parts.items()}

    # ------------------------------------------------------------------ sampling
    def sampling_times(self, t_start: float = 1.0) -> list[float]:
        """The t of every denoiser call: 1, 1 - 1/S, ..., 1/S (S = sample_steps); from ``t_start``
        < 1, that t and then the grid's points below it."""
        steps = int(self.cfg["sample_steps"])
        grid = [1.0 - i / steps for i in range(steps)]
        return grid if t_start >= 1.0 else [t_start] + [g for g in grid if g < t_start - 1e-9]

    def denoise(self, x: torch.Tensor, t_start: float = 1.0,
                record: Callable[[LUTRead], None] | None = None) -> torch.Tensor:
        """Euler steps of the lerp path from x at ``t_start`` (1: pure noise) to t = 0: predict x_0
        (clamped to [-1, 1]), infer the noise (x - (1 - t) x_0) / t, re-lerp at the next t; the last
        step returns its x_0. ``record`` receives the last step's :class:`LUTRead`."""
        times = self.sampling_times(t_start)
        n = x.shape[0]
        for i, t in enumerate(times):
            with self.autocast():
                read = self.ema(x, torch.full((n,), t, device=self.device))
            x0 = read.image.float().clamp(-1, 1)
            if i == len(times) - 1:
                if record is not None:
                    record(read)
                return x0
            eps = (x - (1 - t) * x0) / t
            x = torch.lerp(x0, eps, times[i + 1])
        return x

    def sample(self, n: int, seed) -> torch.Tensor:
        gen = cpu_generator(seed)
        x = noise((n, 3, self.image_size, self.image_size), gen, self.device)
        with self.sampling(self.ema, seed=gen):
            return self.denoise(x)

    def dictionary_usage(self, n: int, seed: int, batch: int = 32) -> dict[str, float]:
        """:class:`UsageTally`'s metrics over ``n`` samples' final denoising step; {} without a dictionary."""
        if not self.net.use_dictionary:
            return {}
        tally = UsageTally(self.net.dictionary.shape[0])
        for b, start in enumerate(range(0, n, batch)):
            gen = cpu_generator(seed + b)
            x = noise((min(batch, n - start), 3, self.image_size, self.image_size), gen, self.device)
            with self.sampling(self.ema, seed=gen):
                self.denoise(x, record=tally.add)
        return tally.metrics()

    def attractor_return(self, n: int, seed: int, batch: int = 32, t0: float = ATTRACTOR_T0,
                         radius: float = ATTRACTOR_RADIUS) -> dict[str, float]:
        """The DenseAM attractor check: each of ``n`` samples is re-noised to ``t0`` with fresh noise
        (lerp(x, noise, t0)) and denoised again from t0. ``attractor_return_frac``: the fraction that
        come back within RMS ``radius`` of themselves (a stable attractor); ``attractor_return_rms``:
        the median RMS distance (pixels in [-1, 1])."""
        dists = []
        for b, start in enumerate(range(0, n, batch)):
            gen = cpu_generator(seed + b)
            shape = (min(batch, n - start), 3, self.image_size, self.image_size)
            with self.sampling(self.ema, seed=gen):
                first = self.denoise(noise(shape, gen, self.device))
                again = self.denoise(torch.lerp(first, noise(shape, gen, self.device), t0), t_start=t0)
            dists.append((again - first).pow(2).mean((1, 2, 3)).sqrt().cpu())
        d = torch.cat(dists).double()
        return {"attractor_return_frac": float((d < radius).double().mean()),
                "attractor_return_rms": float(d.median())}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.load_state_dict(sd["net"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])

    # ------------------------------------------------------------------ pictures
    def pictures(self, out_dir: str, step: int, seed: int) -> list[str]:
        """The dictionary tiled as an image (each entry stretched to its own range) and the Gram
        matrix of the normalised dictionary (|cosine|, white = 1)."""
        if not self.net.use_dictionary:
            return []
        from PIL import Image

        from sweeper.eval.pictures import save_grid

        p = self.net.p
        d = self.ema.dictionary.detach().float().cpu().reshape(-1, 3, p, p)
        lo = d.amin(dim=(1, 2, 3), keepdim=True)
        hi = d.amax(dim=(1, 2, 3), keepdim=True)
        tiles = ((d - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
        paths = [save_grid(tiles, os.path.join(out_dir, f"dictionary_{int(step):07d}.png"),
                           nrow=int(math.ceil(math.sqrt(len(tiles)))))]
        dn = F.normalize(self.ema.dictionary.detach().float().cpu(), dim=1)
        g = (dn @ dn.t()).abs().clamp(0, 1).numpy()
        scale = max(1, 256 // g.shape[0])
        img = Image.fromarray((g * 255).round().astype(np.uint8)).resize((g.shape[0] * scale,) * 2, Image.NEAREST)
        path = os.path.join(out_dir, f"dictionary_gram_{int(step):07d}.png")
        img.save(path)
        paths.append(path)
        return paths


@register_metric("dictionary_usage", family="patch_lut", reports=("dictionary_*",))
def dictionary_usage_metric(ctx) -> dict[str, float]:
    """``dictionary_share``, ``dictionary_blend_perplexity``, ``dictionary_usage_perplexity`` and
    ``dictionary_active`` (:class:`UsageTally`) over the final denoising step of generated images."""
    return ctx.model.dictionary_usage(min(USAGE_SAMPLES, int(ctx.cfg["n_gen"])), ctx.seed, int(ctx.cfg["batch_size"]))


@register_metric("attractor_return", family="patch_lut", reports=("attractor_return_*",))
def attractor_return_metric(ctx) -> dict[str, float]:
    """``attractor_return_frac`` / ``attractor_return_rms``: samples re-noised to t0 = 0.5 and
    denoised again that return to themselves (:meth:`PatchLUT.attractor_return`)."""
    return ctx.model.attractor_return(min(ATTRACTOR_SAMPLES, int(ctx.cfg["n_gen"])), ctx.seed, int(ctx.cfg["batch_size"]))

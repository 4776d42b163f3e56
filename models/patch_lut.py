"""Patch-LUT denoiser: a patch transformer that paints every patch from a learned dictionary.

After the post "Generating cats with learned lookup tables" (shared/papers/patch-lut-denoiser-post.txt):
the image is cut into p x p patches (one token each), ``depth`` self-attention blocks run over
the tokens plus ``static_tokens`` learned tokens, and each patch's output is a weight vector over
a learned dictionary of K p x p RGB patterns; the patch is their weighted sum.

    fam = build_model({"family": "patch_lut", **PatchLUT.DEFAULTS, "dictionary_size": 64}, image_size=64)
    losses = fam.train_step(real, step=0)   # x_t = lerp(x_0, noise, t), predict x_0
    img = fam.sample(16, seed=0)            # from Gaussian noise, sample_steps steps toward x_0

The memory is the dictionary. Knobs: ``dictionary_size`` K (the memory-size axis),
``weights: softmax`` (convex combinations: every patch lies in the dictionary's convex hull) or
``tanh`` (unnormalised: the post's second variant), ``gram_penalty`` (pushes the normalised
dictionary toward orthogonal patterns), ``dynamic_lut`` (per-image rank-1 patterns beside the
static dictionary), ``dictionary: false`` (the ablation: predict pixels directly).

Choices where the post is open (README, "Patch-LUT denoiser"): the denoiser is told t through a
sinusoidal embedding added to every token; the sampler is the deterministic Euler step of the
lerp path (predict x_0, infer the noise, re-lerp to the next t), clamping x_0 to [-1, 1];
``schedule: uniform`` draws t ~ U(0, 1) as the post does, ``logit_normal`` draws sigmoid(N(0, 1)).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, ema_update, noise, register_model
from sweeper.metric_registry import register_metric

USAGE_FLOOR = 0.1  # an entry is "in use" when its share of the average weight is above 0.1 / K
USAGE_SAMPLES = 64  # generated images whose final-step weights measure dictionary usage


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


class PatchLUTNet(nn.Module):
    """x_t, t -> predicted x_0, every patch painted from the dictionary (and dynamic patterns)."""

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
        if self.use_dictionary:
            self.to_weights = nn.Linear(d, cfg["dictionary_size"])
            # Unit-variance pixels per entry: a softmax average of K entries starts near 0 (grey).
            self.dictionary = nn.Parameter(torch.randn(cfg["dictionary_size"], pix) * 0.5)
        else:
            self.to_pixels = nn.Linear(d, pix)
        if self.dynamic:
            # per patch: `dynamic` patterns, each colour channel the outer product of two p-vectors
            self.to_dynamic = nn.Linear(d, self.dynamic * 3 * 2 * p)
            nn.init.normal_(self.to_dynamic.weight, std=0.02 / math.sqrt(d))
            nn.init.zeros_(self.to_dynamic.bias)

    def lut_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) if self.weights == "softmax" else torch.tanh(logits)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, return_weights: bool = False):
        b = x_t.shape[0]
        h = self.embed(patchify(x_t, self.p)) + self.pos
        h = h + self.time(time_embedding(t, h.shape[-1]))[:, None]
        if self.static is not None:
            h = torch.cat([h, self.static.expand(b, -1, -1)], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h[:, : self.n_tokens])
        w = None
        if self.use_dictionary:
            w = self.lut_weights(self.to_weights(h))  # (B, N, K)
            patches = w @ self.dictionary  # (B, N, 3*p*p): the weighted sum of dictionary entries
        else:
            patches = self.to_pixels(h)
        if self.dynamic:
            p = self.p
            uv = self.to_dynamic(h).reshape(b, self.n_tokens, self.dynamic, 3, 2, p)
            outer = uv[..., 0, :, None] * uv[..., 1, None, :]  # (B, N, P, 3, p, p)
            patches = patches + outer.sum(2).reshape(b, self.n_tokens, 3 * p * p)
        out = unpatchify(patches, self.p, self.size)
        return (out, w) if return_weights else out


def gram_offdiag_mass(dictionary: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the Gram matrix of the unit-normalised dictionary."""
    dn = F.normalize(dictionary, dim=1)
    g = dn @ dn.t()
    k = g.shape[0]
    off = g - torch.diag_embed(torch.diagonal(g))
    return (off**2).sum() / max(k * (k - 1), 1)


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
        "dynamic_lut": False,  # also emit per-image rank-1 RGB patterns per patch
        "dynamic_patterns": 4,  # how many, per patch, when dynamic_lut is on
        "schedule": "uniform",  # t ~ U(0, 1) | logit_normal
        "sample_steps": 32,  # denoising steps from noise to image
        "lr": 3.0e-4,  # AdamW
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "ema_decay": 0.999,  # the sampler uses the EMA network
    }
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

    def losses(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Denoising loss at t from the schedule (lerp to noise, predict x_0), plus the Gram penalty."""
        t = self.draw_t(len(x0))
        eps = torch.randn_like(x0)
        x_t = torch.lerp(x0, eps, t[:, None, None, None])
        with self.autocast():
            pred = self.net(x_t, t)
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
    def denoise(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Euler steps of the lerp path from t = 1 (noise) to t = 0: predict x_0, infer the noise
        (x - (1 - t) x_0) / t, re-lerp at the next t. ``record`` collects the last step's weights."""
        steps = int(self.cfg["sample_steps"])
        n = x.shape[0]
        for i in range(steps):
            t, t_next = 1.0 - i / steps, 1.0 - (i + 1) / steps
            with self.autocast():
                x0, w = self.ema(x, torch.full((n,), t, device=self.device), return_weights=True)
            x0 = x0.float().clamp(-1, 1)
            eps = (x - (1 - t) * x0) / t
            x = torch.lerp(x0, eps, t_next) if t_next > 0 else x0
            if record is not None and i == steps - 1 and w is not None:
                record.append(w.float())
        return x.clamp(-1, 1)

    def sample(self, n: int, seed) -> torch.Tensor:
        gen = cpu_generator(seed)
        x = noise((n, 3, self.image_size, self.image_size), gen, self.device)
        with self.sampling(self.ema, seed=gen):
            return self.denoise(x)

    def dictionary_usage(self, n: int, seed: int, batch: int = 32) -> dict[str, float]:
        """Perplexity of the average dictionary weights over ``n`` samples' final denoising step
        (|w| normalised for tanh) and how many entries hold more than 0.1/K of it."""
        if not self.net.use_dictionary:
            return {}
        rec: list[torch.Tensor] = []
        for b, start in enumerate(range(0, n, batch)):
            gen = cpu_generator(seed + b)
            x = noise((min(batch, n - start), 3, self.image_size, self.image_size), gen, self.device)
            with self.sampling(self.ema, seed=gen):
                self.denoise(x, record=rec)
        w = torch.cat([r.reshape(-1, r.shape[-1]) for r in rec]).abs().mean(0).double()
        p = (w / w.sum()).cpu().numpy()
        nz = p[p > 0]
        k = len(p)
        return {"dictionary_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                "dictionary_active": float((p > USAGE_FLOOR / k).sum())}

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

        from sweeper.pictures import save_grid

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


@register_metric("dictionary_usage", family="patch_lut")
def dictionary_usage_metric(ctx) -> dict[str, float]:
    """``dictionary_perplexity`` (effective entries in use) and ``dictionary_active`` (entries
    above 0.1/K of the average weight) over the final denoising step of generated images."""
    return ctx.model.dictionary_usage(min(USAGE_SAMPLES, int(ctx.cfg["n_gen"])), ctx.seed, int(ctx.cfg["batch_size"]))

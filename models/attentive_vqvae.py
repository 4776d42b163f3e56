"""Attentive VQ-VAE (arXiv 2309.11641): an attentive residual encoder, a codebook, a decoder, and a
prior over the codes that makes it a generator.

    fam = build_model({"family": "attentive_vqvae", **AttentiveVQVAE.DEFAULTS, **AttentiveVQVAE.TINY}, image_size=32)
    losses = fam.train_step(real, step=0)  # real: (n, 3, 32, 32) in [-1, 1]; autoencoder phase
    losses = fam.train_step(real, step=prior_start_step)  # prior phase: the autoencoder is frozen
    img = fam.sample(4, seed=0)            # codes drawn from the prior (uniform before it trained), decoded

The memory is the codebook (``codebook_size``, the memory-size axis). Two phases share one
``train_step``: before ``prior_start_step`` the autoencoder (and the PatchGAN discriminator when
``adversarial_weight > 0``) trains; from it on a small autoregressive transformer learns the codes of
the training images in raster order, and the autoencoder is frozen (``freeze_autoencoder``).

The paper's comparison is configuration: ``levels: 1, attention: true`` (pixel attention alone)
against ``levels: 2`` or ``3, attention: false`` (the hierarchical encoder).

Choices where the paper is open (README, "Attentive VQ-VAE (`attentive_vqvae`)"): Id-ResBlocks are VQ-VAE's
(ReLU, 3x3, ReLU, 1x1, plus the input); Conv-ResBlocks a stride-2 4x4 conv path beside a stride-2
1x1 shortcut; constant width; the decoder decodes the bottom grid only (the upper levels shape what
the bottom codes hold, so the prior models one grid); upper codes are resized by nearest
neighbour; g1/g2 start with a bias pair that makes W start near 0 (the layer starts near the
identity; the formula is unchanged); the PatchGAN uses instance norm and the hinge loss with a
fixed weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, distributed, register_model
from sweeper.metric_registry import register_metric

# g1's and g2's first filters start with biases +a and -a: every logit g1(x_i) . g2(x_j) starts
# near -a^2 = -6, so W starts near sigmoid(-6) = 0.0025 and x + W x near x (a residual layer that
# starts as the identity, as SAGAN's gamma = 0 does). The formula itself is untouched.
ATTENTION_START_LOGIT = -6.0
RECON_PICTURE_IMAGES = 8  # inputs beside their reconstructions in the evaluation picture
METRIC_IMAGES = 1000  # at most this many training images enter the reconstruction/code metrics


# ---------------------------------------------------------------------------- building blocks
class IdResBlock(nn.Module):
    """Keeps the shape: ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input (VQ-VAE's block)."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvResBlock(nn.Module):
    """Halves the resolution: ReLU, stride-2 4x4 conv, ReLU, 3x3 conv, plus a stride-2 1x1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class UpResBlock(nn.Module):
    """The decoder's mirror of :class:`ConvResBlock`: doubles the resolution (transposed conv path,
    nearest-upsampled 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(F.interpolate(x, scale_factor=2, mode="nearest")) + self.body(x)


class PixelAttention(nn.Module):
    """Residual pixel attention: W_ij = sigmoid(g1(x_i) . g2(x_j)) over the positions, x <- x + W x.

    A sigmoid, not a softmax: rows of W are not normalised, so a position gathers the (weighted)
    sum of the positions it matches, and nothing where no position matches. g1 and g2 are 1x1
    convolutions to ``filters`` channels; the (hw x hw) map makes the layer quadratic in positions.
    """

    def __init__(self, c: int, filters: int):
        super().__init__()
        self.g1, self.g2 = nn.Conv2d(c, filters, 1), nn.Conv2d(c, filters, 1)
        a = math.sqrt(-ATTENTION_START_LOGIT)
        with torch.no_grad():
            self.g1.bias.zero_()
            self.g2.bias.zero_()
            self.g1.bias[0], self.g2.bias[0] = a, -a

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hw, hw): W[b, i, j] = sigmoid(g1(x_i) . g2(x_j)), positions in raster order."""
        return torch.sigmoid(self.g1(x).flatten(2).transpose(1, 2) @ self.g2(x).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        wx = x.flatten(2) @ self.weights(x).transpose(1, 2)  # (B, C, hw): (W x)_i = sum_j W_ij x_j
        return x + wx.view(b, c, h, w)


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per latent vector, the straight-through estimator, commitment loss.

    ``update: ema``: entries are running means of the vectors assigned to them (no gradient; the
    codebook is a no-grad parameter). ``update: loss``: entries learn by gradient from the codebook
    loss ||sg[z] - e||^2. With ``restart``, an entry no latent vector chose for ``patience`` training
    steps is moved onto a random encoder output of the current batch (a dead-code restart). All
    updates happen in training mode only; evaluation and sampling never change the codebook.
    """

    def __init__(self, size: int, dim: int, update: str, decay: float, beta: float, restart: bool, patience: int):
        super().__init__()
        self.size, self.dim, self.update, self.decay, self.beta = size, dim, update, decay, beta
        self.restart, self.patience = restart, patience
        self.embed = nn.Parameter(torch.randn(size, dim), requires_grad=update == "loss")
        if update == "ema":
            # One pseudo-assignment of each entry to itself: an unused entry keeps its value
            # (embed_sum / cluster_size stays e), a used one moves toward its vectors' mean.
            self.register_buffer("cluster_size", torch.ones(size))
            self.register_buffer("embed_sum", self.embed.detach().clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        e = self.embed.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (quantised z with straight-through gradient, indices (B, h, w), loss)."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 under bf16 autocast too
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
            idx = self.nearest(flat.detach())
            e = self.embed.float()[idx]
            loss = self.beta * F.mse_loss(flat, e.detach())
            if self.update == "loss":
                loss = loss + F.mse_loss(e, flat.detach())
            if self.training and torch.is_grad_enabled():
                self._learn(flat.detach(), idx)
        e_map = e.detach().view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        # sg[e] + (z - sg[z]): the value is exactly the entry (z - z is exactly 0), the gradient is
        # z's alone (the straight-through estimator); z + sg[e - z] would round away from the entry.
        return e_map + (z - z.detach()), idx.view(b, h, w), loss

    @torch.no_grad()
    def _learn(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.size).float()
        sums = torch.zeros(self.size, self.dim, device=flat.device).index_add_(0, idx, flat) \
            if self.update == "ema" else None
        if distributed():  # every rank sees the whole global batch's statistics: codebooks stay identical
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.steps += 1
        used = counts > 0
        self.last_used[used] = self.steps
        if self.update == "ema":
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self.embed.data[used] = self.embed_sum[used] / self.cluster_size[used, None]
        if not self.restart:
            return
        dead = (self.steps - self.last_used) >= self.patience
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        new = flat[torch.randint(0, len(flat), (n_dead,), device=flat.device)]  # global RNG: seeded per step
        if distributed():
            dist.broadcast(new, 0)
        self.embed.data[dead] = new.to(self.embed.dtype)
        self.last_used[dead] = self.steps
        if self.update == "ema":
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = new


# ---------------------------------------------------------------------------- the autoencoder
class AREN(nn.Module):
    """Attentive residual encoder with its quantisers.

    Base: a 3x3 conv, then ``downsample`` x (Conv-ResBlock, ``res_blocks`` Id-ResBlocks). Level 1:
    Id-ResBlocks and the pixel attention at the base's resolution; each further level halves the
    resolution again (Conv-ResBlock, Id-ResBlocks, attention). Top-down, each upper level's output
    is quantised with its own codebook, resized (nearest) to the level below's grid, concatenated
    by channels with that level's output and combined by a 1x1 conv; the bottom level's result is
    quantised last and is what the decoder reads.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        w, d, r, levels = cfg["width"], cfg["code_dim"], cfg["res_blocks"], cfg["levels"]
        hidden = max(1, w // 2)

        def ids() -> list[nn.Module]:
            return [IdResBlock(w, hidden) for _ in range(r)]

        base: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1)]
        for _ in range(cfg["downsample"]):
            base += [ConvResBlock(w, w), *ids()]
        self.base = nn.Sequential(*base)
        self.levels = nn.ModuleList()
        for k in range(levels):
            blocks = ([ConvResBlock(w, w)] if k else []) + ids()
            if cfg["attention"]:
                blocks.append(PixelAttention(w, cfg["attention_filters"]))
            self.levels.append(nn.Sequential(*blocks))
        # to_code[k]: level k's output (plus the resized quantised level above, if any) -> code_dim
        self.to_code = nn.ModuleList(nn.Conv2d(w + (d if k < levels - 1 else 0), d, 1) for k in range(levels))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(cfg["codebook_size"], d, cfg["codebook_update"], cfg["codebook_decay"], cfg["commitment"],
                            cfg["dead_code_restart"], cfg["dead_code_patience"])
            for _ in range(levels)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Images -> (bottom quantised map (B, D, h, w), indices per level, bottom first, VQ losses)."""
        h = self.base(x)
        feats = []
        for level in self.levels:
            h = level(h)
            feats.append(h)
        above, codes, loss = None, [], x.new_zeros(())
        for k in reversed(range(len(feats))):
            f = feats[k]
            if above is not None:
                f = torch.cat([f, F.interpolate(above, size=f.shape[-2:], mode="nearest")], dim=1)
            above, idx, l = self.quantizers[k](self.to_code[k](f))
            codes.insert(0, idx)
            loss = loss + l
        return above, codes, loss


class Decoder(nn.Module):
    """Mirrors the base encoder on the bottom grid: 3x3 conv, Id-ResBlocks, then ``downsample`` x
    (Up-ResBlock, Id-ResBlocks), ReLU, 3x3 conv to RGB."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        w, r = cfg["width"], cfg["res_blocks"]
        hidden = max(1, w // 2)
        layers: list[nn.Module] = [nn.Conv2d(cfg["code_dim"], w, 3, padding=1)]
        layers += [IdResBlock(w, hidden) for _ in range(r)]
        for _ in range(cfg["downsample"]):
            layers += [UpResBlock(w, w)] + [IdResBlock(w, hidden) for _ in range(r)]
        layers += [nn.ReLU(), nn.Conv2d(w, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.net(q)


class Autoencoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.encoder, self.decoder = AREN(cfg), Decoder(cfg)

    @property
    def codebook(self) -> torch.Tensor:
        """The bottom level's codebook (K, D): what the prior's codes index."""
        return self.encoder.quantizers[0].embed

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Bottom-grid indices (B, h, w) -> images."""
        return self.decoder(self.codebook[codes].permute(0, 3, 1, 2))


def patchgan(width: int, layers: int) -> nn.Sequential:
    """pix2pix's PatchGAN (n_layers = ``layers``), instance-normalised: one logit per patch."""
    seq: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
    c = width
    for i in range(1, layers + 1):
        nxt = width * min(2**i, 8)
        seq += [nn.Conv2d(c, nxt, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                nn.InstanceNorm2d(nxt, affine=True), nn.LeakyReLU(0.2)]
        c = nxt
    seq.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
    return nn.Sequential(*seq)


# ---------------------------------------------------------------------------- the prior
class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal attention; ``cache`` holds keys/values for sampling."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # one new position: it may look at every cached one
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=cache is None)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CodePrior(nn.Module):
    """An autoregressive transformer over the bottom grid's codes in raster order.

    Input at position t: a start token (t = 0) or the embedding of code t-1, plus a learned
    position; output: logits over the K codes of position t. The code embeddings are the output
    head's rows (weight tying, as GPT-2), so every row learns even for codes the data never uses.
    """

    def __init__(self, codes: int, length: int, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.codes, self.length = codes, length
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codes, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) -> logits (B, T, K) predicting each code from the ones before it."""
        b = codes.shape[0]
        x = torch.cat([self.start.expand(b, 1, -1), F.embedding(codes[:, :-1], self.head.weight)], 1)
        x = self.drop(x + self.pos[: codes.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))

    def nll(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats."""
        logits = self(codes)
        return F.cross_entropy(logits.float().reshape(-1, self.codes), codes.reshape(-1))

    def generate(self, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
        """Codes (B, T) drawn position by position (keys and values cached); ``uniforms`` (B, T) in
        [0, 1) pick each code by inverting the cumulative distribution, so the caller's seed fixes
        every draw on any device."""
        b, t_len = uniforms.shape
        caches: list[dict] = [{} for _ in self.blocks]
        x = (self.start + self.pos[0]).expand(b, 1, -1)
        out = []
        for t in range(t_len):
            h = x
            for blk, cache in zip(self.blocks, caches):
                h = blk(h, cache)
            probs = torch.softmax(self.head(self.ln(h[:, -1])).float() / temperature, -1)
            code = torch.searchsorted(probs.cumsum(-1), uniforms[:, t : t + 1].contiguous(), right=True)
            code = code.clamp_max(self.codes - 1)
            out.append(code)
            if t + 1 < t_len:
                x = F.embedding(code, self.head.weight) + self.pos[t + 1]
        return torch.cat(out, 1)


# ---------------------------------------------------------------------------- the family
@register_model("attentive_vqvae")
class AttentiveVQVAE(ModelFamily):
    DEFAULTS: dict[str, Any] = {
        "width": 128,  # channels of every encoder/decoder stage
        "res_blocks": 2,  # Id-ResBlocks after each Conv-ResBlock (and in each AREN level)
        "downsample": 3,  # Conv-ResBlocks of the base encoder: the bottom grid is image_size / 2^downsample
        "levels": 1,  # AREN levels, 1-3; each level above halves the grid again and has its own codebook
        "attention": True,  # residual pixel attention at the end of every level
        "attention_filters": 16,  # output channels of g1 and g2
        "codebook_size": 512,  # K, entries per codebook (the memory-size axis)
        "code_dim": 64,  # D, length of a codebook entry
        "commitment": 0.25,  # beta of the commitment loss ||z - sg[e]||^2
        "codebook_update": "ema",  # ema (running means) | loss (gradient of ||sg[z] - e||^2)
        "codebook_decay": 0.99,  # EMA decay of the codebook statistics
        "dead_code_restart": True,  # move entries unused for dead_code_patience steps onto encoder outputs
        "dead_code_patience": 100,
        "recon_loss": "l1",  # l1 | l2
        "adversarial_weight": 0.1,  # weight of the PatchGAN generator loss; 0 = no discriminator
        "adversarial_start": 0,  # autoencoder step at which the adversarial loss starts
        "disc_width": 64,  # PatchGAN: first layer's channels
        "disc_layers": 3,  # PatchGAN: stride-2 layers (pix2pix's n_layers)
        "lr": 2.0e-4,  # Adam, autoencoder and discriminator
        "betas": [0.5, 0.9],
        "prior_start_step": 20000,  # steps of the autoencoder phase; the prior trains from this step on
        "freeze_autoencoder": True,  # false: the autoencoder keeps training during the prior phase
        "prior": {
            "dim": 256,
            "layers": 8,
            "heads": 8,
            "dropout": 0.1,
            "lr": 3.0e-4,  # AdamW
            "betas": [0.9, 0.95],
            "temperature": 1.0,  # sampling temperature of the code distribution
        },
    }
    TINY: dict[str, Any] = {
        "width": 8, "res_blocks": 1, "downsample": 2, "levels": 2, "attention_filters": 4, "codebook_size": 16,
        "code_dim": 4, "dead_code_patience": 3, "disc_width": 4, "disc_layers": 2, "prior_start_step": 10,
        "prior": {"dim": 16, "layers": 1, "heads": 2},
    }

    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        need, p = cls.need, cfg["prior"]

        def pos_int(key: str, value: Any, low: int = 1) -> None:
            need(isinstance(value, int) and not isinstance(value, bool) and value >= low, key,
                 f"must be an integer >= {low}, got {value!r}")

        def flag(key: str, value: Any) -> None:
            need(isinstance(value, bool), key, f"use true or false, got {value!r}")

        def betas(key: str, value: Any) -> None:
            need(isinstance(value, list) and len(value) == 2 and all(0 <= b < 1 for b in value), key,
                 f"must be two numbers in [0, 1), got {value!r}")

        pos_int("width", cfg["width"])
        pos_int("res_blocks", cfg["res_blocks"], 0)
        pos_int("downsample", cfg["downsample"])
        pos_int("levels", cfg["levels"])
        need(cfg["levels"] <= 3, "levels", f"the AREN encoder has 1 to 3 levels, got {cfg['levels']}")
        top = image_size // 2 ** (cfg["downsample"] + cfg["levels"] - 1)
        need(top >= 2, "downsample",
             f"{cfg['downsample']} halvings and {cfg['levels']} level(s) leave a {top}x{top} top grid at "
             f"{image_size} px; use fewer halvings or levels (the top grid must be at least 2x2)")
        flag("attention", cfg["attention"])
        pos_int("attention_filters", cfg["attention_filters"])
        pos_int("codebook_size", cfg["codebook_size"], 2)
        pos_int("code_dim", cfg["code_dim"])
        need(cfg["commitment"] >= 0, "commitment", f"must be >= 0, got {cfg['commitment']}")
        need(cfg["codebook_update"] in ("ema", "loss"), "codebook_update",
             f"{cfg['codebook_update']!r}: use ema or loss")
        need(0 <= cfg["codebook_decay"] < 1, "codebook_decay", f"must be in [0, 1), got {cfg['codebook_decay']}")
        flag("dead_code_restart", cfg["dead_code_restart"])
        pos_int("dead_code_patience", cfg["dead_code_patience"])
        need(cfg["recon_loss"] in ("l1", "l2"), "recon_loss", f"{cfg['recon_loss']!r}: use l1 or l2")
        need(cfg["adversarial_weight"] >= 0, "adversarial_weight",
             f"must be >= 0 (0 turns the discriminator off), got {cfg['adversarial_weight']}")
        pos_int("adversarial_start", cfg["adversarial_start"], 0)
        pos_int("disc_width", cfg["disc_width"])
        pos_int("disc_layers", cfg["disc_layers"])
        need(image_size // 2 ** cfg["disc_layers"] >= 4, "disc_layers",
             f"{cfg['disc_layers']} stride-2 layers leave less than 4x4 at {image_size} px; "
             f"use at most {int(math.log2(image_size // 4))}")
        need(cfg["lr"] > 0, "lr", f"must be > 0, got {cfg['lr']}")
        betas("betas", cfg["betas"])
        pos_int("prior_start_step", cfg["prior_start_step"], 0)
        flag("freeze_autoencoder", cfg["freeze_autoencoder"])
        pos_int("prior.heads", p["heads"])
        pos_int("prior.dim", p["dim"])
        need(p["dim"] % p["heads"] == 0, "prior.dim", f"{p['dim']} must be divisible by prior.heads ({p['heads']})")
        pos_int("prior.layers", p["layers"])
        need(0 <= p["dropout"] < 1, "prior.dropout", f"must be in [0, 1), got {p['dropout']}")
        need(p["lr"] > 0, "prior.lr", f"must be > 0, got {p['lr']}")
        betas("prior.betas", p["betas"])
        need(p["temperature"] > 0, "prior.temperature", f"must be > 0, got {p['temperature']}")

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        torch.manual_seed(seed)
        p = cfg["prior"]
        self.grid = image_size // 2 ** cfg["downsample"]
        self.autoencoder = Autoencoder(cfg).to(self.device)
        self.discriminator = patchgan(cfg["disc_width"], cfg["disc_layers"]).to(self.device) \
            if cfg["adversarial_weight"] > 0 else None
        self.prior = CodePrior(cfg["codebook_size"], self.grid**2, p["dim"], p["layers"], p["heads"],
                               p["dropout"]).to(self.device)
        trained = [q for q in self.autoencoder.parameters() if q.requires_grad]  # not an EMA codebook
        self.opt_ae = torch.optim.Adam(trained, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"])) \
            if self.discriminator is not None else None
        self.opt_prior = torch.optim.AdamW(self.prior.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                           weight_decay=0.0)
        self.prior_steps = 0  # prior updates so far: 0 means samples are uniform codes (pre-prior)

    def networks(self) -> dict[str, nn.Module]:
        nets = {"autoencoder": self.autoencoder, "prior": self.prior}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    @property
    def prior_trained(self) -> bool:
        return self.prior_steps > 0

    # ------------------------------------------------------------------ training
    def recon(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean() if self.cfg["recon_loss"] == "l1" else (a - b).pow(2).mean()

    def autoencoder_step(self, real: torch.Tensor, step: int) -> tuple[dict[str, float], torch.Tensor]:
        """Reconstruction + VQ losses (+ the PatchGAN's hinge loss), one update of each network.
        Returns the losses and the bottom codes of the batch."""
        cfg = self.cfg
        adversarial = self.discriminator is not None and step >= cfg["adversarial_start"]
        with self.autocast():
            q, codes, vq_loss = self.autoencoder.encoder(real)
            rec = self.autoencoder.decoder(q).float()
            loss_rec = self.recon(rec, real)
            loss = loss_rec + vq_loss.float()
            out = {"loss_rec": loss_rec.item(), "loss_vq": vq_loss.item()}
            if adversarial:
                loss_g = -self.discriminator(rec).float().mean()
                loss = loss + cfg["adversarial_weight"] * loss_g
                out["loss_g"] = loss_g.item()
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(self.autoencoder)
        self.opt_ae.step()
        if adversarial:
            with self.autocast():
                loss_d = F.relu(1 - self.discriminator(real).float()).mean() \
                    + F.relu(1 + self.discriminator(rec.detach()).float()).mean()
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.average_gradients(self.discriminator)
            self.opt_d.step()
            out["loss_d"] = loss_d.item()
        return out, codes[0]

    def encode_codes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Indices per level (bottom first) of images in [-1, 1]; eval mode, no state change."""
        with self.sampling(self.autoencoder), self.autocast():
            return self.autoencoder.encoder(images)[1]

    def train_step(self, batch: torch.Tensor, step: int = 0) -> dict[str, float]:
        """Autoencoder phase before ``prior_start_step``; prior phase from it on (the autoencoder
        frozen unless ``freeze_autoencoder: false``)."""
        real = batch.to(self.device)
        prior_phase = step >= self.cfg["prior_start_step"]
        out: dict[str, float] = {}
        codes = None
        if not prior_phase or not self.cfg["freeze_autoencoder"]:
            out, codes = self.autoencoder_step(real, step)
        if prior_phase:
            if codes is None:
                codes = self.encode_codes(real)[0]
            with self.autocast():
                loss_prior = self.prior.nll(codes.detach().flatten(1))
            self.opt_prior.zero_grad(set_to_none=True)
            loss_prior.backward()
            self.average_gradients(self.prior)
            self.opt_prior.step()
            self.prior_steps += 1
            out["loss_prior"] = loss_prior.item()
        return out

    # ------------------------------------------------------------------ sampling
    def generate(self, n: int, seed) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (n, 3, S, S) in [-1, 1], bottom codes (n, h, w)) from ``seed``. Codes come from the
        prior, or uniformly from the codebook while the prior has not trained."""
        gen = cpu_generator(seed)
        g = self.grid
        u = torch.rand((n, g * g), generator=gen).to(self.device)
        with self.sampling(self.autoencoder, self.prior, seed=gen), self.autocast():
            if self.prior_trained:
                codes = self.prior.generate(u, float(self.cfg["prior"]["temperature"]))
            else:
                k = self.cfg["codebook_size"]
                codes = (u * k).long().clamp_max(k - 1)
            codes = codes.view(n, g, g)
            images = self.autoencoder.decode_codes(codes).float().clamp(-1, 1)
        return images, codes

    def sample(self, n: int, seed) -> torch.Tensor:
        return self.generate(n, seed)[0]

    def cluster_assignments(self, n: int, seed):
        """(samples, the code at each bottom-grid position, K): the built-in cluster-usage metric
        draws these as the code-usage map and reports ``cluster_perplexity`` over them."""
        images, codes = self.generate(n, seed)
        return images, codes, int(self.cfg["codebook_size"])

    # ------------------------------------------------------------------ evaluation
    def code_metrics(self, real_u8: torch.Tensor, batch: int = 50, picture: str | None = None) -> dict[str, float]:
        """Reconstruction error, active codebook entries, code perplexity and the prior's NLL on
        the training images (uint8); with ``picture``, inputs above their reconstructions."""
        real_u8 = real_u8[:METRIC_IMAGES]
        levels = self.cfg["levels"]
        k = self.cfg["codebook_size"]
        counts = [torch.zeros(k, dtype=torch.long) for _ in range(levels)]
        abs_err, psnr, nll, n_codes = 0.0, 0.0, 0.0, 0
        shown: list[torch.Tensor] = []
        with self.sampling(self.autoencoder, self.prior), self.autocast():
            for start in range(0, len(real_u8), batch):
                x = real_u8[start : start + batch].to(self.device).float() / 127.5 - 1
                q, codes, _ = self.autoencoder.encoder(x)
                rec = self.autoencoder.decoder(q).float().clamp(-1, 1)
                err = (rec - x) / 2  # in [0, 1] pixel units
                abs_err += float(err.abs().mean(dim=(1, 2, 3)).sum())
                mse = err.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
                psnr += float((-10 * torch.log10(mse)).sum())
                for lvl, c in enumerate(codes):
                    counts[lvl] += torch.bincount(c.flatten().cpu(), minlength=k)
                flat = codes[0].flatten(1)
                nll += float(self.prior.nll(flat)) * flat.numel()
                n_codes += flat.numel()
                if picture and sum(len(s) for s in shown) < RECON_PICTURE_IMAGES:
                    shown.append(torch.stack([x, rec], 1))
        n = len(real_u8)
        p = counts[0].double() / counts[0].sum()
        p = p[p > 0]
        out = {
            "recon_mae": abs_err / n,
            "recon_psnr": psnr / n,
            "active_codes": float((counts[0] > 0).sum()),
            "code_perplexity": float(torch.exp(-(p * p.log()).sum())),
            "prior_nll": nll / n_codes,
            "prior_trained": float(self.prior_trained),
        }
        for lvl in range(1, levels):
            out[f"active_codes_l{lvl + 1}"] = float((counts[lvl] > 0).sum())
        if picture:
            from sweeper.pictures import save_grid

            pairs = torch.cat(shown)[:RECON_PICTURE_IMAGES]  # (m, 2, 3, S, S): input, reconstruction
            tiles = ((pairs.transpose(0, 1).reshape(-1, *pairs.shape[2:]) + 1) * 127.5).round().clamp(0, 255)
            save_grid(tiles.to(torch.uint8).cpu(), picture, nrow=len(pairs))  # row 1 inputs, row 2 reconstructions
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = {
            "autoencoder": self.autoencoder.state_dict(),
            "prior": self.prior.state_dict(),
            "opt_ae": self.opt_ae.state_dict(),
            "opt_prior": self.opt_prior.state_dict(),
            "prior_steps": self.prior_steps,
        }
        if self.discriminator is not None:
            sd["discriminator"] = self.discriminator.state_dict()
            sd["opt_d"] = self.opt_d.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.autoencoder.load_state_dict(sd["autoencoder"])
        self.prior.load_state_dict(sd["prior"])
        self.opt_ae.load_state_dict(sd["opt_ae"])
        self.opt_prior.load_state_dict(sd["opt_prior"])
        self.prior_steps = int(sd["prior_steps"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(sd["discriminator"])
            self.opt_d.load_state_dict(sd["opt_d"])


@register_metric("vq_codes", family="attentive_vqvae")
def vq_codes_metric(ctx) -> dict[str, float]:
    """On the training images: ``recon_mae`` (pixels in [0, 1]) and ``recon_psnr`` (dB),
    ``active_codes`` (codebook entries some position uses; ``active_codes_l2``/``_l3`` for upper
    levels), ``code_perplexity``, ``prior_nll`` (nats per code) and ``prior_trained`` (0: the
    generation metrics of this evaluation come from uniform codes, before the prior trained).
    Writes inputs above their reconstructions."""
    path = ctx.path("reconstructions")
    out = ctx.model.code_metrics(ctx.real_images, int(ctx.cfg["batch_size"]), picture=path)
    ctx.add_artifact(path)
    return out

"""Attentive VQ-VAE (arXiv 2309.11641): an attentive residual encoder, a codebook per level, a
decoder that reads every level, and a prior over the codes that makes it a generator.

    fam = build_model({"family": "attentive_vqvae", **AttentiveVQVAE.DEFAULTS, **AttentiveVQVAE.TINY}, image_size=32)
    losses = fam.train_step(real, step=0)  # real: (n, 3, 32, 32) in [-1, 1]; autoencoder phase
    losses = fam.train_step(real, step=prior_start_step)  # prior phase: the autoencoder is frozen
    fam.generation_ready                   # True once the prior has learned (READY_* below)
    img = fam.sample(4, seed=0)            # every level's codes drawn from the prior, decoded

The memory is the codebook (``codebook_size``, the memory-size axis). Two phases share one
``train_step``: before ``prior_start_step`` the autoencoder (and the PatchGAN discriminator when
``adversarial_weight > 0``) trains; from it on a small autoregressive transformer learns the codes
of the training images, every level's in one sequence (top grid first), and the autoencoder is
frozen (``freeze_autoencoder``). The networks live in ``models/aren.py`` (encoder, attention,
decoder), ``models/vector_quantizer.py`` and ``models/code_prior.py``.

The paper's comparison is configuration: ``levels: 1, attention: true`` (pixel attention alone)
against ``levels: 2`` or ``3, attention: false`` (the hierarchical encoder).

Choices where the paper is open are written in models/README.md, "Attentive VQ-VAE".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, distributed, register_model
from models.aren import Autoencoder
from models.code_prior import CodePrior, from_sequence, to_sequence
from sweeper.eval.distances import frechet_to_reference
from sweeper.eval.registry import register_metric

RECON_PICTURE_IMAGES = 8  # inputs beside their reconstructions in the evaluation picture
METRIC_IMAGES = 1000  # at most this many images (training or held-out) enter the reconstruction/code metrics
# Generation-ready rule: the prior has learned something beyond how often each code occurs. Its
# running training NLL (an EMA over prior steps) must be READY_MARGIN nats per code below the
# entropy of the codes' frequencies (the best a prior that ignores context can do; log K when
# every code is equally used), after at least READY_MIN_STEPS prior steps. A (nearly) collapsed
# codebook has a frequency entropy near 0 that no prior can beat; there a running NLL within
# READY_CERTAIN x log K of certainty suffices (the prior explains 90 % of the uniform code length).
# Once met it stays met (models/README.md, "Attentive VQ-VAE": the measurements behind it).
READY_MIN_STEPS = 20
READY_MARGIN = 0.05
READY_CERTAIN = 0.1
PRIOR_NLL_DECAY = 0.9  # the running NLL's decay: about the last 10 prior steps


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


def entropy(counts: torch.Tensor) -> float:
    """Entropy in nats of the distribution proportional to ``counts``."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def to_u8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 as a PNG would hold them."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


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
    LOSSES = ("loss_rec", "loss_vq", "loss_g", "loss_d", "loss_prior")  # what train_step returns (checked in tests/test_family_contract.py)
    HEADLINE = ("recon_mae_heldout", "code_perplexity", "prior_nll")  # the codebook and its prior
    TINY: dict[str, Any] = {
        "width": 8, "res_blocks": 1, "downsample": 2, "levels": 2, "attention_filters": 4, "codebook_size": 16,
        "code_dim": 4, "dead_code_patience": 3, "disc_width": 4, "disc_layers": 2, "prior_start_step": 10,
        "prior": {"dim": 16, "layers": 1, "heads": 2},
    }


    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        cls.validate_encoder(cfg, image_size)
        cls.validate_training(cfg, image_size)
        cls.validate_prior(cfg["prior"])

    @classmethod
    def pos_int(cls, key: str, value: Any, low: int = 1) -> None:
        cls.need(isinstance(value, int) and not isinstance(value, bool) and value >= low, key,
                 f"must be an integer >= {low}, got {value!r}")

    @classmethod
    def flag(cls, key: str, value: Any) -> None:
        cls.need(isinstance(value, bool), key, f"use true or false, got {value!r}")

    @classmethod
    def betas(cls, key: str, value: Any) -> None:
        cls.need(isinstance(value, list) and len(value) == 2 and all(0 <= b < 1 for b in value), key,
                 f"must be two numbers in [0, 1), got {value!r}")

    @classmethod
    def validate_encoder(cls, cfg: dict[str, Any], image_size: int) -> None:
        need, pos_int = cls.need, cls.pos_int
        pos_int("width", cfg["width"])
        pos_int("res_blocks", cfg["res_blocks"], 0)
        pos_int("downsample", cfg["downsample"])
        pos_int("levels", cfg["levels"])
        need(cfg["levels"] <= 3, "levels", f"the AREN encoder has 1 to 3 levels, got {cfg['levels']}")
        top = image_size // 2 ** (cfg["downsample"] + cfg["levels"] - 1)
        need(top >= 2, "downsample",
             f"{cfg['downsample']} halvings and {cfg['levels']} level(s) leave a {top}x{top} top grid at "
             f"{image_size} px; use fewer halvings or levels (the top grid must be at least 2x2)")
        cls.flag("attention", cfg["attention"])
        pos_int("attention_filters", cfg["attention_filters"])
        pos_int("codebook_size", cfg["codebook_size"], 2)
        pos_int("code_dim", cfg["code_dim"])
        need(cfg["commitment"] >= 0, "commitment", f"must be >= 0, got {cfg['commitment']}")
        need(cfg["codebook_update"] in ("ema", "loss"), "codebook_update",
             f"{cfg['codebook_update']!r}: use ema or loss")
        need(0 <= cfg["codebook_decay"] < 1, "codebook_decay", f"must be in [0, 1), got {cfg['codebook_decay']}")
        cls.flag("dead_code_restart", cfg["dead_code_restart"])
        pos_int("dead_code_patience", cfg["dead_code_patience"])

    @classmethod
    def validate_training(cls, cfg: dict[str, Any], image_size: int) -> None:
        need, pos_int = cls.need, cls.pos_int
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
        cls.betas("betas", cfg["betas"])
        pos_int("prior_start_step", cfg["prior_start_step"], 0)
        cls.flag("freeze_autoencoder", cfg["freeze_autoencoder"])

    @classmethod
    def validate_prior(cls, p: dict[str, Any]) -> None:
        need, pos_int = cls.need, cls.pos_int
        pos_int("prior.heads", p["heads"])
        pos_int("prior.dim", p["dim"])
        need(p["dim"] % p["heads"] == 0, "prior.dim", f"{p['dim']} must be divisible by prior.heads ({p['heads']})")
        pos_int("prior.layers", p["layers"])
        need(0 <= p["dropout"] < 1, "prior.dropout", f"must be in [0, 1), got {p['dropout']}")
        need(p["lr"] > 0, "prior.lr", f"must be > 0, got {p['lr']}")
        cls.betas("prior.betas", p["betas"])
        need(p["temperature"] > 0, "prior.temperature", f"must be > 0, got {p['temperature']}")

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        torch.manual_seed(seed)
        p, levels, k = cfg["prior"], cfg["levels"], cfg["codebook_size"]
        self.grids = [image_size // 2 ** (cfg["downsample"] + lvl) for lvl in range(levels)]  # bottom first
        self.grid = self.grids[0]
        self.autoencoder = Autoencoder(cfg, self.grid).to(self.device)
        self.discriminator = patchgan(cfg["disc_width"], cfg["disc_layers"]).to(self.device) \
            if cfg["adversarial_weight"] > 0 else None
        self.prior = CodePrior(k, [g * g for g in self.grids], p["dim"], p["layers"], p["heads"],
                               p["dropout"]).to(self.device)
        trained = [q for q in self.autoencoder.parameters() if q.requires_grad]  # not an EMA codebook
        self.opt_ae = torch.optim.Adam(trained, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"])) \
            if self.discriminator is not None else None
        self.opt_prior = torch.optim.AdamW(self.prior.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                           weight_decay=0.0)
        self.prior_steps = 0  # prior updates so far: 0 means samples are uniform codes
        self.prior_nll_running = math.log(k)  # EMA of the prior's training NLL (nats per code)
        self.code_counts = torch.zeros(levels, k, dtype=torch.long)  # codes the prior trained on, per level
        self.ready_at = -1  # the prior step at which generation became ready; -1: not yet

    def networks(self) -> dict[str, nn.Module]:
        nets = {"autoencoder": self.autoencoder, "prior": self.prior}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    # ------------------------------------------------------------------ readiness
    @property
    def generation_ready(self) -> bool:
        """True once the prior has learned more than the codes' frequencies (``READY_*``): only then
        are samples generations; before, the evaluator reports reconstruction metrics only."""
        return self.ready_at >= 0

    def frequency_nll(self) -> float:
        """NLL per code (nats) of the best context-free prior: each level's code frequencies (over
        every code the prior trained on), weighted by the level's share of the sequence."""
        sizes = [g * g for g in self.grids]
        return sum(n * entropy(c) for n, c in zip(sizes, self.code_counts)) / sum(sizes)

    def track_readiness(self, loss: torch.Tensor, codes: list[torch.Tensor]) -> None:
        """After a prior update: the running NLL and the code counts (summed over data-parallel
        ranks, so every rank agrees), then the readiness rule."""
        k = self.cfg["codebook_size"]
        counts = torch.stack([torch.bincount(c.flatten(), minlength=k) for c in codes]).to(torch.float64)
        stats = torch.cat([loss.detach().double().view(1), counts.flatten()])
        if distributed():
            stats = stats.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(stats)
            stats[0] /= dist.get_world_size()
        stats = stats.cpu()
        self.prior_steps += 1
        first = self.prior_steps == 1
        self.prior_nll_running = float(stats[0]) if first else \
            PRIOR_NLL_DECAY * self.prior_nll_running + (1 - PRIOR_NLL_DECAY) * float(stats[0])
        self.code_counts += stats[1:].view_as(self.code_counts).round().long()
        if self.ready_at < 0 and self.prior_steps >= READY_MIN_STEPS \
                and self.prior_nll_running <= self.ready_threshold():
            self.ready_at = self.prior_steps

    def ready_threshold(self) -> float:
        """The running NLL (nats per code) at or below which generation is ready: READY_MARGIN
        below the codes' frequency entropy, or READY_CERTAIN log K when that is higher (a collapsed
        codebook: nothing is left to learn beyond certainty, and the trial still gets scored)."""
        return max(self.frequency_nll() - READY_MARGIN, READY_CERTAIN * math.log(self.cfg["codebook_size"]))

    def readiness(self) -> dict[str, float]:
        """``generation_ready`` (0/1), ``prior_steps``, and once the prior trains its running NLL
        and the context-free baseline it must beat (nats per code)."""
        out = {"generation_ready": float(self.generation_ready), "prior_steps": float(self.prior_steps)}
        if self.prior_steps:
            out.update(prior_nll_running=self.prior_nll_running, code_frequency_nll=self.frequency_nll())
        return out

    # ------------------------------------------------------------------ training
    def recon(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean() if self.cfg["recon_loss"] == "l1" else (a - b).pow(2).mean()

    def autoencoder_step(self, real: torch.Tensor, step: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Reconstruction + VQ losses (+ the PatchGAN's hinge loss), one update of each network.
        Returns the losses and the batch's codes per level (bottom first)."""
        cfg = self.cfg
        adversarial = self.discriminator is not None and step >= cfg["adversarial_start"]
        with self.autocast():
            qs, codes, vq_loss = self.autoencoder.encoder(real)
            rec = self.autoencoder.decoder(qs).float()
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
            out["loss_d"] = self.discriminator_step(real, rec.detach())
        return out, codes

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One hinge-loss update of the PatchGAN."""
        with self.autocast():
            loss_d = F.relu(1 - self.discriminator(real).float()).mean() \
                + F.relu(1 + self.discriminator(fake).float()).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.average_gradients(self.discriminator)
        self.opt_d.step()
        return loss_d.item()

    def encode_codes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Indices per level (bottom first) of images in [-1, 1]; eval mode, no state change."""
        with self.sampling(self.autoencoder), self.autocast():
            return self.autoencoder.encoder(images)[1]

    def prior_step(self, codes: list[torch.Tensor]) -> float:
        """One update of the prior on the joint code sequence; then the readiness statistics."""
        codes = [c.detach() for c in codes]
        with self.autocast():
            loss = self.prior.nll(to_sequence(codes))
        self.opt_prior.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(self.prior)
        self.opt_prior.step()
        self.track_readiness(loss, codes)
        return loss.item()

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
            out["loss_prior"] = self.prior_step(codes if codes is not None else self.encode_codes(real))
        return out

    # ------------------------------------------------------------------ sampling
    def generate(self, n: int, seed) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(images (n, 3, S, S) in [-1, 1], codes per level, bottom first) from ``seed``. Every
        level's codes come from the prior (the top grid first), or uniformly from the codebooks
        while the prior has had no update."""
        gen = cpu_generator(seed)
        u = torch.rand((n, self.prior.length), generator=gen).to(self.device)
        with self.sampling(self.autoencoder, self.prior, seed=gen), self.autocast():
            if self.prior_steps:
                seq = self.prior.generate(u, float(self.cfg["prior"]["temperature"]))
            else:
                k = self.cfg["codebook_size"]
                seq = (u * k).long().clamp_max(k - 1)
            codes = from_sequence(seq, self.grids)
            images = self.autoencoder.decode_codes(codes).float().clamp(-1, 1)
        return images, codes

    def sample(self, n: int, seed) -> torch.Tensor:
        return self.generate(n, seed)[0]

    def cluster_assignments(self, n: int, seed):
        """(samples, the code at each bottom-grid position, K) once generation is ready, else None
        (no ``cluster_perplexity`` of a sampler that has not learned): the built-in cluster-usage
        metric draws these as the code-usage map and reports ``cluster_perplexity`` over them."""
        if not self.generation_ready:
            return None
        images, codes = self.generate(n, seed)
        return images, codes[0], int(self.cfg["codebook_size"])

    # ------------------------------------------------------------------ evaluation
    def reconstruction_pass(self, images_u8: torch.Tensor, batch: int) -> tuple[dict[str, Any], torch.Tensor]:
        """One eval-mode pass over uint8 images: summed per-image errors, code counts and the
        prior's NLL (nats) per level, and the reconstructions as uint8."""
        levels, k = self.cfg["levels"], self.cfg["codebook_size"]
        acc: dict[str, Any] = {"abs_err": 0.0, "psnr": 0.0, "counts": torch.zeros(levels, k, dtype=torch.long),
                               "nll": torch.zeros(levels, dtype=torch.float64)}
        recons = []
        with self.sampling(self.autoencoder, self.prior), self.autocast():
            for start in range(0, len(images_u8), batch):
                x = images_u8[start : start + batch].to(self.device).float() / 127.5 - 1
                qs, codes, _ = self.autoencoder.encoder(x)
                rec = self.autoencoder.decoder(qs).float().clamp(-1, 1)
                err = (rec - x) / 2  # in [0, 1] pixel units
                acc["abs_err"] += float(err.abs().mean(dim=(1, 2, 3)).sum())
                mse = err.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
                acc["psnr"] += float((-10 * torch.log10(mse)).sum())
                for lvl, c in enumerate(codes):
                    acc["counts"][lvl] += torch.bincount(c.flatten().cpu(), minlength=k)
                per_position = self.prior.token_nll(to_sequence(codes)).double().sum(0).cpu()  # (T,)
                acc["nll"].index_add_(0, self.prior.level.cpu(), per_position)
                recons.append(to_u8(rec).cpu())
        return acc, torch.cat(recons)

    def code_report(self, images_u8: torch.Tensor, batch: int = 50, suffix: str = "") -> tuple[dict[str, float], torch.Tensor]:
        """Reconstruction error, codebook use and the prior's code length on (up to
        ``METRIC_IMAGES``) uint8 images, every name ending in ``suffix``; and the reconstructions."""
        images = images_u8[:METRIC_IMAGES]
        acc, recons = self.reconstruction_pass(images, batch)
        n, counts = len(images), acc["counts"]
        out = {
            "recon_mae": acc["abs_err"] / n,
            "recon_psnr": acc["psnr"] / n,
            "prior_nll": float(acc["nll"].sum()) / (n * self.prior.length),
            "code_perplexity": math.exp(entropy(counts[0])),
        }
        for lvl in range(self.cfg["levels"]):
            out["active_codes" + (f"_l{lvl + 1}" if lvl else "")] = float((counts[lvl] > 0).sum())
            out[f"prior_bits_l{lvl + 1}"] = float(acc["nll"][lvl]) / n / math.log(2)
        return {name + suffix: v for name, v in out.items()}, recons

    def code_bits(self) -> dict[str, float]:
        """``code_bits_l<k>``: what level k's codes can carry per image, positions x log2 K."""
        k = self.cfg["codebook_size"]
        return {f"code_bits_l{lvl + 1}": g * g * math.log2(k) for lvl, g in enumerate(self.grids)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = {
            "autoencoder": self.autoencoder.state_dict(),
            "prior": self.prior.state_dict(),
            "opt_ae": self.opt_ae.state_dict(),
            "opt_prior": self.opt_prior.state_dict(),
            "prior_steps": self.prior_steps,
            "prior_nll_running": self.prior_nll_running,
            "code_counts": self.code_counts.clone(),
            "ready_at": self.ready_at,
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
        self.prior_nll_running = float(sd["prior_nll_running"])
        self.code_counts = sd["code_counts"].clone().cpu()
        self.ready_at = int(sd["ready_at"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(sd["discriminator"])
            self.opt_d.load_state_dict(sd["opt_d"])


def save_reconstructions(images_u8: torch.Tensor, recons_u8: torch.Tensor, path: str) -> str:
    """Row 1: the first ``RECON_PICTURE_IMAGES`` inputs; row 2: their reconstructions."""
    from sweeper.eval.pictures import save_grid

    m = min(RECON_PICTURE_IMAGES, len(recons_u8))
    return save_grid(torch.cat([images_u8[:m].cpu(), recons_u8[:m]]), path, nrow=m)


@register_metric("vq_codes", family="attentive_vqvae", generation=False, reports=(
    "recon_*", "active_codes*", "code_perplexity*", "code_bits_l*", "prior_*", "generation_ready", "code_frequency_nll"))
def vq_codes_metric(ctx) -> dict[str, float]:
    """Needs no samples (it runs before generation is ready too). On the training images:
    ``recon_mae`` (pixels in [0, 1]), ``recon_psnr`` (dB), ``recon_<fd>`` (the Frechet distance of
    the reconstructions to the training set's reference: ``recon_fid`` with Inception features),
    ``active_codes`` (``_l2``/``_l3`` for upper levels), ``code_perplexity``, ``prior_nll`` (nats
    per code) and ``prior_bits_l<k>`` (the prior's code length of level k, bits per image), beside
    ``code_bits_l<k>`` (what level k can carry); the same with ``_heldout`` on the held-back
    images when the evaluation has them; ``generation_ready``, ``prior_steps`` and the readiness
    statistics. Writes inputs above their reconstructions."""
    fam, batch = ctx.model, int(ctx.cfg["batch_size"])
    out, recons = fam.code_report(ctx.real_images, batch)
    out.update(fam.code_bits())
    out.update(fam.readiness())
    if len(recons) >= 2:
        out[f"recon_{ctx.fd_name}"] = frechet_to_reference(ctx.extractor(recons), ctx.ref.gaussian, device=ctx.device)
    held = ctx.heldout_images
    if held is not None and len(held):
        out.update(fam.code_report(held, batch, suffix="_heldout")[0])
    ctx.add_artifact(save_reconstructions(ctx.real_images, recons, ctx.path("reconstructions")))
    return out

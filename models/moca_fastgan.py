"""MoCA-FastGAN: FastGAN with a MoCA layer after one generator block (the swept model family).

    fam = build_model({"family": "moca_fastgan", **MoCAFastGAN.DEFAULTS, "width": 0.125}, image_size=32)
    losses = fam.train_step(real, step=0)  # real: (n, 3, 32, 32) in [-1, 1]
    img = fam.sample(4, seed=0)            # G_ema on latents drawn from the seed

The paper's ablations are configuration: ``moca.clusters: 1`` (no clustering), ``moca.momentum: 0``
(no momentum encoder), ``moca.memory: off`` (self-attention only), ``moca.attention: off`` (plain
FastGAN, no layer at all).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelFamily, cpu_generator, ema_update, noise, register_model
from models.diffaug import POLICIES, diff_augment
from models.fastgan import Discriminator, Generator, crop_part, insertion_layers
from models.moca import MoCA
from sweeper.errors import SweeperError

_VGG_WEIGHTS = "vgg16-397923af.pth"  # torchvision's file name, which lpips loads through torch.hub


def lpips_available() -> bool:
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", _VGG_WEIGHTS))


def _fastgan_hinge_real(logits: torch.Tensor) -> torch.Tensor:
    # FastGAN's hinge with a random margin in [0.8, 1.0): a little label noise for D.
    return F.relu(torch.rand_like(logits) * 0.2 + 0.8 - logits).mean()


def _fastgan_hinge_fake(logits: torch.Tensor) -> torch.Tensor:
    return F.relu(torch.rand_like(logits) * 0.2 + 0.8 + logits).mean()


@register_model("moca_fastgan")
class MoCAFastGAN(ModelFamily):
    DEFAULTS: dict[str, Any] = {
        "width": 0.5,  # channel multiplier; 1.0 is FastGAN's published width
        "z_dim": 256,
        "lr": 2.0e-4,  # G and D (Adam), FastGAN's
        "betas": [0.5, 0.999],
        "ema_decay": 0.999,  # G_ema, which evaluation samples from
        "recon_loss": "auto",  # auto (lpips when its weights are available, else l1) | lpips | l1
        "diffaug": ["color", "translation", "cutout"],
        "moca": {
            "attention": True,  # off: plain FastGAN (no layer)
            "memory": True,  # off: self-attention path only
            "layer": None,  # feature resolution the layer follows; default min(64, image_size / 2)
            "clusters": 10,
            "memory_size": 100,  # prototypes per cluster (T)
            "momentum": 0.6,
            "dim": 128,
            "warmup_steps": 0,
            "write_rate": 1.0,
            "kmeans_iters": 10,
        },
    }
    LOSSES = ("loss_d_real", "loss_d_fake", "loss_rec", "loss_g")  # what train_step returns (checked in tests/test_family_contract.py)
    HEADLINE = ("cluster_perplexity",)  # prototypes in use (sweeper.eval.registry cluster_usage)
    TINY: dict[str, Any] = {"width": 0.0625, "z_dim": 16, "moca": {"layer": 16, "dim": 8, "clusters": 3, "memory_size": 4}}

    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        m, need = cfg["moca"], cls.need
        need(cfg["lr"] > 0, "lr", f"must be > 0, got {cfg['lr']}")
        need(isinstance(cfg["betas"], list) and len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]),
             "betas", f"must be two numbers in [0, 1), got {cfg['betas']!r}")
        need(0 <= cfg["ema_decay"] < 1, "ema_decay", f"must be in [0, 1), got {cfg['ema_decay']}")
        need(cfg["width"] > 0, "width", f"must be > 0, got {cfg['width']}")
        need(cfg["z_dim"] >= 1, "z_dim", f"must be >= 1, got {cfg['z_dim']}")
        need(cfg["recon_loss"] in ("auto", "lpips", "l1"), "recon_loss", f"{cfg['recon_loss']!r}: use auto, lpips or l1")
        bad = [p for p in cfg["diffaug"] if p not in POLICIES]
        need(not bad, "diffaug", f"unknown policy {bad}; choose from {list(POLICIES)}")
        if not m["attention"]:
            return
        valid = insertion_layers(image_size)
        layer = m["layer"] if m["layer"] is not None else min(64, image_size // 2)
        need(
            layer in valid,
            "moca.layer",
            f"insertion layer {layer} is not valid for {image_size} px images; valid layers: {valid}",
        )
        need(isinstance(m["memory_size"], int) and m["memory_size"] >= 1, "moca.memory_size",
             f"must be an integer >= 1, got {m['memory_size']!r}")
        need(isinstance(m["clusters"], int) and m["clusters"] >= 1, "moca.clusters",
             f"must be an integer >= 1, got {m['clusters']!r}")
        need(0.0 <= float(m["momentum"]) <= 1.0, "moca.momentum", f"must be in [0, 1], got {m['momentum']}")
        need(isinstance(m["dim"], int) and m["dim"] >= 1, "moca.dim", f"must be an integer >= 1, got {m['dim']!r}")
        need(m["warmup_steps"] >= 0, "moca.warmup_steps", f"must be >= 0, got {m['warmup_steps']}")
        need(isinstance(m["kmeans_iters"], int) and m["kmeans_iters"] >= 1, "moca.kmeans_iters",
             f"must be an integer >= 1, got {m['kmeans_iters']!r}")
        need(0.0 < float(m["write_rate"]) <= 1.0, "moca.write_rate", f"must be in (0, 1], got {m['write_rate']}")

    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        self.z_dim, self.ema_decay = cfg["z_dim"], cfg["ema_decay"]
        lr, betas = cfg["lr"], tuple(cfg["betas"])
        self.policy = list(cfg["diffaug"])
        torch.manual_seed(seed)
        m = cfg["moca"]
        layer = m["layer"] if m["layer"] is not None else min(64, image_size // 2)
        attn = None
        if m["attention"]:
            c = _channels_at(layer, cfg["width"])
            attn = MoCA(c, dim=m["dim"], clusters=m["clusters"], memory_size=m["memory_size"],
                        momentum=m["momentum"], warmup_steps=m["warmup_steps"], memory=m["memory"],
                        write_rate=m["write_rate"], kmeans_iters=m["kmeans_iters"], seed=seed)
        self.generator = Generator(image_size, cfg["width"], cfg["z_dim"], insert=attn, insert_at=layer).to(self.device)
        self.discriminator = Discriminator(image_size, cfg["width"]).to(self.device)
        self.generator_ema = copy.deepcopy(self.generator).eval()
        for p in self.generator_ema.parameters():
            p.requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=tuple(betas))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=tuple(betas))
        self.recon = self._make_recon_loss(cfg["recon_loss"])

    # ------------------------------------------------------------------ training
    def _make_recon_loss(self, kind: str):
        if kind == "auto":
            kind = "lpips" if lpips_available() else "l1"
        self.recon_kind = kind
        if kind == "l1":
            return lambda a, b: (a - b).abs().mean()
        if not lpips_available():
            raise SweeperError(
                f"model.recon_loss: lpips needs the `lpips` package and VGG16 weights at "
                f"{os.path.join(torch.hub.get_dir(), 'checkpoints', _VGG_WEIGHTS)}; install them, or use recon_loss: l1"
            )
        import lpips

        net = lpips.LPIPS(net="vgg", verbose=False).to(self.device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return lambda a, b: net(a, b).mean()

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator, "generator_ema": self.generator_ema}

    def sample(self, n: int, seed) -> torch.Tensor:
        """G_ema on ``n`` latents drawn from ``seed``; eval mode, so the memory is read, never written."""
        gen = cpu_generator(seed)
        z = noise((n, self.z_dim), gen, self.device)
        with self.sampling(self.generator_ema, seed=gen):  # noise injection draws from the seed too
            return self.generator_ema(z)

    def cluster_assignments(self, n: int, seed):
        """(images, cluster index per hypercolumn, n_clusters) for ``n`` latents from ``seed``; None
        when the layer has no memory."""
        gen = cpu_generator(seed)
        z = noise((n, self.z_dim), gen, self.device)
        with self.sampling(self.generator_ema, seed=gen):
            return self.generator_ema.cluster_assignments(z)

    def train_step(self, real: torch.Tensor, step: int = 0) -> dict[str, float]:
        """One discriminator and one generator update (FastGAN's order), then the EMA update."""
        real = real.to(self.device)
        n = real.shape[0]
        g, d = self.generator, self.discriminator
        z = torch.randn(n, self.z_dim, device=self.device)
        with self.autocast():
            fake = g(z)
            real_a = diff_augment(real, self.policy)
            fake_a = diff_augment(fake, self.policy)

            part = int(torch.randint(0, 4, (1,)))
            logits_r, (rec_big, rec_small, rec_part) = d(real_a, part=part)
            size = d.rec_size
            rs = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)  # noqa: E731
            loss_rec = (
                self.recon(rec_big.float(), rs(real_a).float())
                + self.recon(rec_small.float(), rs(real_a).float())
                + self.recon(rec_part.float(), rs(crop_part(real_a, part)).float())
            )
            loss_d_real = _fastgan_hinge_real(logits_r.float())
            loss_d_fake = _fastgan_hinge_fake(d(fake_a.detach()).float())
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d_real + loss_d_fake + loss_rec).backward()
        self.average_gradients(d)
        self.opt_d.step()

        with self.autocast():
            loss_g = -d(fake_a).float().mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.average_gradients(g)
        self.opt_g.step()
        # Trained weights are averaged. Everything not trained by gradients (BatchNorm statistics,
        # the MoCA memory and centres, and the momentum key encoder phi_k, a no-grad parameter) is
        # copied: the EMA generator reads the memory the training generator writes.
        ema_update(self.generator_ema, self.generator, self.ema_decay)
        return {
            "loss_d_real": loss_d_real.item(),
            "loss_d_fake": loss_d_fake.item(),
            "loss_rec": loss_rec.item(),
            "loss_g": loss_g.item(),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_ema": self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.load_state_dict(sd["generator"])
        self.discriminator.load_state_dict(sd["discriminator"])
        self.generator_ema.load_state_dict(sd["generator_ema"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])


def _channels_at(res: int, width: float) -> int:
    from models.fastgan import channels

    return channels(res, width)

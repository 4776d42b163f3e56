"""FastGAN networks (Liu et al., 2021, "Towards Faster and Stabilized GAN Training").

Generator: 4x4 start, GLU up-blocks with noise injection, skip-layer excitation (SLE) from low to
high resolutions, spectral norm throughout. Discriminator: down-blocks with a residual average-pool
path, SLE, two logit heads (full image and half-size image) and self-supervised reconstruction
decoders. Both take a width multiplier so tests can build a tiny network:

    g = Generator(image_size=64, width=0.25, z_dim=256, insert=MoCA(...), insert_at=32)
    img = g(torch.randn(8, 256))                    # (8, 3, 64, 64) in [-1, 1]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

# FastGAN's channel plan per resolution, as multiples of the base width (64 at width=1).
_PLAN = {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5}


def channels(res: int, width: float) -> int:
    return max(4, int(_PLAN[res] * 64 * width))


def conv(*a, **k) -> nn.Module:
    return spectral_norm(nn.Conv2d(*a, **k))


def convT(*a, **k) -> nn.Module:
    return spectral_norm(nn.ConvTranspose2d(*a, **k))


class GLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class NoiseInjection(nn.Module):
    """Per-pixel noise scaled by a learned weight that starts at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x + self.weight * torch.randn(n, 1, h, w, device=x.device, dtype=x.dtype)


class SLE(nn.Module):
    """Skip-layer excitation: a low-resolution map gates the channels of a high-resolution one."""

    def __init__(self, c_small: int, c_big: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4),
            conv(c_small, c_big, 4, 1, 0, bias=False),
            nn.SiLU(),
            conv(c_big, c_big, 1, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        return big * self.gate(small)


def up_block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv(c_in, c_out * 2, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c_out * 2),
        GLU(),
    )


def up_block_comp(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        conv(c_in, c_out * 2, 3, 1, 1, bias=False),
        NoiseInjection(),
        nn.BatchNorm2d(c_out * 2),
        GLU(),
        conv(c_out, c_out * 2, 3, 1, 1, bias=False),
        NoiseInjection(),
        nn.BatchNorm2d(c_out * 2),
        GLU(),
    )


def sle_pairs(image_size: int) -> list[tuple[int, int]]:
    """FastGAN gates 64 from 4, 128 from 8, 256 from 16; a 32 px model gates 32 from 4."""
    pairs = [(r, r * 16) for r in (4, 8, 16) if r * 16 <= image_size]
    return pairs or [(4, image_size)]


def insertion_layers(image_size: int) -> list[int]:
    """Where an attention layer can follow a generator block: 8 px up to half the image size."""
    return [2**k for k in range(3, int(math.log2(image_size)))]


class Generator(nn.Module):
    def __init__(
        self,
        image_size: int,
        width: float = 1.0,
        z_dim: int = 256,
        insert: nn.Module | None = None,
        insert_at: int | None = None,
    ):
        super().__init__()
        self.image_size, self.z_dim = image_size, z_dim
        self.resolutions = [2**k for k in range(3, int(math.log2(image_size)) + 1)]
        c4 = channels(4, width)
        self.init = nn.Sequential(convT(z_dim, c4 * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(c4 * 2), GLU())
        self.blocks = nn.ModuleDict()
        prev = c4
        for i, r in enumerate(self.resolutions):
            c = channels(r, width)
            # FastGAN alternates the heavier block (two convs, noise) with the light one.
            self.blocks[str(r)] = (up_block_comp if i % 2 == 0 else up_block)(prev, c)
            prev = c
        self.sle = nn.ModuleDict(
            {f"{a}_{b}": SLE(channels(a, width), channels(b, width)) for a, b in sle_pairs(image_size)}
        )
        self.to_rgb = conv(prev, 3, 3, 1, 1, bias=False)
        self.insert_at = insert_at
        self.attn = insert  # the MoCA layer (or None: plain FastGAN)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z)[0]

    def _run(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = {4: self.init(z.view(z.shape[0], -1, 1, 1))}
        x = feats[4]
        for r in self.resolutions:
            x = self.blocks[str(r)](x)
            for key, gate in self.sle.items():
                a, b = map(int, key.split("_"))
                if b == r:
                    x = gate(feats[a], x)
            feats[r] = x
            if self.attn is not None and r == self.insert_at:
                x = self.attn(x)
                feats[r] = x
        assign = getattr(self.attn, "last_assign", None) if self.attn is not None else None
        return torch.tanh(self.to_rgb(x)), assign

    @torch.no_grad()
    def cluster_assignments(self, z: torch.Tensor):
        """(images, cluster index per hypercolumn (n, h, w), n_clusters), or None without memory."""
        if self.attn is None or not getattr(self.attn, "use_memory", False):
            return None
        img, assign = self._run(z)
        return img, assign.clone(), self.attn.clusters


# ---------------------------------------------------------------------------- discriminator
class DownBlock(nn.Module):
    """Strided conv path plus an average-pool shortcut, averaged (FastGAN's DownBlockComp)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.main = nn.Sequential(
            conv(c_in, c_out, 4, 2, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.2),
            conv(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.LeakyReLU(0.2),
        )
        self.skip = nn.Sequential(
            nn.AvgPool2d(2, 2), conv(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.main(x) + self.skip(x)) / 2


class Decoder(nn.Module):
    """Reconstructs an image of ``out_size`` from an 8x8 feature map (self-supervision for D)."""

    def __init__(self, c_in: int, out_size: int, width: float):
        super().__init__()
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(8)]
        prev, r = c_in, 8
        while r < out_size:
            r *= 2
            c = max(4, int(32 * width * 128 / r))  # FastGAN's decoder narrows as it grows
            layers.append(up_block(prev, c))
            prev = c
        layers += [conv(prev, 3, 3, 1, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, image_size: int, width: float = 1.0):
        super().__init__()
        self.image_size = image_size
        self.rec_size = min(128, image_size)
        dch = lambda r: max(4, int(_PLAN.get(r, 0.5) * 64 * width))  # noqa: E731
        c_first = dch(image_size)
        self.stem = nn.Sequential(conv(3, c_first, 3, 1, 1, bias=False), nn.LeakyReLU(0.2))
        self.down = nn.ModuleDict()
        r, prev = image_size, c_first
        while r > 8:
            r //= 2
            self.down[str(r)] = DownBlock(prev, dch(r))
            prev = dch(r)
        self.c8 = prev
        # SLE inside D, as FastGAN: the largest map gates a map 16x smaller when both exist.
        self.d_sle = nn.ModuleDict()
        for big in (image_size, image_size // 2):
            small = big // 16
            if small >= 8 and str(small) in self.down:
                c_big = c_first if big == image_size else dch(big)
                self.d_sle[f"{big}_{small}"] = SLE(c_big, dch(small))
        self.head = nn.Sequential(
            conv(prev, prev, 1, 1, 0, bias=False), nn.BatchNorm2d(prev), nn.LeakyReLU(0.2),
            conv(prev, 1, 4, 1, 0, bias=False),
        )
        # The half-size path (input image_size/2): a lighter stack of strided convs down to 8x8.
        small_layers: list[nn.Module] = [conv(3, dch(image_size), 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        cur, prev_s = image_size // 4, dch(image_size)
        while cur > 8:
            cur //= 2
            small_layers += [conv(prev_s, dch(cur), 4, 2, 1, bias=False), nn.BatchNorm2d(dch(cur)), nn.LeakyReLU(0.2)]
            prev_s = dch(cur)
        self.small = nn.Sequential(*small_layers)
        self.c_small = prev_s
        self.head_small = conv(prev_s, 1, 4, 1, 0, bias=False)
        self.dec_big = Decoder(self.c8, self.rec_size, width)
        self.dec_small = Decoder(self.c_small, self.rec_size, width)
        self.dec_part = Decoder(dch(16), self.rec_size, width)

    def forward(self, img: torch.Tensor, part: int | None = None):
        """Logits (n, k); with ``part`` (0..3) also the three reconstructions for real images."""
        small_in = F.interpolate(img, size=self.image_size // 2, mode="bilinear", align_corners=False, antialias=True)
        feats = {self.image_size: self.stem(img)}
        x = feats[self.image_size]
        for key, blk in self.down.items():
            x = blk(x)
            r = int(key)
            for pair, gate in self.d_sle.items():
                big, small = map(int, pair.split("_"))
                if small == r:
                    x = gate(feats[big], x)
            feats[r] = x
        logits = self.head(x).flatten(1)
        s = self.small(small_in)
        s8 = s
        logits = torch.cat([logits, self.head_small(s8).flatten(1)], 1)
        if part is None:
            return logits
        f16 = feats[16]
        q = f16.shape[-1] // 2
        crop = f16[:, :, (part // 2) * q : (part // 2 + 1) * q, (part % 2) * q : (part % 2 + 1) * q]
        recs = (self.dec_big(feats[8]), self.dec_small(s8), self.dec_part(crop))
        return logits, recs


def crop_part(img: torch.Tensor, part: int) -> torch.Tensor:
    """The image quadrant that D's part decoder reconstructs (0 top-left .. 3 bottom-right)."""
    q = img.shape[-1] // 2
    return img[:, :, (part // 2) * q : (part // 2 + 1) * q, (part % 2) * q : (part % 2 + 1) * q]

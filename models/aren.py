"""The attentive VQ-VAE's autoencoder (arXiv 2309.11641): residual blocks, the residual pixel
attention, the attentive residual encoder (AREN) with one quantiser per level, and the decoder
that reads every level's codes.

    ae = Autoencoder(cfg, grid=8)                  # cfg: the family's model config; grid: bottom side
    qs, codes, vq_loss = ae.encoder(images)        # per level, bottom first: quantised maps, indices
    rec = ae.decoder(qs)                           # the upper maps resized to the bottom grid, combined
    rec = ae.decode_codes(codes)                   # the same from indices (what sampling does)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vector_quantizer import VectorQuantizer

# Sum of each row of W at initialisation (every W_ij = ATTENTION_START_ROW_SUM / N, N positions):
# ||W x|| / ||x|| <= this for any features at any grid size, so the layer starts near the identity.
ATTENTION_START_ROW_SUM = 0.05


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

    Start (the paper is silent): g1's and g2's weights are 0 and their biases +s and -s on every
    filter, with s^2 * filters = -logit(r / N) for the layer's ``positions`` N and r =
    ``ATTENTION_START_ROW_SUM``. Every W_ij is then exactly r / N, each row of W sums to r, and
    ||W x|| <= r ||x|| whatever the features and the grid (a fixed logit would give rows summing to
    N sigmoid(logit), 16x larger at 32x32 than at 8x8). The biases give every filter's weights a
    gradient from the first step (weights and biases both 0 would be a saddle). The formula is
    untouched; only its starting point is chosen.
    """

    def __init__(self, c: int, filters: int, positions: int):
        super().__init__()
        self.g1, self.g2 = nn.Conv2d(c, filters, 1), nn.Conv2d(c, filters, 1)
        p = ATTENTION_START_ROW_SUM / positions
        s = math.sqrt(-math.log(p / (1 - p)) / filters)
        with torch.no_grad():
            for g, sign in ((self.g1, 1.0), (self.g2, -1.0)):
                g.weight.zero_()
                g.bias.fill_(sign * s)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, hw, hw): W[b, i, j] = sigmoid(g1(x_i) . g2(x_j)), positions in raster order."""
        return torch.sigmoid(self.g1(x).flatten(2).transpose(1, 2) @ self.g2(x).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        wx = x.flatten(2) @ self.weights(x).transpose(1, 2)  # (B, C, hw): (W x)_i = sum_j W_ij x_j
        return x + wx.view(b, c, h, w)


class AREN(nn.Module):
    """Attentive residual encoder with its quantisers.

    Base: a 3x3 conv, then ``downsample`` x (Conv-ResBlock, ``res_blocks`` Id-ResBlocks). Level 1:
    Id-ResBlocks and the pixel attention at the base's resolution (the bottom grid); each further
    level halves the resolution again (Conv-ResBlock, Id-ResBlocks, attention). Top-down, each
    upper level's output is quantised with its own codebook (VQ2), resized (nearest, RZ2) to the
    level below's grid, concatenated by channels with that level's output and combined by a 1x1
    conv, which is quantised in turn; the bottom level is quantised last.
    """

    def __init__(self, cfg: dict[str, Any], grid: int):
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
                blocks.append(PixelAttention(w, cfg["attention_filters"], (grid // 2**k) ** 2))
            self.levels.append(nn.Sequential(*blocks))
        # to_code[k]: level k's output (plus the resized quantised level above, if any) -> code_dim
        self.to_code = nn.ModuleList(nn.Conv2d(w + (d if k < levels - 1 else 0), d, 1) for k in range(levels))
        self.quantizers = nn.ModuleList(
            VectorQuantizer(cfg["codebook_size"], d, cfg["codebook_update"], cfg["codebook_decay"], cfg["commitment"],
                            cfg["dead_code_restart"], cfg["dead_code_patience"])
            for _ in range(levels)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Images -> (quantised maps (B, D, h_k, w_k) and indices (B, h_k, w_k) per level, bottom
        first; the sum of the levels' VQ losses)."""
        h = self.base(x)
        feats = []
        for level in self.levels:
            h = level(h)
            feats.append(h)
        above, qs, codes, loss = None, [], [], x.new_zeros(())
        for k in reversed(range(len(feats))):
            f = feats[k]
            if above is not None:
                f = torch.cat([f, F.interpolate(above, size=f.shape[-2:], mode="nearest")], dim=1)
            above, idx, l = self.quantizers[k](self.to_code[k](f))
            qs.insert(0, above)
            codes.insert(0, idx)
            loss = loss + l
        return qs, codes, loss


class Decoder(nn.Module):
    """Reads every level: the upper quantised maps resized (nearest) to the bottom grid,
    concatenated by channels with the bottom map and combined by a 1x1 conv (levels >= 2; the
    AREN's own way of joining levels), then the mirror of the base encoder: 3x3 conv, Id-ResBlocks,
    ``downsample`` x (Up-ResBlock, Id-ResBlocks), ReLU, 3x3 conv to RGB."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        w, r, d, levels = cfg["width"], cfg["res_blocks"], cfg["code_dim"], cfg["levels"]
        hidden = max(1, w // 2)
        self.combine = nn.Conv2d(levels * d, d, 1) if levels > 1 else None
        layers: list[nn.Module] = [nn.Conv2d(d, w, 3, padding=1)]
        layers += [IdResBlock(w, hidden) for _ in range(r)]
        for _ in range(cfg["downsample"]):
            layers += [UpResBlock(w, w)] + [IdResBlock(w, hidden) for _ in range(r)]
        layers += [nn.ReLU(), nn.Conv2d(w, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, qs: list[torch.Tensor]) -> torch.Tensor:
        """Quantised maps per level, bottom first -> images."""
        x = qs[0]
        if self.combine is not None:
            size = x.shape[-2:]
            x = self.combine(torch.cat([x] + [F.interpolate(q, size=size, mode="nearest") for q in qs[1:]], 1))
        return self.net(x)


class Autoencoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], grid: int):
        super().__init__()
        self.encoder, self.decoder = AREN(cfg, grid), Decoder(cfg)

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Indices per level (bottom first, (B, h_k, w_k) each) -> images."""
        return self.decoder([vq.lookup(c) for vq, c in zip(self.encoder.quantizers, codes)])

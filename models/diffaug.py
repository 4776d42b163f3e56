"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to real and fake alike.

    x = diff_augment(x, ["color", "translation", "cutout"])     # x in [-1, 1], (n, 3, h, w)

All randomness comes from torch's global RNG, which the trainer seeds per step, so a resumed run
draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean  # contrast
    return x


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    # Index into a zero-padded copy: output pixel (y, x) reads input (y + ty, x + tx).
    yy = (torch.arange(h, device=x.device)[None, :, None] + ty + sh).expand(n, h, w)
    xx = (torch.arange(w, device=x.device)[None, None, :] + tx + sw).expand(n, h, w)
    padded = F.pad(x, (sw, sw, sh, sh))
    flat = padded.flatten(2)  # (n, c, (h+2sh)*(w+2sw))
    idx = (yy * (w + 2 * sw) + xx).flatten(1)[:, None, :].expand(-1, x.shape[1], -1)
    return flat.gather(2, idx).view_as(x)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    yy = torch.arange(h, device=x.device)[None, :, None]
    xx = torch.arange(w, device=x.device)[None, None, :]
    inside = ((yy >= cy - ch // 2) & (yy < cy - ch // 2 + ch)) & ((xx >= cx - cw // 2) & (xx < cx - cw // 2 + cw))
    return x * (~inside)[:, None].to(x.dtype)


_FNS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...]) -> torch.Tensor:
    for p in policy:
        x = _FNS[p](x)
    return x.contiguous()

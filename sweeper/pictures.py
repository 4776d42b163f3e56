"""Evaluation pictures: sample grids, nearest-training-image panels, cluster-usage maps.

Every function takes uint8 images (n, 3, S, S) (what :func:`sweeper.features.quantize` returns),
writes one PNG and returns its path. Pictures are drawn with PIL (they are made at every
evaluation: milliseconds, not the second a matplotlib figure takes); only the histogram uses
matplotlib, through its object API and Agg canvas, so nothing changes the process-wide backend.

>>> save_grid(images_uint8, "out/samples_0001000.png")                        # doctest: +SKIP
>>> save_nearest(fake_u8, real_u8, nn_idx, nn_dist, tau, "out/nearest.png")   # doctest: +SKIP
>>> save_cluster_map(images_u8, assign, n_clusters, "out/clusters.png")       # doctest: +SKIP
>>> save_cluster_histogram(assign, n_clusters, "out/cluster_hist.png")        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MIN_TILE = 64  # upscale small images (32 px) so a grid is readable at a glance


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy()


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, pad: int = 2) -> str:
    """A square-ish grid of images, upscaled (nearest) to at least 64 px per tile."""
    n, _, h, w = images.shape
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    th, tw = h * scale, w * scale
    canvas = np.full((ncol * (th + pad) + pad, nrow * (tw + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        tile = _hwc(img).repeat(scale, 0).repeat(scale, 1)
        r, c = divmod(i, nrow)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        canvas[y : y + th, x : x + tw] = tile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font
    except (TypeError, OSError):  # an old Pillow or one built without FreeType
        return ImageFont.load_default()


def save_nearest(
    fake: torch.Tensor,
    real: torch.Tensor,
    nn_idx: np.ndarray,
    nn_dist: np.ndarray,
    threshold: float,
    path: str,
) -> str:
    """One row per generated sample: the sample, then its nearest training images, each titled
    with its feature distance; a distance below ``threshold`` (a memorised sample) is red.

    Drawn with PIL rather than matplotlib: it runs at every evaluation and costs ~10 ms this way.
    """
    from PIL import ImageDraw

    rows, k = nn_idx.shape
    s = max(fake.shape[-1], real.shape[-1], 2 * MIN_TILE)
    pad, label_h, head_h = 6, 16, 22
    width = (k + 1) * (s + pad) + pad
    height = head_h + rows * (label_h + s + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((pad, 4), f"closest generated samples and their training neighbours; memorised: d < {threshold:.3g}",
              fill="black", font=font)

    def tile(img: torch.Tensor) -> Image.Image:
        return Image.fromarray(_hwc(img)).resize((s, s), Image.NEAREST)

    for r in range(rows):
        y = head_h + r * (label_h + s + pad)
        cells = [("generated", "black", fake[r])]
        for j in range(k):
            d = float(nn_dist[r, j])
            cells.append((f"NN{j + 1} d={d:.3g}", "red" if d < threshold else "black", real[int(nn_idx[r, j])]))
        for c, (label, colour, img) in enumerate(cells):
            x = pad + c * (s + pad)
            draw.text((x, y + 1), label, fill=colour, font=font)
            canvas.paste(tile(img), (x, y + label_h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def cluster_colours(n_clusters: int) -> np.ndarray:
    """(n_clusters, 3) floats in [0, 1]: qualitative colours up to 20 clusters, a hue wheel beyond."""
    from matplotlib import colormaps

    if n_clusters <= 10:
        cmap, pos = colormaps["tab10"], np.arange(n_clusters)
    elif n_clusters <= 20:
        cmap, pos = colormaps["tab20"], np.arange(n_clusters)
    else:
        cmap, pos = colormaps["hsv"], np.arange(n_clusters) / n_clusters
    return np.asarray([cmap(p)[:3] for p in pos])


def save_cluster_map(images: torch.Tensor, assign: torch.Tensor, n_clusters: int, path: str, alpha: float = 0.55) -> str:
    """Each sample on top, and below it the same sample tinted by which memory cluster every
    position chose (assignments upsampled nearest-neighbour from (h, w) to the image size)."""
    from PIL import ImageDraw

    n, _, s, _ = images.shape
    t = max(s, 2 * MIN_TILE)
    up = F.interpolate(assign[:, None].float(), size=(t, t), mode="nearest")[:, 0].long().clamp(0, n_clusters - 1)
    colours = torch.from_numpy(cluster_colours(n_clusters)).float()
    big = F.interpolate(images.float(), size=(t, t), mode="nearest") / 255
    tinted = (1 - alpha) * big + alpha * colours[up.cpu()].permute(0, 3, 1, 2)
    pad, head_h = 4, 20
    canvas = Image.new("RGB", (n * (t + pad) + pad, head_h + 2 * (t + pad)), "white")
    for i in range(n):
        x = pad + i * (t + pad)
        canvas.paste(Image.fromarray(_hwc((big[i] * 255).round().to(torch.uint8))), (x, head_h))
        canvas.paste(Image.fromarray(_hwc((tinted[i] * 255).round().to(torch.uint8))), (x, head_h + t + pad))
    h, w = assign.shape[-2:]
    ImageDraw.Draw(canvas).text((pad, 3), f"memory cluster per position ({h}x{w} grid, {n_clusters} clusters; "
                                "colours as in the usage histogram)", fill="black", font=_font(12))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def cluster_usage(assign: torch.Tensor, n_clusters: int) -> np.ndarray:
    """Fraction of all positions (over all samples) that chose each cluster."""
    counts = torch.bincount(assign.reshape(-1).cpu().long(), minlength=n_clusters)[:n_clusters].double()
    return (counts / counts.sum().clamp(min=1)).numpy()


def save_cluster_histogram(assign: torch.Tensor, n_clusters: int, path: str) -> str:
    """Bar chart of cluster use, bars in the same colours as the map; dead clusters show as gaps."""
    usage = cluster_usage(assign, n_clusters)
    fig = _figure(max(4.0, 0.25 * n_clusters + 1.5), 2.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(n_clusters), usage, color=cluster_colours(n_clusters), edgecolor="black", linewidth=0.3)
    ax.axhline(1 / n_clusters, color="gray", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_xlabel("cluster")
    ax.set_ylabel("share of positions")
    used = int((usage > 0).sum())
    ax.set_title(f"cluster use over {assign.shape[0]} samples: {used}/{n_clusters} used", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path

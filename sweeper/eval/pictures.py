"""Evaluation pictures: sample grids, nearest-training-image panels, cluster-usage maps, sample types.

Every function takes uint8 images (n, 3, S, S) (what :func:`sweeper.eval.features.quantize` returns),
writes one PNG and returns its path. Pictures are drawn with PIL (they are made at every
evaluation: milliseconds, not the second a matplotlib figure takes); only the cluster histogram uses
matplotlib, through its object API and Agg canvas, so nothing changes the process-wide backend.

>>> save_grid(images_uint8, "out/samples_0001000.png")                        # doctest: +SKIP
>>> save_nearest(fake_u8, real_u8, nn_idx, nn_dist, tau, "out/nearest.png")   # doctest: +SKIP
>>> save_cluster_map(images_u8, assign, n_clusters, "out/clusters.png")       # doctest: +SKIP
>>> save_cluster_histogram(assign, n_clusters, "out/cluster_hist.png")        # doctest: +SKIP
>>> save_sample_types(types, chosen, gen_u8, real_u8, train_nn, gen_nn, "out/sample_types.png")  # doctest: +SKIP
>>> save_distance_histograms(types, "out/sample_type_histograms.png")        # doctest: +SKIP
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


TYPE_COLOURS = {0: "#b2182b", 1: "#1a9850", 2: "#2166ac"}  # memorised red, spurious green, generalised blue


def _neighbour_row(canvas, draw, font, nn, source: torch.Tensor, delta: float, what: str, x0: int, y: int,
                   s: int, pad: int, label_h: int) -> None:
    """One row of neighbours, each titled with its distance (red under ``delta``)."""
    idx, dist = nn
    for j in range(len(idx)):
        x = x0 + j * (s + pad)
        draw.text((x, y + 1), f"{what} d={float(dist[j]):.3g}", fill="red" if dist[j] < delta else "black", font=font)
        canvas.paste(Image.fromarray(_hwc(source[int(idx[j])])).resize((s, s), Image.NEAREST), (x, y + label_h))


def save_sample_types(types, chosen: dict[int, list[int]], gen: torch.Tensor, real: torch.Tensor,
                      train_nn: dict[int, tuple[np.ndarray, np.ndarray]], gen_nn: dict[int, tuple[np.ndarray, np.ndarray]],
                      path: str) -> str:
    """The paper's Figure 1: for a few samples of each type, the sample (left, spanning two rows),
    its nearest training images (top row) and its nearest other generated samples (bottom row),
    each titled with its distance; distances under the threshold in force are red.

    ``types``: a :class:`sweeper.eval.sample_types.SampleTypes`; ``chosen``: {type: [sample index]};
    ``gen``/``real``: uint8 thumbnails of every generated sample / training image;
    ``train_nn``/``gen_nn``: {sample index: (neighbour indices, distances)}.
    """
    from PIL import ImageDraw

    fr = types.fractions()  # {"frac_memorized": ..., "frac_spurious": ..., "frac_generalized": ...}, type order
    names = [key[len("frac_"):] for key in fr]
    k = max([len(v[0]) for v in [*train_nn.values(), *gen_nn.values()]] or [1])
    s = max(gen.shape[-1], real.shape[-1], 96)
    pad, label_h, head_h, band_h = 6, 15, 36, 20
    width = pad + (s + 2 * pad) + k * (s + pad) + pad
    blocks = [(t, chosen.get(t, [])) for t in (0, 1, 2)]
    height = head_h + sum(band_h + max(1, len(rows)) * (2 * (label_h + s + pad) + pad) for _, rows in blocks) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    draw.text((pad, 3), f"left: a sample; top row: its {k} nearest training images (d_train),", fill="black", font=font)
    draw.text((pad, 18), f"bottom row: its {k} nearest other samples (d_syn); red: under the threshold", fill="black",
              font=font)

    def tile(img: torch.Tensor) -> Image.Image:
        return Image.fromarray(_hwc(img)).resize((s, s), Image.NEAREST)

    y = head_h
    x0 = pad + s + 2 * pad
    for t, rows in blocks:
        name = names[t]
        draw.rectangle([0, y, width, y + band_h - 3], fill=TYPE_COLOURS[t])
        draw.text((pad, y + 3), f"{name}: {fr['frac_' + name]:.1%} of {len(types.labels)} samples"
                                + ("" if rows else " (none to show)"), fill="white", font=font)
        y += band_h
        if not rows:
            y += 2 * (label_h + s + pad) + pad
            continue
        for i in rows:
            draw.text((pad, y + 1), f"#{i}", fill="black", font=font)
            canvas.paste(tile(gen[i]), (pad, y + label_h + (label_h + s + pad) // 2))
            draw.text((pad, y + label_h + (label_h + s + pad) // 2 + s + 1),
                      f"dt={types.d_train[i]:.3g} ds={types.d_syn[i]:.3g}", fill=TYPE_COLOURS[t], font=_font(10))
            for row, (nn, source, delta) in enumerate(((train_nn[i], real, types.delta_m.value),
                                                       (gen_nn[i], gen, types.delta_s.value))):
                _neighbour_row(canvas, draw, font, nn, source, delta, "train" if row == 0 else "gen",
                               x0, y + row * (label_h + s + pad), s, pad, label_h)
            y += 2 * (label_h + s + pad) + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def save_distance_histograms(types, path: str) -> str:
    """The paper's Figure 3 histograms: d_train (olive) with delta_m and d_syn (grey) with delta_s,
    the smoothed density each valley was read from (black), and the rule that set each threshold.

    Drawn with PIL, not matplotlib: it runs at every evaluation (~20 ms instead of ~1 s)."""
    from PIL import ImageDraw

    pw, ph, head = 520, 330, 26
    canvas = Image.new("RGB", (2 * pw, ph + head), "white")
    draw = ImageDraw.Draw(canvas)
    fr = types.fractions()
    draw.text((8, 6), "sample types: " + ", ".join(f"{k[len('frac_'):]} {v:.1%}" for k, v in fr.items())
              + f" of {len(types.labels)} samples", fill="black", font=_font(13))
    panels = ((types.d_train, types.delta_m, "d_train: distance to the nearest training image", "delta_m",
               (128, 128, 0)),
              (types.d_syn, types.delta_s, "d_syn: distance to the nearest other generated sample", "delta_s",
               (150, 150, 150)))
    for col, (d, th, title, name, colour) in enumerate(panels):
        _histogram_panel(draw, (col * pw, head), (pw, ph), np.asarray(d, np.float64), th, title, name, colour)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def _histogram_panel(draw, origin, size, d: np.ndarray, th, title: str, name: str, colour) -> None:
    """One histogram (density scale) with its smoothed curve and the threshold as a dashed line."""
    (ox, oy), (w, h) = origin, size
    font, small = _font(12), _font(10)
    left, right, top, bottom = ox + 40, ox + w - 14, oy + 58, oy + h - 34
    draw.text((ox + 12, oy + 2), title, fill="black", font=font)
    for i, line in enumerate(_wrap(th.rule, 82)[:3]):
        draw.text((ox + 12, oy + 18 + 12 * i), line, fill="dimgray", font=small)
    hi = max(float(d.max()) * 1.05 if len(d) else 1.0, th.value * 1.1, 1e-12)
    bins = int(np.clip(len(d) // 4, 12, 60))
    counts, edges = np.histogram(d, bins=bins, range=(0.0, hi), density=True)
    curve = th.density if th.grid is not None else None
    ymax = max(float(counts.max()) if len(counts) else 1.0, float(curve.max()) if curve is not None else 0.0, 1e-12)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / hi, bottom - (bottom - top) * y / ymax

    for c, a, b in zip(counts, edges, edges[1:]):
        if c > 0:
            draw.rectangle([xy(a, c)[0], xy(a, c)[1], xy(b, 0)[0] - 1, bottom], fill=colour)
    if curve is not None:
        keep = th.grid <= hi
        draw.line([xy(x, y) for x, y in zip(th.grid[keep], curve[keep])], fill="black", width=1)
    draw.line([left, bottom, right, bottom], fill="black")
    draw.line([left, top, left, bottom], fill="black")
    for tick in np.linspace(0.0, hi, 5):
        x = xy(tick, 0)[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 12, bottom + 6), f"{tick:.3g}", fill="black", font=small)
    draw.text((right - 60, bottom + 20), "distance", fill="black", font=small)
    draw.text((ox + 4, top - 14), "density", fill="black", font=small)
    x = xy(th.value, 0)[0]
    for y in range(int(top), int(bottom), 8):  # dashed
        draw.line([x, y, x, min(y + 4, bottom)], fill="crimson", width=2)
    label = f"{name} = {th.value:.3g} ({'fallback' if th.fallback else 'valley'})"
    draw.text((min(x + 5, right - 7 * len(label)), top + 2), label, fill="crimson", font=font)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)

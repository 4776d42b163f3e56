"""Memorised, spurious or generalised: every generated sample through the dense-associative-memory lens.

After Pham et al., "Memorization to Generalization: Emergence of Diffusion Models from Associative
Memory" (``shared/papers/denseam-memorization-generalization.txt``). A generator trained on few
images first stores them (it returns copies), then, past its capacity, returns *spurious* states
(new images that many samples fall onto), and only with more data returns genuinely new images.
For each generated sample x, in the evaluation's feature space (``eval.sample_space: pixels``:
raw pixels of the thumbnails instead):

- ``d_train(x)``: distance to its nearest training image;
- ``d_syn(x)``: distance to its nearest *other* generated sample of the same evaluation.

and, with two thresholds read off the two histograms,

- **memorised**: ``d_train < delta_m`` (a copy of a training image);
- **spurious**: ``d_train >= delta_m`` and ``d_syn < delta_s`` (new, but other samples landed on
  the same image: an attractor that is not a training image);
- **generalised**: the rest (new, and no other sample is the same image).

The thresholds (the paper's: each separates the two peaks of its histogram):

    delta = the valley between the lowest two modes of a smoothed histogram (a Gaussian kernel
    density with half Silverman's robust bandwidth, reflected at 0), where a mode counts only if
    the valley on its side is at most half its height and it holds at least 5 % of the samples (and
    3); the lower mode's peak must lie below the copy scale (a peak of copies, not a cluster of new
    images) and the upper mode's at or above it (distinct images, not the far side of one jittered
    peak of copies). The value is the middle of the valley's floor.

    One mode (or no low mode of copies beside a mode of distinct images): delta_m falls back to the
    calibrated threshold of :mod:`sweeper.eval.memorization` (the 5 % quantile of the leave-one-out
    distances, so frac_memorized then equals memorized_frac), delta_s to the copy scale (two
    generated samples that close show the same image). The metrics say which rule was used
    (``delta_m_fallback``, ``delta_s_fallback``: 1 = fallback) and the picture names it.

The calibration (the leave-one-out distances behind the copy scale and the fallbacks) comes from
the whole image folder, the training images and those ``data.subset`` left out alike
(:class:`Calibration`), so neither threshold moves along the training-set-size axis K: calibrated
on the K training images alone, the 5 % quantile and the median of K leave-one-out distances
shrink as K grows (measured: the fallback delta_s about 4x from K=4 to K=64), and distinct real
faces read 36-64 % memorised at K=4. The copy scale is a third of the folder's median
leave-one-out distance (a training image's nearest other image is at that median).

Where held-out images exist, every evaluation also scores them as if they were samples, against
the same thresholds: ``null_frac_memorized`` and ``null_frac_spurious`` are what a perfect
generaliser (real new images) reads at this K, the floor to read the two fractions against.

Attractors: the spurious samples joined when closer than delta_s (single linkage) form
``spurious_clusters`` distinct attractors; ``largest_attractor_frac`` is the share of all samples
in the largest one (a generator collapsed onto one image reads 1 attractor at ~1.0).

Caveat: d_syn shrinks as n_gen grows; with n_gen far above the training set and samples that
fill a low-dimensional continuum, the fallback delta_s can count generalised samples as spurious
(the null baseline's d_syn is among the held-out images, fewer than n_gen).

``d_syn`` is an all-pairs nearest-neighbour search over the generated set: a chunked matmul on
the evaluation device in float32, the winning pair's distance then recomputed exactly in float64
(an exact duplicate comes out at 0, not at float32 rounding of |a|^2 + |b|^2 - 2ab).

>>> st = classify_samples(gen_feats, train_feats)                       # doctest: +SKIP
>>> st.metrics()                                                        # doctest: +SKIP
{'frac_memorized': 0.12, 'frac_spurious': 0.05, 'frac_generalized': 0.83, 'delta_m': 0.091, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sweeper.keys import FRACTIONS

from sweeper.eval.diversity import distance_blocks
from sweeper.eval.memorization import NearestTrainingImages, leave_one_out_distances, memorization_threshold

MEMORIZED, SPURIOUS, GENERALIZED = 0, 1, 2
TYPE_NAMES = ("memorized", "spurious", "generalized")

VALLEY_DIP = 0.5  # a valley must fall to at most half the lower of its two peaks
MIN_MODE_MASS = 0.05  # a mode holds at least 5 % of the samples ...
MIN_MODE_COUNT = 3  # ... and at least 3 of them
COPY_SCALE = 1 / 3  # copies lie below this times the folder's median LOO distance, distinct images above
BANDWIDTH = 0.5  # times Silverman's: his rule assumes one Gaussian mode and smooths two into one
GRID_POINTS = 1024  # where the kernel density is evaluated
FLOOR_TOL = 0.05  # the valley's floor: within 5 % of (peak - minimum) above its minimum
THUMB = 64  # the evaluator keeps every generated sample at most this many pixels wide
SHOW_PER_TYPE = 2  # samples of each type in the picture
SHOW_K = 4  # nearest training images / generated samples beside each


# ---------------------------------------------------------------------------- nearest other sample
def nearest_other(feats: np.ndarray, k: int = 1, device: str | torch.device = "cpu",
                  chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row, its ``k`` nearest *other* rows: distances (n, k) and indices (n, k).

    A chunked float32 matmul on ``device`` (queries x all rows, the row itself masked); the
    distances returned are recomputed exactly in float64 from the rows, so an exact duplicate is 0.
    """
    x = np.asarray(feats)
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0)), np.zeros((n, 0), dtype=np.int64)
    all32 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    sq = (all32 * all32).sum(1)
    idxs = []
    for start in range(0, n, chunk):
        q = all32[start : start + chunk]
        d2 = sq[start : start + chunk, None] + sq[None, :] - 2 * (q @ all32.T)
        rows = torch.arange(len(q), device=all32.device)
        d2[rows, rows + start] = float("inf")
        idxs.append(torch.topk(d2, k, dim=1, largest=False).indices.cpu())
    idx = torch.cat(idxs).numpy()
    x64 = np.asarray(x, dtype=np.float64)
    dist = np.empty(idx.shape)
    for start in range(0, n, chunk):  # exact distances, n x d float64 at most chunk rows at a time
        q = x64[start : start + chunk]
        for j in range(k):
            dist[start : start + chunk, j] = np.linalg.norm(q - x64[idx[start : start + chunk, j]], axis=1)
    order = np.argsort(dist, axis=1, kind="stable")  # float32 may have swapped near-ties
    return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


# ---------------------------------------------------------------------------- thresholds
@dataclass
class Threshold:
    """A threshold on a distance histogram and how it was found."""

    value: float
    fallback: bool  # True: no two-mode valley; ``rule`` says what was used instead
    rule: str  # one line for the picture and the log
    modes: list[float] = field(default_factory=list)  # peak locations of the modes that counted
    grid: np.ndarray | None = None  # the smoothed histogram, for the picture
    density: np.ndarray | None = None


def kernel_density(d: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, float]:
    """Gaussian kernel density of non-negative ``d`` on ``grid``, reflected at 0; and the bandwidth.

    Silverman's rule with the robust scale min(std, IQR / 1.34): a second mode does not widen it
    the way the plain standard deviation would."""
    n = len(d)
    iqr = np.subtract(*np.percentile(d, [75, 25]))
    scale = min(d.std(), iqr / 1.34) if iqr > 0 else d.std()
    h = max(BANDWIDTH * 0.9 * scale * n ** (-0.2), 1e-3 * (d.max() - d.min()), 1e-12)
    dens = np.zeros_like(grid)
    for start in range(0, n, 2048):  # n x grid at most 2048 x 1024 at a time
        x = d[start : start + 2048, None]
        dens += np.exp(-0.5 * ((grid[None] - x) / h) ** 2).sum(0) + np.exp(-0.5 * ((grid[None] + x) / h) ** 2).sum(0)
    return dens / (n * h * np.sqrt(2 * np.pi)), h


def _modes(dens: np.ndarray, dx: float, n: int) -> tuple[list[int], list[int]]:
    """Peaks and the valleys between them, after merging the modes that do not count.

    Persistence-style: repeatedly merge the pair of neighbouring modes whose valley is shallowest
    (above VALLEY_DIP of the lower peak), then any mode holding too few samples into the neighbour
    it is least separated from."""
    inner = np.flatnonzero((dens[1:-1] > dens[:-2]) & (dens[1:-1] >= dens[2:])) + 1
    peaks = list(inner)
    if dens[0] > dens[1]:
        peaks.insert(0, 0)
    if not peaks:
        peaks = [int(np.argmax(dens))]
    valleys = [p + int(np.argmin(dens[p : q + 1])) for p, q in zip(peaks, peaks[1:])]
    min_mass = max(MIN_MODE_MASS, MIN_MODE_COUNT / n)
    while len(peaks) > 1:
        ratio = [dens[v] / min(dens[p], dens[q]) for v, p, q in zip(valleys, peaks, peaks[1:])]
        j = int(np.argmax(ratio))
        if ratio[j] > 1 - VALLEY_DIP:  # too shallow: one mode; keep the higher peak
            lower = j if dens[peaks[j]] < dens[peaks[j + 1]] else j + 1
            peaks.pop(lower)
            valleys.pop(j)
            continue
        bounds = [0, *valleys, len(dens)]
        mass = [dens[a:b].sum() * dx for a, b in zip(bounds, bounds[1:])]
        m = int(np.argmin(mass))
        if mass[m] >= min_mass:
            break
        # merge into the side whose valley is higher (the weaker separation)
        left = dens[valleys[m - 1]] if m > 0 else -1.0
        right = dens[valleys[m]] if m < len(valleys) else -1.0
        peaks.pop(m)
        valleys.pop(m - 1 if left >= right else m)
        if len(valleys) == len(peaks):  # keep valleys between the remaining peaks
            valleys = [p + int(np.argmin(dens[p : q + 1])) for p, q in zip(peaks, peaks[1:])]
    return peaks, valleys


def valley_threshold(d: np.ndarray, copy_scale: float, fallback: float, fallback_rule: str) -> Threshold:
    """The valley between the lowest two modes of the smoothed histogram of ``d`` (see the module
    docstring), or ``fallback`` when there are not two modes whose lower one is made of copies
    (its peak below ``copy_scale``) and whose upper one is not (its peak at or above it)."""
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) < 2 * MIN_MODE_COUNT or d.max() - d.min() <= 1e-12 * max(d.max(), 1.0):
        return Threshold(float(fallback), True, f"too few distinct distances: {fallback_rule}")
    grid = np.linspace(0.0, d.max() * 1.05, GRID_POINTS)
    dens, h = kernel_density(d, grid)
    peaks, valleys = _modes(dens, grid[1] - grid[0], len(d))
    modes = [float(grid[p]) for p in peaks]
    out = dict(modes=modes, grid=grid, density=dens)
    if len(peaks) < 2:
        return Threshold(float(fallback), True, f"one mode at {modes[0]:.3g}: {fallback_rule}", **out)
    if modes[0] >= copy_scale:
        return Threshold(float(fallback), True, f"{len(peaks)} modes, the lowest at {modes[0]:.3g} is not made of "
                                                f"copies (>= {copy_scale:.3g}): {fallback_rule}", **out)
    if modes[1] < copy_scale:  # both below: the two sides of one jittered peak of copies, not copies + new
        return Threshold(float(fallback), True, f"{len(peaks)} modes, the lowest two at {modes[0]:.3g} and "
                                                f"{modes[1]:.3g} both below the copy scale {copy_scale:.3g}: "
                                                f"{fallback_rule}", **out)
    p, q, v = peaks[0], peaks[1], valleys[0]
    floor = dens[v] + FLOOR_TOL * (min(dens[p], dens[q]) - dens[v])
    lo, hi = v, v
    while lo - 1 > p and dens[lo - 1] <= floor:
        lo -= 1
    while hi + 1 < q and dens[hi + 1] <= floor:
        hi += 1
    value = float(0.5 * (grid[lo] + grid[hi]))
    return Threshold(value, False, f"valley between the modes at {modes[0]:.3g} and {modes[1]:.3g}", **out)


# ---------------------------------------------------------------------------- the classifier
@dataclass
class SampleTypes:
    """Per-sample distances and types of one evaluation's generated set."""

    d_train: np.ndarray  # (n,)
    d_syn: np.ndarray  # (n,)
    delta_m: Threshold
    delta_s: Threshold
    labels: np.ndarray  # (n,) MEMORIZED | SPURIOUS | GENERALIZED
    attractors: np.ndarray | None = None  # (n,) the attractor of each spurious sample (0, 1, ...), -1 for others
    null: dict[str, float] = field(default_factory=dict)  # held-out images scored alike (null_frac_*)

    def fractions(self) -> dict[str, float]:
        n = max(len(self.labels), 1)
        return {name: float((self.labels == t).sum() / n) for t, name in enumerate(FRACTIONS)}

    def metrics(self) -> dict[str, float]:
        """The three fractions, both thresholds, 1.0 where a threshold is the fallback, the
        attractors (how many, and the share of all samples in the largest), the null baseline."""
        out = {**self.fractions(), "delta_m": self.delta_m.value, "delta_s": self.delta_s.value,
               "delta_m_fallback": float(self.delta_m.fallback), "delta_s_fallback": float(self.delta_s.fallback)}
        if self.attractors is not None:
            sizes = np.bincount(self.attractors[self.attractors >= 0])
            out["spurious_clusters"] = float(len(sizes))
            out["largest_attractor_frac"] = float(sizes.max() / len(self.labels)) if len(sizes) else 0.0
        return {**out, **self.null}


def classify(d_train: np.ndarray, d_syn: np.ndarray, loo: np.ndarray) -> SampleTypes:
    """Types from the two distances; ``loo``: the calibration's leave-one-out distances (the whole
    folder's, :func:`calibration_distances`): the fallback delta_m and the copy scale."""
    d_train, d_syn = np.asarray(d_train, np.float64), np.asarray(d_syn, np.float64)
    tau = memorization_threshold(loo)
    copy_scale = COPY_SCALE * float(np.median(loo)) if len(loo) else 0.0
    delta_m = valley_threshold(d_train, copy_scale, tau, f"delta_m = the calibrated memorisation threshold {tau:.3g} "
                                                         "(5 % quantile of the folder's leave-one-out distances)")
    delta_s = valley_threshold(d_syn, copy_scale, copy_scale, f"delta_s = a third of the folder's median "
                                                               f"leave-one-out distance = {copy_scale:.3g}")
    return SampleTypes(d_train, d_syn, delta_m, delta_s, label(d_train, d_syn, delta_m.value, delta_s.value))


def label(d_train: np.ndarray, d_syn: np.ndarray, delta_m: float, delta_s: float) -> np.ndarray:
    """MEMORIZED where ``d_train < delta_m``, else SPURIOUS where ``d_syn < delta_s``, else
    GENERALIZED: a copy of a training image that other samples also copy is memorised."""
    labels = np.full(len(d_train), GENERALIZED, dtype=np.int8)
    labels[d_syn < delta_s] = SPURIOUS
    labels[d_train < delta_m] = MEMORIZED
    return labels


def calibration_distances(train: np.ndarray, heldout: np.ndarray | None = None,
                          device: str | torch.device = "cpu") -> np.ndarray:
    """The leave-one-out nearest-neighbour distances of the whole folder (training and held-out
    images alike): the calibration the thresholds come from, the same at every training-set size."""
    folder = train if heldout is None or len(heldout) == 0 else np.concatenate([train, heldout])
    return leave_one_out_distances(folder, device=device)


def attractor_ids(gen: np.ndarray, labels: np.ndarray, delta_s: float,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """Single linkage over the spurious samples: two closer than ``delta_s`` share an attractor.
    Returns each sample's attractor number (0, 1, ... by first sample), -1 for the others."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    out = np.full(len(labels), -1, dtype=np.int64)
    idx = np.flatnonzero(labels == SPURIOUS)
    if len(idx) == 0:
        return out
    rows, cols = [], []
    for start, d in distance_blocks(gen[idx], gen[idx], device):
        r, c = torch.nonzero(d < delta_s, as_tuple=True)
        rows.append(r.cpu().numpy() + start)
        cols.append(c.cpu().numpy())
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = csr_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(idx), len(idx)))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)
    renumber = np.empty(len(first), dtype=np.int64)
    renumber[np.argsort(first)] = np.arange(len(first))  # numbered by each attractor's first sample
    out[idx] = renumber[comp]
    return out


def null_baseline(st: SampleTypes, heldout: np.ndarray, train: np.ndarray,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """Held-out real images scored as if they were samples, against the samples' thresholds:
    what a perfect generaliser reads at this training-set size (``null_frac_memorized``,
    ``null_frac_spurious``). Empty without at least two held-out images."""
    if heldout is None or len(heldout) < 2:
        return {}
    d_train = NearestTrainingImages(train, device).query(heldout, k=1)[0][:, 0]
    d_syn = nearest_other(heldout, k=1, device=device)[0][:, 0]
    labels = label(d_train, d_syn, st.delta_m.value, st.delta_s.value)
    return {"null_frac_memorized": float((labels == MEMORIZED).mean()),
            "null_frac_spurious": float((labels == SPURIOUS).mean())}


def classify_samples(gen: np.ndarray, train: np.ndarray, device: str | torch.device = "cpu",
                     d_train: np.ndarray | None = None, heldout: np.ndarray | None = None,
                     loo: np.ndarray | None = None) -> SampleTypes:
    """Types of generated vectors ``gen`` (n, d) against training vectors ``train`` (N, d), with
    the thresholds calibrated on the training and ``heldout`` vectors together, the attractors of
    the spurious samples, and (with held-out vectors) the null baseline. ``d_train`` / ``loo``
    (:func:`calibration_distances`) when already computed."""
    if d_train is None:
        d_train = NearestTrainingImages(train, device).query(gen, k=1)[0][:, 0]
    if loo is None:
        loo = calibration_distances(train, heldout, device)
    d_syn = nearest_other(gen, k=1, device=device)[0][:, 0]
    st = classify(d_train, d_syn, loo)
    st.attractors = attractor_ids(np.asarray(gen, np.float64), st.labels, st.delta_s.value, device)
    st.null = null_baseline(st, heldout, train, device)
    return st


def thumbnails(images: torch.Tensor, size: int = THUMB) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> at most ``size`` px (area average): what the evaluator keeps of every
    sample for the sample-type pictures (and pixel distances), 12 KB a sample at 64 px."""
    if images.shape[-1] <= size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)


def shown(st: SampleTypes, vectors: np.ndarray, per_type: int = SHOW_PER_TYPE) -> dict[int, list[int]]:
    """A few samples of each type for the picture: memorised ones nearest their training image,
    spurious ones nearest another sample, generalised ones in index order; one per attractor (a
    sample within delta_s of one already chosen is skipped, so two rows never show one image)."""
    out: dict[int, list[int]] = {}
    for t in (MEMORIZED, SPURIOUS, GENERALIZED):
        idx = np.flatnonzero(st.labels == t)
        key = {MEMORIZED: st.d_train, SPURIOUS: st.d_syn, GENERALIZED: None}[t]
        if key is not None:
            idx = idx[np.argsort(key[idx], kind="stable")]
        picked: list[int] = []
        for i in idx:
            v = np.asarray(vectors[i], np.float64)
            if all(np.linalg.norm(v - np.asarray(vectors[j], np.float64)) >= st.delta_s.value for j in picked):
                picked.append(int(i))
            if len(picked) == per_type:
                break
        out[t] = picked
    return out


def nearest_others_of(gen: np.ndarray, rows: list[int], k: int, device) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other generated samples of a few rows (float64, exact)."""
    index = NearestTrainingImages(gen, device)
    return index.query(gen[rows], k=k, exclude=np.asarray(rows))

"""The metric registry, and the built-in metrics registered in it (one module above the
computations, as stylegan2-ada's metric_main: nothing registers by import side effect).

    @register_metric("distances")
    def distances(ctx) -> dict[str, float]:
        return {ctx.fd_name: ..., ctx.kd_name: ...}

    @register_metric("address_kl", family="my_vae", reports=("address_kl",))   # a family's own, in its file
    def address_kl(ctx): return {"address_kl": ctx.model.address_kl(ctx.real_images)}

    @register_metric("recon", family="my_vqvae", generation=False)   # runs before generation is ready too
    def recon(ctx): ...

The context (:class:`sweeper.eval.context.EvalContext`) holds what is computed once per
evaluation: the reference statistics, the generated features, nearest-training-image distances,
the sample grid, the family itself. A metric returns ``{name: float}`` (empty when it does not
apply) and may add pictures with ``ctx.add_artifact(path)``. ``eval.metrics`` picks metrics by
name; ``null`` runs every registered metric that applies to the family. A metric registered with
``generation=False`` needs no generated samples (reconstructions, a held-out bound): it is the
only kind that runs while the family's ``generation_ready`` is False.

``reports`` declares the names a metric can return (shell patterns, ``{fd}`` / ``{kd}`` for the
evaluation's distance names; each also with ``_se`` and ``_split/<i>``): the spec check refuses an
objective, constraint or collapse metric that no metric of the space reports, before any trial
(:func:`reported_names`). A metric without the declaration switches that check off for its space;
``tests/test_family_contract.py`` checks every declaration against what the metric returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from sweeper.errors import SweeperError
from sweeper.eval import pictures
from sweeper.eval.context import EVAL_DEFAULTS, EvalContext, batch_seed
from sweeper.eval.distances import frechet_to_reference, kernel_distance
from sweeper.eval.diversity import pixel_vectors, spread_metrics
from sweeper.eval.features import distance_names, quantize
from sweeper.eval.memorization import NearestTrainingImages, memorization_metrics
from sweeper.eval.sample_types import (
    GENERALIZED, MEMORIZED, SHOW_K, SPURIOUS, calibration_distances, classify_samples, nearest_others_of, shown, thumbnails,
)
from sweeper.eval.uncertainty import split_count, split_slices, with_uncertainty

MetricFn = Callable[[Any], dict[str, float]]
NEAREST_K = 3  # training images shown beside each of the samples nearest the training set
CLUSTER_MAP_SAMPLES = 8


@dataclass(frozen=True)
class MetricEntry:
    name: str
    fn: MetricFn
    family: str | None  # None: every family
    generation: bool = True  # False: needs no generated samples (runs before generation_ready too)
    reports: tuple[str, ...] | None = None  # the names it can return (shell patterns); None: undeclared


_METRICS: dict[str, MetricEntry] = {}


def register_metric(name: str, family: str | None = None, generation: bool = True,
                    reports: tuple[str, ...] | None = None) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        _METRICS[name] = MetricEntry(name, fn, family, generation, tuple(reports) if reports is not None else None)
        return fn

    return deco


def reported_names(entries: list[MetricEntry], features: str) -> list[str] | None:
    """The name patterns the ``entries`` can report in an evaluation with ``features``, with
    ``{fd}``/``{kd}`` filled in; None when one of them declares nothing (then nobody can tell)."""
    if any(m.reports is None for m in entries):
        return None
    fd, kd = distance_names(features)
    return [p.format(fd=fd, kd=kd) for m in entries for p in m.reports]


def base_name(name: str) -> str:
    """A reported name without its standard-error or split suffix: ``fid_split/3`` -> ``fid``."""
    if "_split/" in name:
        return name.split("_split/")[0]
    return name[: -len("_se")] if name.endswith("_se") else name


def registered() -> dict[str, MetricEntry]:
    return dict(_METRICS)


def metrics_for(family: str | None, selected: list[str] | None = None) -> list[MetricEntry]:
    """The metrics an evaluation of ``family`` runs: ``selected`` by name, or all that apply."""
    table = registered()
    if selected is None:
        return [m for m in table.values() if m.family in (None, family)]
    out = []
    for name in selected:
        if name not in table:
            raise SweeperError(f"eval.metrics: unknown metric {name!r}; registered: {', '.join(sorted(table))}")
        m = table[name]
        if m.family not in (None, family):
            raise SweeperError(f"eval.metrics: {name!r} belongs to the {m.family} family, not {family}; remove it")
        out.append(m)
    return out


# ---------------------------------------------------------------------------- built-in metrics
@register_metric("distances", reports=("{fd}", "{kd}"))
def distances_metric(ctx: EvalContext) -> dict[str, float]:
    """Frechet and kernel distance to the training set: ``fid``/``kid`` with Inception features,
    ``fd_<x>``/``kd_<x>`` with any other extractor; each with its standard error ``<name>_se`` and
    its values on ``eval.se_splits`` disjoint splits of the samples, ``<name>_split/<s>`` (the same
    latents in every trial: paired comparisons, see :mod:`sweeper.eval.uncertainty`)."""
    n = len(ctx.gen_feats)
    splits = split_slices(n, split_count(n, int(ctx.cfg.get("se_splits") or 0)))

    def fd(feats: np.ndarray) -> float:
        return frechet_to_reference(feats, ctx.ref.gaussian, device=ctx.device)

    def kd(feats: np.ndarray) -> float:
        return kernel_distance(feats, ctx.ref.feats, int(ctx.cfg["kid_subsets"]), seed=ctx.seed, device=ctx.device)

    return {**with_uncertainty(ctx.fd_name, fd, ctx.gen_feats, splits),
            **with_uncertainty(ctx.kd_name, kd, ctx.gen_feats, splits)}


@register_metric("diversity", reports=tuple(f"{n}{px}" for n in ("diversity", "precision", "recall", "density",
                                                                   "coverage") for px in ("", "_px")))
def diversity_metric(ctx: EvalContext) -> dict[str, float]:
    """How varied the samples are and how much of the training set they cover
    (:mod:`sweeper.eval.diversity`): ``diversity``, ``precision``, ``recall``, ``density``,
    ``coverage`` in the evaluation's feature space, and the same with ``_px`` in the pixels of the
    thumbnails (a collapse onto one blurred face shows there at low resolution where Inception
    barely sees it); each with ``_se`` and split values like the distances. k: ``eval.prdc_k``."""
    n = len(ctx.gen_feats)
    if n < 2:
        return {}
    k = int(ctx.cfg.get("prdc_k") or EVAL_DEFAULTS["prdc_k"])
    splits = split_slices(n, split_count(n, int(ctx.cfg.get("se_splits") or 0)))
    memo = ctx.ref.memo  # the training side, once per evaluator
    out = spread_metrics(ctx.gen_feats, ctx.ref.feats, k, splits, "", ctx.device, memo.setdefault("features", {}))
    if ctx.gen_thumbs is not None:
        px = memo.setdefault("pixels", {})
        if "train" not in px:
            px["train"] = pixel_vectors(thumbnails(ctx.real_images))
        out.update(spread_metrics(pixel_vectors(ctx.gen_thumbs), px["train"], k, splits, "_px", ctx.device, px))
    return out


@register_metric("memorization", reports=("memorized_frac", "nn_dist_median"))
def memorization_metric(ctx: EvalContext) -> dict[str, float]:
    """``memorized_frac`` and ``nn_dist_median``, with the samples nearest the training set
    shown beside their nearest training images."""
    if ctx.nn_dist is None:
        return {}
    out = memorization_metrics(ctx.nn_dist, ctx.ref.memorization_threshold)
    if ctx.closest:
        rows_feats = np.stack([c[3] for c in ctx.closest])
        d3, i3 = ctx.index.query(rows_feats, k=NEAREST_K)
        ctx.add_artifact(pictures.save_nearest(
            torch.stack([c[2] for c in ctx.closest]), ctx.real_images, i3, d3, ctx.ref.memorization_threshold,
            ctx.path("nearest"),
        ))
    return out


@register_metric("cluster_usage", reports=("cluster_perplexity",))
def cluster_usage_metric(ctx: EvalContext) -> dict[str, float]:
    """For families with memory clusters (``cluster_assignments``): the effective number of
    clusters in use (perplexity of the usage histogram), a cluster map and the histogram."""
    fn = getattr(ctx.model, "cluster_assignments", None)
    if fn is None:
        return {}
    n = max(CLUSTER_MAP_SAMPLES, min(int(ctx.cfg["grid_size"]), int(ctx.cfg["n_gen"])))
    images, assigns, n_clusters = [], [], None
    for b, size in ctx.batches(min(n, int(ctx.cfg["n_gen"]))):
        got = fn(size, batch_seed(ctx.seed, b))
        if got is None:
            return {}
        img, assign, n_clusters = got
        images.append(quantize(img).cpu())
        assigns.append(assign.cpu().long())
    images_t, assign_t = torch.cat(images), torch.cat(assigns)
    usage = pictures.cluster_usage(assign_t, int(n_clusters))
    p = usage[usage > 0]
    k = min(CLUSTER_MAP_SAMPLES, len(images_t))
    ctx.add_artifact(pictures.save_cluster_map(images_t[:k], assign_t[:k], int(n_clusters), ctx.path("clusters")))
    ctx.add_artifact(pictures.save_cluster_histogram(assign_t, int(n_clusters), ctx.path("cluster_usage")))
    return {"cluster_perplexity": float(np.exp(-(p * np.log(p)).sum()))}


@register_metric("sample_types", reports=("frac_memorized", "frac_spurious", "frac_generalized", "delta_m", "delta_s",
                                          "delta_m_fallback", "delta_s_fallback", "spurious_clusters",
                                          "largest_attractor_frac", "null_frac_memorized", "null_frac_spurious"))
def sample_types_metric(ctx) -> dict[str, float]:
    """``frac_memorized``, ``frac_spurious``, ``frac_generalized``, the thresholds ``delta_m`` /
    ``delta_s`` (and whether each is the fallback), ``spurious_clusters`` and
    ``largest_attractor_frac``, and with held-out images the null baseline ``null_frac_*``;
    pictures: samples of each type beside their nearest training images and nearest generated
    samples, and the two histograms. The thresholds are calibrated on the whole folder (training
    and held-out images), once per evaluator."""
    if len(ctx.gen_feats) < 2:
        return {}
    real_thumbs = thumbnails(ctx.real_images)
    memo = ctx.ref.memo.setdefault("sample_types", {})
    held = ctx.heldout_images if ctx.heldout_images is not None and len(ctx.heldout_images) else None
    if ctx.cfg.get("sample_space", "features") == "pixels" and ctx.gen_thumbs is not None:
        if "pixels" not in memo:
            train_px = pixel_vectors(real_thumbs)
            held_px = None if held is None else pixel_vectors(thumbnails(held))
            memo["pixels"] = (train_px, held_px, calibration_distances(train_px, held_px, ctx.device))
        train, held_v, loo = memo["pixels"]
        gen = pixel_vectors(ctx.gen_thumbs)
        st = classify_samples(gen, train, ctx.device, heldout=held_v, loo=loo)
    else:
        if "features" not in memo:
            held_f = None if held is None else ctx.extractor(held)
            memo["features"] = (held_f, calibration_distances(ctx.ref.feats, held_f, ctx.device))
        held_v, loo = memo["features"]
        gen, train = ctx.gen_feats, ctx.ref.feats
        st = classify_samples(gen, train, ctx.device, d_train=ctx.nn_dist, heldout=held_v, loo=loo)
    ctx.add_artifact(pictures.save_distance_histograms(st, ctx.path("sample_type_histograms")))
    if ctx.gen_thumbs is not None:
        chosen = shown(st, gen)
        rows = [i for t in (MEMORIZED, SPURIOUS, GENERALIZED) for i in chosen[t]]
        if rows:
            dt, it = NearestTrainingImages(train, ctx.device).query(gen[rows], k=SHOW_K)
            ds, js = nearest_others_of(gen, rows, SHOW_K, ctx.device)
            ctx.add_artifact(pictures.save_sample_types(
                st, chosen, ctx.gen_thumbs, real_thumbs, dict(zip(rows, zip(it, dt))), dict(zip(rows, zip(js, ds))),
                ctx.path("sample_types")))
    return st.metrics()

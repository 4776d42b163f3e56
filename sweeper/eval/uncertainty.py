"""How sure a distance is: standard errors from disjoint splits, paired margins between trials, ties.

An evaluation's generated samples are cut into B contiguous, disjoint splits by sample index
(``eval.se_splits``, default 8; split s holds samples ``[s n / B, (s + 1) n / B)``: whole
evaluation batches when the batch size divides n / B). The distance is computed once more on each
split, against the same cached reference. Its noise from the latent bank shrinks like 1 / n, so
the variance of the value over all n samples is the variance over splits of size n / B divided by B:

    se = sd(split values) / sqrt(B)

No sample is drawn or featurised again: the splits reuse the evaluation's features.

Sample i of every trial and every evaluation comes from the same noise (``batch_seed`` in
:mod:`sweeper.eval.evaluator`), so split s of trial A and split s of trial B see the same latents
(common random numbers). Two trials are then compared by their PAIRED difference,

    se_pair = sd(a_s - b_s) / sqrt(B)

which cancels the noise both share; it is much smaller than sqrt(se_a^2 + se_b^2) when the two
generators react alike to the same latents. A trial leads the next one by ``margin`` paired
standard errors; below :data:`TIE_SE` (2: a difference that small is what a fresh latent bank
could undo about one time in twenty, for a normal error) the two are a statistical tie.

>>> splits = split_slices(32, 4)
>>> out = with_uncertainty("fd_x", lambda f: float(f.mean()), np.arange(32.0)[:, None], splits)
>>> round(out["fd_x_se"], 3), out["fd_x_split/0"]
(5.164, 3.5)
>>> compare([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2.0, 2.0).tie     # the same checkpoint: a tie
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

TIE_SE = 2.0  # a lead below this many standard errors of the difference is a tie
# Eval settings that must agree for two trials' splits to hold the same latents.
PAIRING_KEYS = ("eval.seed", "eval.n_gen", "eval.batch_size", "eval.se_splits")


def se_key(metric: str) -> str:
    """The metric holding a distance's standard error, logged at the same step."""
    return f"{metric}_se"


def split_key(metric: str, split: int) -> str:
    """The metric holding a distance's value on one split (MLflow groups ``<metric>_split/*``)."""
    return f"{metric}_split/{split}"


def split_count(n_gen: int, se_splits: int) -> int:
    """The splits an evaluation of ``n_gen`` samples uses: ``se_splits``, but at least 2 samples
    each; 0 (no standard error) when fewer than 2 splits remain."""
    b = min(int(se_splits), int(n_gen) // 2)
    return b if b >= 2 else 0


def split_slices(n_gen: int, splits: int) -> list[slice]:
    """Contiguous, disjoint, near-equal slices of the sample index, the same for every trial."""
    return [slice(s * n_gen // splits, (s + 1) * n_gen // splits) for s in range(splits)]


def standard_error(split_values: Sequence[float]) -> float:
    """The standard error of the value over all samples, from its values on B equal splits."""
    v = np.asarray(split_values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v)))


def with_uncertainty(name: str, distance: Callable[[np.ndarray], float], feats: np.ndarray,
                     splits: list[slice]) -> dict[str, float]:
    """``{name: value, name_se: se, name_split/s: value on split s}`` (just the value without splits)."""
    out = {name: distance(feats)}
    if len(splits) >= 2:
        values = [distance(feats[s]) for s in splits]
        out[se_key(name)] = standard_error(values)
        out.update({split_key(name, s): v for s, v in enumerate(values)})
    return out


def with_uncertainties(values: Callable[[np.ndarray], dict[str, float]], feats: np.ndarray,
                       splits: list[slice]) -> dict[str, float]:
    """:func:`with_uncertainty` for a function that returns several named values from one pass
    (precision, recall, ... of one distance matrix): each name gets its ``_se`` and ``_split/s``."""
    out = dict(values(feats))
    if len(splits) >= 2 and out:
        per_split = [values(feats[s]) for s in splits]
        for name in list(out):
            split_values = [v[name] for v in per_split]
            out[se_key(name)] = standard_error(split_values)
            out.update({split_key(name, s): v for s, v in enumerate(split_values)})
    return out


def splits_of(metrics: dict[str, float], name: str) -> list[float] | None:
    """The split values of ``name`` in a metrics dict, in split order; None when there are none."""
    found = []
    while split_key(name, len(found)) in metrics:
        found.append(float(metrics[split_key(name, len(found))]))
    return found or None


@dataclass(frozen=True)
class Comparison:
    """How far apart two values are: ``diff`` = a - b, ``se`` its standard error, ``paired`` when
    it came from split-by-split differences on the same latents (else from the two SEs combined)."""

    diff: float
    se: float
    paired: bool

    @property
    def margin(self) -> float:
        """|diff| in units of its standard error (0 for equal values, inf for a noiseless difference)."""
        if self.diff == 0:
            return 0.0
        return abs(self.diff) / self.se if self.se > 0 else math.inf

    @property
    def tie(self) -> bool:
        return self.margin < TIE_SE


def compare(a_splits: Sequence[float] | None, b_splits: Sequence[float] | None, a: float, b: float,
            a_se: float | None = None, b_se: float | None = None) -> Comparison | None:
    """The difference ``a - b`` with its error: paired when both have split values of the same
    length (same latents per split; the caller checks the eval settings match), else
    ``sqrt(a_se^2 + b_se^2)``; None when neither is known."""
    if a_splits is not None and b_splits is not None and len(a_splits) == len(b_splits) >= 2:
        d = np.asarray(a_splits, dtype=np.float64) - np.asarray(b_splits, dtype=np.float64)
        return Comparison(a - b, standard_error(d), True)
    if a_se is None or b_se is None:
        return None
    return Comparison(a - b, math.hypot(a_se, b_se), False)

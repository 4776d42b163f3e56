"""The phase diagram of a sweep: memorised, spurious and generalised samples against the training-set size.

Pham et al.'s Figures 3-4 for a sweep (README "Sample types"): when the sweep varied
``data.subset`` (K training images), the final ``frac_memorized`` / ``frac_spurious`` /
``frac_generalized`` of every completed trial against K (one point per trial, the mean per K as a
line, the spread per K as a band); and, for any sweep, the same fractions against the objective.
`sweeper report` writes it as ``phase.png`` with its data as ``phase.csv``.

So that a reader can tell the calibration from the phenomenon, each row also carries the
thresholds (``delta_m``, ``delta_s``), whether each was the fallback, and the null baseline
(``null_frac_memorized`` / ``null_frac_spurious``: held-out real images scored alike, what a
perfect generaliser reads at that K). The K panel draws the null baseline per K as dashed lines and
a trial whose thresholds were a fallback as a hollow point.

    rows = phase_rows(trial_results(client, experiment_id), "fd_randcnn")
    fig = phase_figure(rows, "fd_randcnn", "memorization")
    write_phase_table(rows, "fd_randcnn", "report/phase.csv")
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sweeper.eval.pictures import TYPE_COLOURS
from sweeper.keys import COMPLETED, FRACTIONS

SUBSET = "data.subset"
CALIBRATION = ("delta_m", "delta_s", "delta_m_fallback", "delta_s_fallback", "null_frac_memorized",
               "null_frac_spurious")  # per trial, final values; NaN where not logged


@dataclass
class PhaseRow:
    """One completed trial: its K (None: every image) and final objective and fractions."""

    run_name: str
    run_id: str
    k: int | None
    objective: float
    fractions: tuple[float, float, float]
    calibration: tuple[float, ...] = ()  # CALIBRATION's values

    def value(self, name: str) -> float:
        return self.calibration[CALIBRATION.index(name)] if self.calibration else math.nan

    @property
    def fallback(self) -> bool:
        return self.value("delta_m_fallback") == 1.0 or self.value("delta_s_fallback") == 1.0


def phase_rows(trials, metric: str) -> list[PhaseRow]:
    """Completed trials that logged the three fractions, ordered by K then run name."""
    rows = []
    for t in trials:
        if t.status != COMPLETED or not all(f in t.metrics for f in FRACTIONS):
            continue
        k = t.params.get(SUBSET)
        rows.append(PhaseRow(t.run_name, t.run_id, int(float(k)) if k not in (None, "", "None") else None,
                             float(t.metrics.get(metric, math.nan)), tuple(float(t.metrics[f]) for f in FRACTIONS),
                             tuple(float(t.metrics.get(c, math.nan)) for c in CALIBRATION)))
    return sorted(rows, key=lambda r: (r.k is None, r.k or 0, r.run_name))


def write_phase_table(rows: list[PhaseRow], metric: str, path: str | Path) -> Path:
    """The figure's data, one line per trial: run, run id, K, the objective, the three fractions,
    the thresholds, their fallback flags and the null baseline."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_name", "run_id", SUBSET, metric, *FRACTIONS, *CALIBRATION])
        for r in rows:
            w.writerow([r.run_name, r.run_id, "" if r.k is None else r.k, repr(r.objective), *map(repr, r.fractions),
                        *(repr(r.value(c)) for c in CALIBRATION)])
    return path


def phase_figure(rows: list[PhaseRow], metric: str, name: str) -> plt.Figure:
    """K panel (when the sweep varied ``data.subset``) and the objective panel."""
    if not rows:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.set_axis_off()
        ax.set_title("Memorised / spurious / generalised")
        ax.text(0.5, 0.5, "no completed trial logged frac_memorized, frac_spurious and frac_generalized\n"
                "(the sample_types metric; sweeps from before it have only memorized_frac)",
                ha="center", va="center", fontsize=10, transform=ax.transAxes)
        return fig
    ks = sorted({r.k for r in rows if r.k is not None})
    by_k = len(ks) > 1
    fig, axes = plt.subplots(1, 2 if by_k else 1, figsize=(13 if by_k else 6.5, 4.6), squeeze=False)
    if by_k:
        _against_k(axes[0][0], [r for r in rows if r.k is not None], ks)
    _against_objective(axes[0][-1], rows, metric)
    fig.suptitle(f"Sample types of sweep {name!r}: final fractions of each completed trial "
                 f"({len(rows)} trials)", fontsize=10)
    fig.tight_layout()
    return fig


def _against_k(ax, rows: list[PhaseRow], ks: list[int]) -> None:
    for j, frac in enumerate(FRACTIONS):
        colour = TYPE_COLOURS[j]
        for hollow in (False, True):  # hollow: a trial whose delta_m or delta_s was the fallback
            some = [r for r in rows if r.fallback == hollow]
            ax.scatter([r.k for r in some], [r.fractions[j] for r in some], s=22, alpha=0.6,
                       facecolors="none" if hollow else colour, edgecolors=colour if hollow else "none")
        per_k = [np.array([r.fractions[j] for r in rows if r.k == k]) for k in ks]
        mean = np.array([v.mean() for v in per_k])
        sd = np.array([v.std() for v in per_k])
        ax.plot(ks, mean, color=colour, marker="o", linewidth=1.6, label=f"{frac[5:]} (mean per K)")
        ax.fill_between(ks, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=colour, alpha=0.15,
                        linewidth=0)
        null = f"null_{frac}"
        if null in CALIBRATION:
            base = [np.nanmean([r.value(null) for r in rows if r.k == k] or [math.nan]) for k in ks]
            if np.isfinite(base).any():
                ax.plot(ks, base, color=colour, linestyle="--", linewidth=1.2,
                        label=f"{frac[5:]} of held-out real images (null)")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"training images K ({SUBSET})")
    ax.set_ylabel("fraction of generated samples")
    ax.set_title("against the training-set size (points: trials, hollow where a threshold fell back; "
                 "band: +-1 sd per K)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _against_objective(ax, rows: list[PhaseRow], metric: str) -> None:
    for j, frac in enumerate(FRACTIONS):
        ax.scatter([r.objective for r in rows], [r.fractions[j] for r in rows], color=TYPE_COLOURS[j], s=26,
                   alpha=0.75, label=frac[5:])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"{metric} (final)")
    ax.set_ylabel("fraction of generated samples")
    ax.set_title(f"against the objective {metric}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

"""Ranking a sweep's trials: which completed trials win by a metric, with the standard error of
each ranked value and each one's margin over the next.

    ranking = best_trials(ref, "fid", mode="min", top=3)   # completed trials, by their best value
    ranking = best_trials(ref, "fid", at="final")          # or by their final value
    ranking = best_trials(ref, top=3)                      # by the objective the sweep stored

A trial is ranked by its BEST value of the metric (``at="best"``, the default: the evaluation a
checkpoint was kept for), or by its FINAL value (``at="final"``: the value at its largest step).
Only trials that finished their whole budget (``sweeper.status=completed``) compete: a pruned
trial never had its later evaluations, so its values are not comparable. ``include_pruned`` lets
them in anyway. ``max_memorized`` drops trials whose final ``frac_memorized`` (the sample types;
``memorized_frac`` for a sweep from before them) is above it: with a hundred training images a
generator can win on FID by copying them. A trial whose latest evaluation broke
``sweep.constraints`` (tag ``sweeper.violates``) is left out unless ``include_violating``, and a
collapsed one (tag ``sweeper.collapsed``: its samples one image repeated, which FID against a
hundred images at low resolution can prefer) unless ``include_collapsed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sweeper.errors import SweeperError
from sweeper.eval.uncertainty import PAIRING_KEYS, TIE_SE, Comparison, compare, se_key, split_count, split_key
from sweeper.keys import (
    COLLAPSED_TAG,
    COMPLETED,
    DIVERSITY,
    FAILED,
    FRACTIONS,
    MEMORIZED,
    MODE_TAG,
    OBJECTIVE_TAG,
    PRUNED,
    RUNNING,
    VIOLATES,
)
from sweeper.results.records import SweepRef, open_experiment
from sweeper.store.trial_runs import TrialResult, trial_results
from sweeper.store.tracking import best_point

AT = ("best", "final")  # which value of a trial's curve ranks it


def memorized(metrics: dict[str, float]) -> float | None:
    """The memorised fraction a trial is judged by: ``frac_memorized``, else ``memorized_frac``."""
    return metrics.get(FRACTIONS[0], metrics.get(MEMORIZED))



@dataclass
class Ranking:
    """The outcome of ranking: the eligible trials best first (``rank`` 1, 2, ...) and the counts
    a user needs to judge it."""

    metric: str
    mode: str
    trials: list[TrialResult]
    counts: dict[str, int]  # trial runs by status
    eligible: int = 0  # trials that qualified (before the top-K cut)
    too_memorized: int = 0  # otherwise eligible, dropped by max_memorized
    at: str = "final"  # best | final: which value of each trial ranked it
    violating: int = 0  # otherwise eligible, dropped for breaking sweep.constraints
    collapsed: list[tuple[str, str]] = field(default_factory=list)  # (run name, rule) of those dropped as collapsed
    collapsed_elsewhere: list[tuple[str, str, str]] = field(default_factory=list)  # (name, rule, status): pruned etc.
    min_diversity: float | None = None  # --min-diversity: the collapse rule the table marks by

    def summary(self, sweep: str) -> str:
        c = self.counts
        text = (f"{sweep}: top {len(self.trials)} of {self.eligible} eligible trials by {self.at} {self.metric} ({self.mode}); "
                f"{c[COMPLETED]} completed, {c[PRUNED]} pruned, {c[FAILED]} failed, {c[RUNNING]} running")
        if self.too_memorized:
            text += f"; {self.too_memorized} dropped for {FRACTIONS[0]} above the limit"
        if self.violating:
            text += f"; {self.violating} dropped for violating sweep.constraints (--include-violating keeps them)"
        if self.collapsed:
            which = ", ".join(f"{name} ({rule})" for name, rule in self.collapsed)
            text += f"; {len(self.collapsed)} dropped as collapsed, one image repeated: {which} (--include-collapsed keeps them)"
        if self.collapsed_elsewhere:
            which = ", ".join(f"{name} ({rule}, {status})" for name, rule, status in self.collapsed_elsewhere)
            text += f"; collapsed and not a candidate: {which}"
        return text


def rank(trials: list[TrialResult], metric: str, mode: str = "min", include_pruned: bool = False,
         max_memorized: float | None = None, sweep: str = "the sweep", at: str = "final",
         include_violating: bool = False, include_collapsed: bool = False,
         min_diversity: float | None = None) -> Ranking:
    """Eligible trials, best first, numbered from 1. Raises SweeperError when none qualifies.
    ``at="best"`` ranks by each trial's ``best`` value (a trial without one by its final value).
    Dropped, in this order: a trial whose latest evaluation broke ``sweep.constraints`` (tag
    ``sweeper.violates``) unless ``include_violating``; a collapsed one (tag ``sweeper.collapsed``,
    or with ``min_diversity`` its final ``diversity_px`` below it) unless ``include_collapsed``;
    one whose final memorised fraction is above ``max_memorized``.

    >>> [t.trial_id for t in rank(trials, "fid", "min").trials]  # doctest: +SKIP
    ['a1b2c3d4', '9f8e7d6c']
    """
    pool, count = _candidates(trials, metric, mode, at, include_pruned, max_memorized, min_diversity, sweep)
    violating = collapsed = dropped = 0
    if not include_violating:
        violating, pool = _drop(pool, lambda t: not t.tags.get(VIOLATES), lambda p: (
            f"all {len(p)} candidate trials of {sweep} violate sweep.constraints (e.g. {p[0].tags[VIOLATES]}); "
            "pass --include-violating to rank them anyway"))
    gone: list[TrialResult] = []
    if not include_collapsed:
        flat = [t for t in pool if collapse_rule(t, min_diversity)]
        flat_ids = {t.run_id for t in flat}
        collapsed, pool = _drop(pool, lambda t: t.run_id not in flat_ids, lambda p: (
            f"all {len(p)} candidate trials of {sweep} are collapsed (e.g. {p[0].run_name}: "
            f"{collapse_rule(p[0], min_diversity)}): their samples are one image repeated, not a generator "
            "to export; lower --min-diversity, or pass --include-collapsed to rank them anyway"))
        gone = flat
    if max_memorized is not None:
        def frac(t: TrialResult) -> float:
            value = memorized(t.metrics)
            return math.inf if value is None else value

        dropped, pool = _drop(pool, lambda t: frac(t) <= max_memorized, lambda p: (
            f"all {len(p)} candidate trials of {sweep} have final {FRACTIONS[0]} above {max_memorized:g} "
            f"(the lowest is {min(frac(t) for t in p):.4g}); raise --max-memorized"))
    sign = 1.0 if mode == "min" else -1.0
    pool.sort(key=lambda t: (sign * score(t, metric, at), t.start_time))
    for i, t in enumerate(pool, 1):
        t.rank = i
    candidates = {t.run_id for t in gone} | {t.run_id for t in pool}
    elsewhere = [(t.run_name, collapse_rule(t, min_diversity), t.status) for t in sorted(trials, key=lambda t: t.run_name)
                 if t.run_id not in candidates and collapse_rule(t, min_diversity)]
    return Ranking(metric=metric, mode=mode, trials=pool, counts=count, eligible=len(pool), too_memorized=dropped,
                   at=at, violating=violating, collapsed=[(t.run_name, collapse_rule(t, min_diversity)) for t in gone],
                   collapsed_elsewhere=elsewhere, min_diversity=min_diversity)


def _candidates(trials: list[TrialResult], metric: str, mode: str, at: str, include_pruned: bool,
                max_memorized: float | None, min_diversity: float | None,
                sweep: str) -> tuple[list[TrialResult], dict[str, int]]:
    """The trials of the wanted statuses with a finite ``metric``, after checking the arguments."""
    if mode not in ("min", "max"):
        raise SweeperError(f"--mode {mode!r}: use min or max")
    if at not in AT:
        raise SweeperError(f"--at {at!r}: use best or final")
    if not trials:
        raise SweeperError(f"{sweep} has no trial runs yet; run the sweep first (sweeper run SPACE.yaml)")
    logged = sorted({k for t in trials for k in t.metrics})
    if metric not in logged:
        raise SweeperError(f"no trial of {sweep} logged the metric {metric!r}; logged metrics: {', '.join(logged)}")
    if max_memorized is not None and not {FRACTIONS[0], MEMORIZED} & set(logged):
        raise SweeperError(f"--max-memorized needs {FRACTIONS[0]} (or {MEMORIZED}), which no trial of {sweep} "
                           "logged (eval.metrics left sample_types and memorization out); drop --max-memorized")
    if min_diversity is not None and DIVERSITY not in logged:
        raise SweeperError(f"--min-diversity needs {DIVERSITY}, which no trial of {sweep} logged (eval.metrics "
                           "left diversity out, or the sweep is older than it); drop --min-diversity")
    wanted = {COMPLETED, PRUNED} if include_pruned else {COMPLETED}
    count = {s: sum(t.status == s for t in trials) for s in (COMPLETED, PRUNED, FAILED, RUNNING)}
    pool = [t for t in trials if t.status in wanted and finite(t.metrics.get(metric))]
    if not pool:
        hint = ("; pass --include-pruned to rank pruned trials by their last value"
                if not include_pruned and count[PRUNED] else "")
        raise SweeperError(f"{sweep} has no {'completed or pruned' if include_pruned else COMPLETED} trials with "
                           f"{metric} ({count[PRUNED]} pruned, {count[FAILED]} failed, "
                           f"{count[RUNNING]} running){hint}")
    return pool, count


def _drop(pool: list[TrialResult], keep, message) -> tuple[int, list[TrialResult]]:
    """``(how many were dropped, the kept)``; SweeperError(message(pool)) when none is kept."""
    kept = [t for t in pool if keep(t)]
    if not kept:
        raise SweeperError(message(pool))
    return len(pool) - len(kept), kept


def collapse_rule(t: TrialResult, min_diversity: float | None = None) -> str:
    """Why a trial counts as collapsed, in words (``''`` when it does not): its final ``diversity_px``
    below ``min_diversity`` when given, else the verdict its latest evaluation tagged
    (``sweeper.collapsed``, from ``sweep.collapse``). A trial that never logged it is not judged."""
    if min_diversity is None:
        return t.tags.get(COLLAPSED_TAG) or ""
    value = t.metrics.get(DIVERSITY)
    return f"{DIVERSITY} {value:.3g} < min {min_diversity:g}" if finite(value) and value < min_diversity else ""


def columns(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned text columns (the tables `sweeper best` prints)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def score(t: TrialResult, metric: str, at: str) -> float:
    """The value a trial is ranked by: its best evaluation's (``at="best"``) or its final one."""
    return t.best[0] if at == "best" and t.best is not None else t.metrics[metric]


def stored_objective(experiment) -> dict[str, str]:
    """The objective a sweep stored with its experiment (``{}`` for a sweep from before that)."""
    tags = experiment.tags or {}
    return {"metric": tags[OBJECTIVE_TAG], "mode": tags.get(MODE_TAG, "min")} if OBJECTIVE_TAG in tags else {}


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_trials(ref: SweepRef, metric: str | None = None, mode: str | None = None, top: int = 1,
                include_pruned: bool = False, max_memorized: float | None = None, at: str = "best",
                include_violating: bool = False, include_collapsed: bool = False,
                min_diversity: float | None = None) -> Ranking:
    """The ``top`` best trials of a located sweep. ``metric``/``mode`` default to the sweep's
    objective (the spec's, else the one the sweep stored with its experiment); the mode of another
    metric defaults to ``min``.

    >>> best_trials(locate_sweep(sweep="demo"), "fd_randcnn", top=3).trials  # doctest: +SKIP
    """
    if top < 1:
        raise SweeperError(f"--top {top}: must be at least 1")
    client, exp = open_experiment(ref)
    obj = ref.objective or stored_objective(exp)
    metric = metric or obj.get("metric")
    if not metric:
        raise SweeperError("which metric? pass --metric NAME (e.g. fid), or --space SPACE.yaml to use its objective")
    if mode is None:
        mode = obj.get("mode", "min") if obj.get("metric") == metric else "min"
    trials = trial_results(client, exp.experiment_id)
    histories: dict[str, list] = {}
    for t in trials:
        if at == "best" and metric in t.metrics and t.status in (COMPLETED, PRUNED):
            histories[t.run_id] = client.get_metric_history(t.run_id, metric)
            t.best = best_point(histories[t.run_id], mode)
    ranking = rank(trials, metric, mode, include_pruned, max_memorized, sweep=f"sweep {ref.name!r}", at=at,
                   include_violating=include_violating, include_collapsed=include_collapsed,
                   min_diversity=min_diversity)
    shown = ranking.trials[:top + 1]  # the one after the last shown: the last one's margin
    for t in shown:
        hist = histories.get(t.run_id) or client.get_metric_history(t.run_id, metric)
        t.final_step = max((m.step for m in hist), default=None)
        t.step = t.best[1] if at == "best" and t.best is not None else t.final_step
        t.se, t.splits = uncertainty_at(client, t, metric, t.step)
    for t, nxt in zip(shown, shown[1:]):
        t.lead = lead_over(t, nxt, metric, at)
    ranking.trials = ranking.trials[:top]
    return ranking


def uncertainty_at(client, t: TrialResult, metric: str, step: int | None) -> tuple[float | None, list[float] | None]:
    """``(se, split values)`` of a trial's metric at ``step`` (None where not logged: a sweep from
    before standard errors, a metric without them, ``eval.se_splits: 0``)."""
    if step is None:
        return None, None

    def at_step(key: str) -> float | None:
        hist = sorted((m for m in client.get_metric_history(t.run_id, key) if m.step == step), key=lambda m: m.timestamp)
        return hist[-1].value if hist else None

    se = at_step(se_key(metric))
    if se is None:
        return None, None
    try:
        count = split_count(int(t.params["eval.n_gen"]), int(t.params["eval.se_splits"]))
    except (KeyError, ValueError):
        return se, None
    splits = [at_step(split_key(metric, s)) for s in range(count)]
    return se, (splits if count and None not in splits else None)


def lead_over(t: TrialResult, nxt: TrialResult, metric: str, at: str) -> Comparison | None:
    """``t``'s value minus the next-ranked trial's, with the standard error of that difference:
    paired split by split when both evaluated the same latents (same eval seed, sample count,
    batch size and splits), else the two standard errors combined."""
    same_latents = all(t.params.get(k) == nxt.params.get(k) for k in PAIRING_KEYS)
    return compare(t.splits if same_latents else None, nxt.splits if same_latents else None,
                   score(t, metric, at), score(nxt, metric, at), t.se, nxt.se)


def margin_text(c: Comparison | None) -> str:
    """``4.1``, ``0.3 tie``; ``*`` marks an unpaired error; ``-`` when unknown."""
    if c is None:
        return "-"
    m = "inf" if math.isinf(c.margin) else f"{c.margin:.2g}" if c.margin < 10 else f"{c.margin:.0f}"
    return m + ("" if c.paired else "*") + (" tie" if c.tie else "")


def legend(trials: list[TrialResult]) -> str:
    """The lines under a table that explain its margin column."""
    lines = [f"margin: lead over the next-ranked trial in standard errors of their difference "
             f"(paired: same latents, split by split); below {TIE_SE:g}: a statistical tie"]
    if any(t.lead is not None and not t.lead.paired for t in trials):
        lines.append("*: not paired (different eval settings, or no split values): the two standard errors combined")
    if all(t.se is None for t in trials):
        lines = ["margin: no standard errors logged (a sweep from before them, eval.se_splits: 0, or a metric "
                 "without them); run `sweeper best --reeval N` to measure the spread"]
    return "\n".join(lines)


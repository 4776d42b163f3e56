"""`sweeper best`'s table: the ranked trials with their sample-type fractions, standard errors,
margins, steps, swept values and written configs; only the command line shows it."""

from __future__ import annotations

from sweeper.keys import DIVERSITY, FRACTIONS
from sweeper.results.ranking import Ranking, collapse_rule, columns, legend, margin_text, memorized, score



def format_table(ranking: Ranking, files: list[str] | None = None) -> str:
    """A plain-text table: rank, trial, status, the metric, the memorised / spurious / generalised
    fractions (memorised: ``memorized_frac`` for a sweep from before them), the samples' pixel
    diversity (``diversity_px``; "collapsed" beside it where the trial is), the metric's standard
    error and the margin over the next-ranked trial (ties marked), step, swept values, file; then
    the legend of the margin column."""
    metric, ranked = ranking.metric, ranking.trials
    swept = sorted({k for t in ranked for k in t.swept})
    head = ["rank", "run", "trial", "status", metric, "memorized", "spurious", "generalized", "diversity", "+-se",
            "margin",
            "step"] + [k.split(".")[-1] for k in swept]
    if files:
        head.append("config")
    rows = []
    for i, t in enumerate(ranked):
        fracs = [memorized(t.metrics), t.metrics.get(FRACTIONS[1]), t.metrics.get(FRACTIONS[2])]
        row = [str(t.rank), t.run_name, t.trial_id, t.status, f"{score(t, metric, ranking.at):.5g}",
               *("-" if f is None else f"{f:.3g}" for f in fracs), _diversity(t, ranking.min_diversity),
               "-" if t.se is None else f"{t.se:.2g}",
               margin_text(t.lead), "-" if t.step is None else str(t.step)]
        row += [_short(t.params.get(k, "-")) for k in swept]
        if files:
            row.append(files[i])
        rows.append(row)
    return columns([head] + rows) + "\n" + legend(ranked)


def _diversity(t, min_diversity: float | None) -> str:
    value = t.metrics.get(DIVERSITY)
    shown = "-" if value is None else f"{value:.3g}"
    return f"{shown} collapsed" if collapse_rule(t, min_diversity) else shown




def _short(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    return value if "." not in value else f"{f:.4g}"

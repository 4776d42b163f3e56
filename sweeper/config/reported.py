"""Does anything in this space report the metric a spec names? The objective, every
``sweep.constraints`` metric and the collapse guard's metric are checked against what the space's
evaluations (the registered metrics' ``reports``), its family's training steps (``LOSSES``) and the
trainer itself report, so a typo is one line before any trial instead of a sweep of trials that
all count as failed or infeasible.

    check_reported(sweep, run_config, loc)   # SweeperError: sweep.constraints.not_a_metric: ...

Names match as shell patterns (``nll_k*``), each also with its ``_se`` / ``_split/<i>`` suffix.
Where a metric of the space or the family's training step declares nothing, nobody can tell what
the space reports, and the check is skipped for that space.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Any

from models import get_family
from sweeper.config.run_config import Located
from sweeper.errors import SweeperError
from sweeper.eval.features import EXTRACTORS, distance_names
from sweeper.eval.registry import base_name, metrics_for, reported_names
from sweeper.keys import ACCELERATOR_S, CPU_S, WALL_S

TRAINER = ("steps_per_s", ACCELERATOR_S, CPU_S, WALL_S)  # what every trial reports beside its metrics


def space_reports(run_config: dict[str, Any]) -> list[str] | None:
    """The name patterns a trial of this run config reports; None when that cannot be known."""
    family = get_family(run_config["model"].get("family"))
    ev = run_config.get("eval") or {}
    names = reported_names(metrics_for(run_config["model"]["family"], ev.get("metrics")),
                           str(ev.get("features", "inception")))
    losses = getattr(family, "LOSSES", None)
    if names is None or losses is None:
        return None
    best = [f"best_{n}" for n in names]  # the running best of the objective
    return [*names, *losses, *TRAINER, *best]


def is_reported(name: str, patterns: list[str]) -> bool:
    plain = base_name(name)
    return any(fnmatchcase(plain, p) for p in patterns)


def _hint(name: str, plain: list[str], features: str) -> str:
    for other in EXTRACTORS:  # fid under randcnn features: the name of another extractor's distance
        if other != features and name in distance_names(other):
            ours = distance_names(features)[distance_names(other).index(name)]
            return f"{name} is what eval.features: {other} reports, this space's {features} reports {ours}; "
    near = difflib.get_close_matches(name, plain, n=1)
    return f"did you mean {near[0]!r}? " if near else ""


def check_reported(sweep: dict[str, Any], run_config: dict[str, Any], loc: Located) -> None:
    """Refuse an objective, constraint or collapse metric that nothing in the space reports."""
    patterns = space_reports(run_config)
    if patterns is None:
        return
    named = [(("sweep", "objective", "metric"), sweep["objective"]["metric"])]
    named += [(("sweep", "constraints", m), m) for m in sweep.get("constraints") or {}]
    if (sweep.get("collapse") or {}).get("min") is not None:
        named.append((("sweep", "collapse", "metric"), sweep["collapse"]["metric"]))
    for kp, name in named:
        if not is_reported(name, patterns):
            plain = [p for p in patterns if not any(c in p for c in "*?[")]
            hint = _hint(name, plain, str((run_config.get("eval") or {}).get("features", "inception")))
            raise SweeperError(
                f"{loc.where(kp)}: {name!r} is reported by no evaluation or training step of this space "
                f"({run_config['model']['family']}, eval.features {(run_config.get('eval') or {}).get('features')}); "
                f"{hint}it reports e.g. {', '.join(plain[:8])}")

"""Every Optuna sampler and pruner a spec can name: one entry each, in one place.

An entry says how to build it from the spec, which argument is its warm-up, and (pruners) how
to explain a decision in one line from the same inputs the pruner used:

    sampler = build_sampler(spec.sweep)               # sweep.sampler: {type, seed, args}
    pruner = build_pruner(spec.sweep)                 # sweep.pruner: {type, warmup_steps, args}
    reason = explain_prune(study, frozen_trial, spec.sweep["pruner"], "fid", 88.1, 400)
    # 'fid 88.1 at step 400 (best so far 80.2) > median 61.3 of 5 completed trials at this step'

The percentile family's reason recomputes Optuna's own rule (the trial's best value so far
against the percentile of the completed trials' values at the same step, with ``n_min_trials``),
so a reason can never disagree with the decision it explains.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.config.reasons import shown as digits
from sweeper.errors import SweeperError
from sweeper.eval.guards import BOUNDS
from sweeper.keys import CONSTRAINT_ATTR


# ---------------------------------------------------------------------------- construction
def construct(ctor: Any, what: str, *pos: Any, **kwargs: Any) -> Any:
    """``ctor(*pos, **kwargs)``; a TypeError/ValueError becomes a SweeperError with a suggestion."""
    try:
        with warnings.catch_warnings():
            # the spec chose it on purpose; "experimental" (QMC, Wilcoxon, Patient) is noise here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return ctor(*pos, **kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        hint = ""
        m = re.search(r"unexpected keyword argument '(\w+)'", msg)
        if m:
            known = [n for n in inspect.signature(ctor).parameters if n not in ("self", "wrapped_pruner")]
            close = difflib.get_close_matches(m.group(1), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(known) or 'no arguments'}"
        shown = {k: v for k, v in kwargs.items() if k != "seed"}
        raise SweeperError(f"{what}: bad args {shown}: {msg}{hint}") from None


def grid_space(params: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Grid points per param: categorical choices, every int of an int range; floats need choices."""
    space: dict[str, list[Any]] = {}
    for name, p in params.items():
        if p["type"] == "categorical":
            space[name] = list(p["choices"])
        elif p["type"] == "int":
            space[name] = list(range(p["low"], p["high"] + 1, p.get("step", 1)))
        elif p.get("step") is not None:
            n = int(round((p["high"] - p["low"]) / p["step"]))
            space[name] = [p["low"] + i * p["step"] for i in range(n + 1)]
        else:
            raise ValueError(f"the grid sampler cannot enumerate float param {name!r}; give it a step or make it categorical")
    return space


def grid_size(params: dict[str, dict[str, Any]]) -> int:
    n = 1
    for values in grid_space(params).values():
        n *= len(values)
    return n


# ---------------------------------------------------------------------------- samplers
@dataclass(frozen=True)
class SamplerEntry:
    build: Callable[[dict[str, Any], int | None, dict[str, Any]], optuna.samplers.BaseSampler]  # (sweep, seed, args)
    warmup: str | None  # the argument that sets its random start, if it has one
    needs: str | None = None  # a package it needs beyond the project's
    constraints: bool = False  # uses the trials' constraint values (sweep.constraints; Trial.set_constraint)


def _plain(ctor_name: str) -> Callable:
    def build(sweep: dict[str, Any], seed: int | None, args: dict[str, Any]):
        ctor = getattr(optuna.samplers, ctor_name)
        return construct(ctor, f"sampler {sweep['sampler']['type']!r}", seed=seed, **args)
    return build


def _grid(sweep: dict[str, Any], seed: int | None, args: dict[str, Any]):
    try:
        space = args.pop("search_space", None) or grid_space(sweep["params"])
    except ValueError as e:
        raise SweeperError(f"sampler 'grid': {e}") from None
    return construct(optuna.samplers.GridSampler, "sampler 'grid'", space, seed=seed, **args)


SAMPLERS: dict[str, SamplerEntry] = {
    "tpe": SamplerEntry(_plain("TPESampler"), "n_startup_trials", constraints=True),
    "random": SamplerEntry(_plain("RandomSampler"), None),
    "gp": SamplerEntry(_plain("GPSampler"), "n_startup_trials", needs="scipy", constraints=True),
    "cmaes": SamplerEntry(_plain("CmaEsSampler"), "n_startup_trials", needs="cmaes"),
    "qmc": SamplerEntry(_plain("QMCSampler"), None),
    "grid": SamplerEntry(_grid, None),
}


def build_sampler(sweep: dict[str, Any], *, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``sweep.sampler``; ``seed`` overrides the spec's (used on resume).

    >>> build_sampler({"sampler": {"type": "random", "seed": 0, "args": {}}, "params": {}})  # doctest: +SKIP
    <optuna.samplers._random.RandomSampler object at ...>
    """
    s = sweep["sampler"]
    kind = s["type"]
    entry = SAMPLERS[kind]
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        raise SweeperError(f"the {kind} sampler needs the {entry.needs!r} package: pip install {entry.needs} "
                           "(or pick another sampler)")
    args = dict(s.get("args") or {})
    if sweep.get("constraints") and not entry.constraints:
        takes = ", ".join(k for k, e in SAMPLERS.items() if e.constraints)
        raise SweeperError(f"sweep.constraints: the {kind} sampler takes no constraints; use {takes}, "
                           "or drop sweep.constraints")
    return entry.build(sweep, s.get("seed") if seed is None else seed, args)


# ---------------------------------------------------------------------------- constraints
def constraint_names(constraints: dict[str, dict[str, float]]) -> list[str]:
    """One Optuna constraint name per bound of ``sweep.constraints``, in the order of
    :func:`sweeper.eval.guards.violations`' values: ``['loss_g.min', 'memorized_frac.max']``."""
    return [f"{metric}.{bound}" for metric in sorted(constraints) for bound in BOUNDS if bound in constraints[metric]]


def set_constraints(trial: optuna.Trial, constraints: dict[str, dict[str, float]]) -> None:
    """Give a trial about to be told COMPLETE or PRUNED its constraint values (``Trial.set_constraint``,
    Optuna 5's replacement of the samplers' ``constraints_func``; TPE and GP read them from the
    trial): the values the scheduler stored from its latest reported metrics (user attr
    ``constraint``), every bound infinitely violated when it reported none. Set once: Optuna keeps
    the first value of a name."""
    values = list(trial.user_attrs.get(CONSTRAINT_ATTR) or [])
    names = constraint_names(constraints)
    if len(values) != len(names):
        values = [math.inf] * len(names)
    have = trial.constraints
    for name, value in zip(names, values):
        if name not in have:
            trial.set_constraint(name, value)


# ---------------------------------------------------------------------------- pruners
def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _minimize(study: optuna.Study) -> bool:
    return study.direction == optuna.study.StudyDirection.MINIMIZE


def _percentile_pruner(ctor_name: str) -> Callable[[dict[str, Any]], Any]:
    """Optuna's MedianPruner is PercentilePruner(50): one rule, one explanation for both."""
    def build(p: dict[str, Any]):
        args = dict(p.get("args") or {})
        args.setdefault("n_warmup_steps", p.get("warmup_steps", 0))
        return construct(getattr(optuna.pruners, ctor_name), f"pruner {p['type']!r}", **args)
    return build


def _explain_percentile(study, trial: FrozenTrial, p: dict[str, Any], metric: str, value: float, step: int) -> str:
    """Optuna's percentile rule, recomputed: the trial's best value so far against the q-th
    percentile of the completed trials' values at this step (at least n_min_trials of them)."""
    args = p.get("args") or {}
    q = 50.0 if p["type"] == "median" else float(args.get("percentile", 50.0))
    n_min = int(args.get("n_min_trials", 1))
    minimize = _minimize(study)
    own = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
    if not own:
        return f"{metric} is NaN at every step up to {step}"
    best = min(own) if minimize else max(own)
    vals = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if step in t.intermediate_values]
    name = "median" if q == 50.0 else f"{q:g}th percentile"
    shown = f"{metric} {_fmt(value)} at step {step}"
    if best != value:
        shown += f" (best so far {_fmt(best)})"
    if len(vals) < n_min:
        return f"{shown}: {p['type']} pruner (fewer than {n_min} completed trials at this step)"
    thr = float(np.nanpercentile(np.array(vals, dtype=float), q if minimize else 100 - q))
    judged, cut = digits(best, thr)  # the digits that tell the two apart: never "4.734 > median 4.734"
    if best != value:
        shown = f"{metric} {_fmt(value)} at step {step} (best so far {judged})"
    else:
        shown = f"{metric} {judged} at step {step}"
    return f"{shown} {'>' if minimize else '<'} {name} {cut} of {len(vals)} completed trials at this step"


def _explain_rungs(study, trial: FrozenTrial, p: dict[str, Any], metric: str, value: float, step: int) -> str:
    """Successive halving and hyperband record each trial's value at every rung it reached in the
    trial's system attributes (``completed_rung_<r>``); the trial lost at its highest rung: its
    value there was outside the best 1/reduction_factor of the values recorded at that rung."""
    args = p.get("args") or {}
    rf = int(args.get("reduction_factor", 4 if p["type"] == "successive_halving" else 3))
    name = p["type"].replace("_", " ")
    rungs = sorted(int(k.rsplit("_", 1)[1]) for k in trial.system_attrs if k.startswith("completed_rung_"))
    if math.isnan(value):
        return f"{name}: {metric} is NaN at step {step}"
    if not rungs:
        return rung_reason(study, name, metric, value, step, rf)
    key = f"completed_rung_{rungs[-1]}"
    mine = float(trial.system_attrs[key])
    competing = [float(t.system_attrs[key]) for t in study.get_trials(deepcopy=False) if key in t.system_attrs]
    if not any(t.number == trial.number for t in study.get_trials(deepcopy=False) if key in t.system_attrs):
        competing.append(mine)
    ordered = sorted(competing, reverse=not _minimize(study))
    cut = ordered[max(len(ordered) // rf - 1, 0)]
    mine_s, cut_s = digits(mine, cut)
    return (f"{name}: {metric} {mine_s} at rung {rungs[-1]} (step {step}) "
            f"{'>' if _minimize(study) else '<'} cutoff {cut_s}, the best 1/{rf} of the {len(competing)} "
            f"trials that reached that rung")


def rung_reason(study, name: str, metric: str, value: float, step: int, rf: int) -> str:
    """Rung-style reason (Ray's ASHA): the value is outside the best 1/rf of the trials with a
    value at this step."""
    minimize = _minimize(study)
    vals = sorted((t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                   if step in t.intermediate_values and not math.isnan(t.intermediate_values[step])),
                  reverse=not minimize)
    shown = f"{name}: {metric} {_fmt(value)} at step {step} is outside the best 1/{rf}"
    if not vals:
        return shown
    cut = vals[max(len(vals) // rf - 1, 0)]
    return f"{shown} of the {len(vals)} trials at this step (cutoff {_fmt(cut)})"


def _explain_wilcoxon(study, trial: FrozenTrial, p: dict[str, Any], metric: str, value: float, step: int) -> str:
    """The signed-rank test Optuna's WilcoxonPruner ran, recomputed: the trial's curve against the
    best trial's at their common steps."""
    from scipy import stats

    threshold = (p.get("args") or {}).get("p_threshold", 0.1)
    try:
        best = study.best_trial
    except ValueError:
        return f"wilcoxon: the {metric} curve up to step {step} is worse than the best trial's (p < {threshold})"
    common = sorted(set(trial.intermediate_values) & set(best.intermediate_values))
    diff = np.array([trial.intermediate_values[s] - best.intermediate_values[s] for s in common])
    alt = "greater" if _minimize(study) else "less"
    pvalue = float(stats.wilcoxon(diff, alternative=alt, zero_method="zsplit").pvalue) if len(diff) >= 2 else math.nan
    return (f"wilcoxon: the {metric} curve (now {_fmt(value)} at step {step}) is worse than best trial "
            f"#{best.number} at their {len(common)} common steps: signed-rank p = {_fmt(pvalue)} < {threshold}")


def _build_patient(p: dict[str, Any]):
    args = dict(p.get("args") or {})
    wrapped = args.pop("wrapped", None)
    inner = build_pruner({"pruner": wrapped}) if wrapped is not None else None
    return construct(optuna.pruners.PatientPruner, "pruner 'patient'", inner, **args)


def _explain_patient(study, trial: FrozenTrial, p: dict[str, Any], metric: str, value: float, step: int) -> str:
    args = p.get("args") or {}
    text = f"patient: no improvement of {metric} in the last {args.get('patience')} reports (now {_fmt(value)} at step {step})"
    if args.get("wrapped"):
        text += "; and " + explain_prune(study, trial, args["wrapped"], metric, value, step)
    return text


def _native(ctor_name: str) -> Callable[[dict[str, Any]], Any]:
    def build(p: dict[str, Any]):
        return construct(getattr(optuna.pruners, ctor_name), f"pruner {p['type']!r}", **dict(p.get("args") or {}))
    return build


@dataclass(frozen=True)
class PrunerEntry:
    build: Callable[[dict[str, Any]], optuna.pruners.BasePruner]  # from the spec's {type, warmup_steps, args}
    warmup: str | None  # "warmup_steps" (the spec key) or the pruner's own argument for it
    explain: Callable[..., str] | None  # (study, trial, pruner spec, metric, value, step) -> one line


PRUNERS: dict[str, PrunerEntry] = {
    "median": PrunerEntry(_percentile_pruner("MedianPruner"), "warmup_steps", _explain_percentile),
    "percentile": PrunerEntry(_percentile_pruner("PercentilePruner"), "warmup_steps", _explain_percentile),
    "successive_halving": PrunerEntry(_native("SuccessiveHalvingPruner"), "min_resource", _explain_rungs),
    "hyperband": PrunerEntry(_native("HyperbandPruner"), "min_resource", _explain_rungs),
    "wilcoxon": PrunerEntry(_native("WilcoxonPruner"), "n_startup_steps", _explain_wilcoxon),
    "patient": PrunerEntry(_build_patient, None, _explain_patient),
    "none": PrunerEntry(_native("NopPruner"), None, None),
}


def build_pruner(sweep: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The Optuna pruner of ``sweep.pruner`` (``none`` gives NopPruner, which never prunes).

    >>> build_pruner({"pruner": {"type": "median", "warmup_steps": 100, "args": {"n_startup_trials": 3}}})  # doctest: +SKIP
    <optuna.pruners._median.MedianPruner object at ...>
    """
    p = sweep["pruner"]
    if p["type"] not in PRUNERS:
        raise SweeperError(f"unknown pruner type {p['type']!r}; known: {', '.join(PRUNERS)}")
    return PRUNERS[p["type"]].build(p)


def explain_prune(study: optuna.Study, trial: FrozenTrial, pruner: dict[str, Any], metric: str,
                  value: float, step: int) -> str:
    """One line saying why ``pruner`` (a spec ``{type, args, ...}``) stopped ``trial`` at ``step``.

    >>> explain_prune(study, frozen, {"type": "median", "args": {}}, "fd_randcnn", 88.1, 400)  # doctest: +SKIP
    'fd_randcnn 88.1 at step 400 > median 61.3 of 5 completed trials at this step'
    """
    entry = PRUNERS.get(pruner["type"])
    if entry is None or entry.explain is None:
        return f"{pruner['type']} pruner stopped it at step {step} ({metric} {_fmt(value)})"
    return entry.explain(study, trial, pruner, metric, value, step)

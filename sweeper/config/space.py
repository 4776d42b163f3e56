"""Sweep spec: a run config plus a ``sweep:`` section, checked before Ray starts.

A spec file is a normal run config (the one ``sweeper train`` runs) with one more top-level key,
``sweep:``, that says what to search and how. Every mistake a user can make in it is reported
here as a :class:`SweeperError` naming the file, the key path and the line, so a typo costs a
second, not a cluster start.

>>> spec = load_spec("search_spaces/demo.yaml")  # doctest: +SKIP
>>> spec.sweep["objective"]  # doctest: +SKIP
{'metric': 'fid', 'mode': 'min'}
>>> values = suggest(optuna_trial, spec.sweep["params"])  # doctest: +SKIP
>>> values  # doctest: +SKIP
{'model.moca.memory_size': 12, 'model.moca.momentum': 0.4}
>>> trial_config = apply(spec.run_config, values)  # doctest: +SKIP
>>> sampler, pruner = build_sampler(spec.sweep), build_pruner(spec.sweep)  # doctest: +SKIP

Schema of ``sweep:`` (defaults shown; :data:`SWEEP_DEFAULTS` is the one source)::

    sweep:
      objective: {metric: fid, mode: min}      # metric every evaluation reports; min | max
      sampler: {type: tpe, seed: null, args: {}}   # or just "sampler: tpe" (same for pruner)
                                               # tpe | random | gp | cmaes | qmc | grid;
                                               # seed null = the run config's seed;
                                               # args = keyword arguments of the Optuna sampler
      pruner: {type: median, warmup_steps: 0, args: {}}
                                               # median | percentile | successive_halving |
                                               # hyperband | wilcoxon | patient | none;
                                               # warmup_steps -> n_warmup_steps (median, percentile);
                                               # args = keyword arguments of the Optuna pruner;
                                               # patient: args {patience, min_delta, wrapped: <pruner spec>}
      scheduler: optuna                        # optuna (Optuna pruner bridge) | asha (Ray's ASHA) |
                                               # promotion (pauses at rungs, resumes the promoted)
      asha: {grace_period: null, reduction_factor: 3}
                                               # only for scheduler: asha; grace_period null = eval.every
      promotion: {min_step: null, reduction_factor: 3}
                                               # only for scheduler: promotion; rungs at min_step *
                                               # reduction_factor**i before train.steps, each an
                                               # evaluation step; min_step null = eval.every
      patience: {evaluations: null}            # stop a trial after this many evaluations without a
                                               # new best objective value (recorded as pruned); null = never
      constraints: {}                          # e.g. {memorized_frac: {max: 0.2}}: bounds on reported
                                               # metrics, for the tpe/gp sampler and `sweeper best`
      collapse: {metric: diversity_px, min: 0.35, prune: false}
                                               # an evaluation below min is collapsed: tagged,
                                               # counted in the progress line, left out of `sweeper
                                               # best` (sweeper.eval.guards); min null = no guard;
                                               # prune: stop a collapsed trial (after warmup_steps)
      trials: 8                                # planned trials, resumed studies included
      max_concurrent: 2
      resources: {cpus: 1, gpus: 0, workers: 1}   # per trial; workers > 1 = DDP via Ray Train
      tracking: null                           # MLflow tracking URI; null = SQLite in the sweep dir
      params:                                  # required; dotted paths into the run config
        model.moca.memory_size: {type: int, low: 4, high: 64, log: false, step: 1}
        model.moca.momentum: {type: float, low: 0.0, high: 0.99, log: false, step: null}
        model.moca.clusters: {type: categorical, choices: [1, 4, 8]}
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.config.run_config import Located, check_keys, read_yaml, resolve
from sweeper.errors import SweeperError
from sweeper.config.optuna_catalog import PRUNERS as _PRUNER_ENTRIES
from sweeper.config.optuna_catalog import SAMPLERS as _SAMPLER_ENTRIES
from sweeper.config.optuna_catalog import build_pruner, build_sampler, grid_size
from sweeper.config.reported import check_reported
from sweeper.config.params import PARAM_TYPES, apply, check_params, distributions, suggest  # noqa: F401  (the spec's API)

_BY_HAND = object()  # schema marker: free-form mapping or nullable value, checked by hand


class ByHand:
    """A table entry whose value the code below checks (free-form mapping or nullable): its default."""

    def __init__(self, default: Any):
        self.default = default


# The one table of ``sweep:``: defaults, and the types check_keys enforces (the values double as the
# "for example" of its messages). ByHand entries are validated by the code below.
_SWEEP_TABLE: dict[str, Any] = {
    "objective": {"metric": "fid", "mode": "min"},
    "sampler": {"type": "tpe", "seed": ByHand(None), "args": ByHand({})},
    "pruner": {"type": "median", "warmup_steps": 0, "args": ByHand({})},
    "scheduler": "optuna",
    "asha": {"grace_period": ByHand(None), "reduction_factor": 3},
    "promotion": {"min_step": ByHand(None), "reduction_factor": 3},
    "patience": {"evaluations": ByHand(None)},
    "constraints": ByHand({}),
    "collapse": {"metric": "diversity_px", "min": ByHand(0.35), "prune": False},
    "trials": 8,
    "max_concurrent": 2,
    "resources": {"cpus": 1.0, "gpus": 0.0, "workers": 1},
    "tracking": ByHand(None),
    "params": ByHand({}),
}


def _from_table(table: dict[str, Any], by_hand: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out[k] = _from_table(v, by_hand)
        elif isinstance(v, ByHand):
            out[k] = copy.deepcopy(v.default) if by_hand is None else by_hand
        else:
            out[k] = v
    return out


SWEEP_DEFAULTS: dict[str, Any] = _from_table(_SWEEP_TABLE, None)
_SWEEP_SCHEMA: dict[str, Any] = _from_table(_SWEEP_TABLE, _BY_HAND)

SAMPLERS = tuple(_SAMPLER_ENTRIES)  # each one entry in sweeper/optuna_catalog.py
PRUNERS = tuple(_PRUNER_ENTRIES)
SCHEDULERS = ("optuna", "asha", "promotion")

# The values double as the "for example" of type errors.
@dataclass
class Spec:
    """A validated sweep spec.

    ``run_config``: the resolved run config (defaults filled, ``sweep:`` removed) every trial
    starts from. ``sweep``: the ``sweep:`` section with every default filled in. ``path``: the file.
    """

    run_config: dict[str, Any]
    sweep: dict[str, Any]
    path: str


# --------------------------------------------------------------------------------------------
# loading and checking


def load_spec(path: str | Path) -> Spec:
    """Read, check and complete a sweep spec file; every mistake is a SweeperError with file:line.

    >>> spec = load_spec("search_spaces/demo.yaml")  # doctest: +SKIP
    """
    raw, loc = read_yaml(path)
    if "sweep" not in raw:
        raise SweeperError(
            f"{loc.path}: no 'sweep:' section; a sweep spec is a run config plus a 'sweep:' "
            "mapping with at least 'params:' (see the sweeper.config.space docstring)"
        )
    sweep_raw = raw.pop("sweep")
    run_config = resolve(raw, loc)
    sweep = check_sweep(sweep_raw, run_config, loc)
    return Spec(run_config=run_config, sweep=sweep, path=str(path))


def check_sweep(sweep_raw: Any, run_config: dict[str, Any], loc: Located) -> dict[str, Any]:
    """Validate a raw ``sweep:`` mapping against a resolved run config; return it with defaults."""
    sp = ("sweep",)
    if not isinstance(sweep_raw, dict):
        raise SweeperError(f"{loc.where(sp)}: expected a mapping of keys, got {sweep_raw!r}")
    for short in ("sampler", "pruner"):  # "pruner: hyperband" is short for "pruner: {type: hyperband}"
        if isinstance(sweep_raw.get(short), str):
            sweep_raw = {**sweep_raw, short: {"type": sweep_raw[short]}}
    check_keys(sweep_raw, _SWEEP_SCHEMA, loc, sp)
    sweep = _merge_defaults(SWEEP_DEFAULTS, sweep_raw)
    _no_nulls(sweep, SWEEP_DEFAULTS, loc, sp)
    _check_basics(sweep, run_config, loc)
    _check_stopping(sweep, run_config, loc)
    sweep["constraints"] = _check_constraints(sweep["constraints"], sweep["sampler"]["type"], loc)
    _check_collapse(sweep["collapse"], loc)
    sweep["params"] = check_params(sweep["params"], run_config, loc)
    _check_optuna_objects(sweep, loc)
    check_reported(sweep, run_config, loc)
    return sweep


def _need(ok: bool, loc: Located, key: tuple, msg: str) -> None:
    """Raise the one-line error ``<file>:<line>: sweep.<key>: <msg>`` unless ``ok``."""
    if not ok:
        raise SweeperError(f"{loc.where(('sweep',) + key)}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_basics(sweep: dict[str, Any], run_config: dict[str, Any], loc: Located) -> None:
    """Objective, sampler type and seed, scheduler, counts, resources, tracking URI."""
    obj = sweep["objective"]
    _need(isinstance(obj["metric"], str) and obj["metric"] != "", loc, ("objective", "metric"),
          "name the metric every evaluation reports, e.g. fid")
    _need(obj["mode"] in ("min", "max"), loc, ("objective", "mode"), f"{obj['mode']!r}: use min or max")
    _check_choice(sweep["sampler"]["type"], SAMPLERS, "sampler", loc, ("sweep", "sampler", "type"))
    seed = sweep["sampler"]["seed"]
    _need(seed is None or _is_int(seed), loc, ("sampler", "seed"), f"expected an int or null, got {seed!r}")
    if seed is None:
        # the run config's seed: one number makes the whole sweep reproducible
        sweep["sampler"]["seed"] = int(run_config.get("seed", 0))
    _check_choice(sweep["scheduler"], SCHEDULERS, "scheduler", loc, ("sweep", "scheduler"))
    _need(sweep["trials"] >= 1, loc, ("trials",), f"must be >= 1, got {sweep['trials']}")
    _need(sweep["max_concurrent"] >= 1, loc, ("max_concurrent",), f"must be >= 1, got {sweep['max_concurrent']}")
    res = sweep["resources"]
    for key, low in (("cpus", 0), ("gpus", 0), ("workers", 1)):
        _need(res[key] >= low, loc, ("resources", key), f"must be >= {low}, got {res[key]}")
    _need(sweep["tracking"] is None or isinstance(sweep["tracking"], str), loc, ("tracking",),
          f"expected an MLflow tracking URI or null, got {sweep['tracking']!r}")


def _check_stopping(sweep: dict[str, Any], run_config: dict[str, Any], loc: Located) -> None:
    """What stops or pauses a trial besides the pruner: ASHA, promotion rungs, patience."""
    asha, steps = sweep["asha"], run_config["train"]["steps"]
    gp = asha["grace_period"]
    _need(gp is None or (_is_int(gp) and gp >= 1), loc, ("asha", "grace_period"),
          f"expected an int >= 1 (steps) or null, got {gp!r}")
    _need(asha["reduction_factor"] >= 2, loc, ("asha", "reduction_factor"),
          f"must be >= 2, got {asha['reduction_factor']}")
    _need(gp is None or gp <= steps, loc, ("asha", "grace_period"), f"{gp} is more than train.steps ({steps})")
    if sweep["scheduler"] == "promotion":
        _check_promotion(sweep, run_config, loc)
    k = sweep["patience"]["evaluations"]
    _need(k is None or (_is_int(k) and k >= 1), loc, ("patience", "evaluations"),
          f"expected an int >= 1 (evaluations without a new best before a trial stops) or null, got {k!r}")


def _check_optuna_objects(sweep: dict[str, Any], loc: Located) -> None:
    """Constructing the Optuna pruner and sampler is the only complete check of their arguments;
    a constructor's complaint is placed at the argument it names."""
    sp = ("sweep",)
    _check_pruner_spec(sweep["pruner"], loc, sp + ("pruner",))
    sargs = sweep["sampler"]["args"]
    if sargs is None:
        sweep["sampler"]["args"] = sargs = {}
    _need(isinstance(sargs, dict), loc, ("sampler", "args"), f"expected a mapping of keyword arguments, got {sargs!r}")
    for section, build in (("pruner", build_pruner), ("sampler", build_sampler)):
        try:
            build(sweep)
        except SweeperError as e:
            raise SweeperError(f"{_where_arg(loc, sp + (section,), sweep[section], str(e))}: {e}") from None
    if sweep["sampler"]["type"] == "grid":
        n = grid_size(sweep["params"])
        _need(sweep["trials"] <= n, loc, ("trials",),
              f"{sweep['trials']} trials but the grid has only {n} points; lower trials to {n}")


def promotion_rungs(promotion: dict[str, Any], run_config: dict[str, Any]) -> list[int]:
    """The steps where ``scheduler: promotion`` pauses trials: ``min_step * reduction_factor**i``
    below ``train.steps`` (``min_step`` null = ``eval.every``).

    >>> promotion_rungs({"min_step": None, "reduction_factor": 3}, {"train": {"steps": 270}, "eval": {"every": 10}})
    [10, 30, 90]
    """
    steps = int(run_config["train"]["steps"])
    rung, rf = int(promotion["min_step"] or run_config["eval"]["every"]), int(promotion["reduction_factor"])
    out = []
    while rung < steps:
        out.append(rung)
        rung *= rf
    return out


def _check_promotion(sweep: dict[str, Any], run_config: dict[str, Any], loc: Located) -> None:
    """Every rung must be an evaluation step: a trial pauses there with the checkpoint of that very
    step, so its resume trains no step twice and skips none."""
    kp = ("sweep", "promotion")
    p = sweep["promotion"]
    ms, rf = p["min_step"], p["reduction_factor"]
    if not (ms is None or (_is_int(ms) and ms >= 1)):
        raise SweeperError(f"{loc.where(kp + ('min_step',))}: expected an int >= 1 (steps) or null, got {ms!r}")
    if not (_is_int(rf) and rf >= 2):
        raise SweeperError(f"{loc.where(kp + ('reduction_factor',))}: expected an int >= 2, got {rf!r}")
    every, steps = int(run_config["eval"]["every"]), int(run_config["train"]["steps"])
    rungs = promotion_rungs(p, run_config)
    if not rungs:
        raise SweeperError(f"{loc.where(kp + ('min_step',))}: the first rung ({ms or every}) is not below "
                           f"train.steps ({steps}), so nothing would ever be paused; lower it")
    off = [r for r in rungs if r % every]
    if off:
        raise SweeperError(f"{loc.where(kp + ('min_step',))}: rung step {off[0]} (rungs {rungs}) is not an "
                           f"evaluation step (eval.every {every}), so a paused trial would have no checkpoint "
                           f"there; use a min_step that is a multiple of {every}")
    if int(sweep["resources"]["workers"]) > 1:
        raise SweeperError(f"{loc.where(('sweep', 'scheduler'))}: promotion pauses and resumes trials from the "
                           "checkpoints they report to Tune, which DDP trials (resources.workers > 1) do not; "
                           "use scheduler optuna or asha, or workers 1")


def _where_arg(loc: Located, kp: tuple, section: dict, message: str) -> str:
    """The location of the argument a constructor error names (else of ``args`` itself)."""
    args = section.get("args") or {}
    for name in args:
        if f"'{name}'" in message or f"{name}=" in message or f"`{name}`" in message:
            return loc.where(kp + ("args", name))
    wrapped = args.get("wrapped") if isinstance(args, dict) else None
    if isinstance(wrapped, dict):
        for name in wrapped.get("args") or {}:
            if f"'{name}'" in message:
                return loc.where(kp + ("args", "wrapped", "args", name))
    return loc.where(kp + ("args",))


_NULLABLE = {("sweep", "collapse", "min")}  # null is a value here (no collapse guard), though the default is not


def _no_nulls(given: dict, defaults: dict, loc: Located, kp: tuple) -> None:
    """An empty value (``trials:`` with nothing after it) is a mistake wherever the default is not null."""
    for k, d in defaults.items():
        v = given.get(k)
        if isinstance(d, dict) and isinstance(v, dict) and k not in ("args", "params"):
            _no_nulls(v, d, loc, kp + (k,))
        elif v is None and d is not None and k not in ("args",) and kp + (k,) not in _NULLABLE:
            raise SweeperError(f"{loc.where(kp + (k,))}: empty value; give one (default {d!r}) or delete the key")


def _merge_defaults(defaults: dict, given: dict) -> dict:
    """Defaults overlaid with the given values, one level of nesting deep (args stay as given)."""
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params",):
            out[k] = {**out[k], **copy.deepcopy(v)}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_choice(value: Any, allowed: tuple, what: str, loc: Located, kp: tuple) -> None:
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SweeperError(f"{loc.where(kp)}: unknown {what} type {value!r}; {hint}known: {', '.join(allowed)}")


def _check_pruner_spec(pruner: Any, loc: Located, kp: tuple) -> None:
    """Type, keys and the patient pruner's nested ``wrapped`` spec; values are checked by Optuna."""
    if not isinstance(pruner, dict):
        raise SweeperError(f"{loc.where(kp)}: expected a pruner mapping {{type, warmup_steps, args}}, got {pruner!r}")
    check_keys(pruner, _SWEEP_SCHEMA["pruner"], loc, kp)
    pruner.setdefault("type", "median")
    pruner["warmup_steps"] = pruner.get("warmup_steps") or 0
    pruner["args"] = args = {} if pruner.get("args") is None else pruner["args"]
    _check_choice(pruner["type"], PRUNERS, "pruner", loc, kp + ("type",))
    if not isinstance(args, dict):
        raise SweeperError(f"{loc.where(kp + ('args',))}: expected a mapping of keyword arguments, got {args!r}")
    if pruner["warmup_steps"] < 0:
        raise SweeperError(f"{loc.where(kp + ('warmup_steps',))}: must be >= 0, got {pruner['warmup_steps']}")
    warmup = _PRUNER_ENTRIES[pruner["type"]].warmup
    if pruner["warmup_steps"] and warmup != "warmup_steps":
        hint = f"use args.{warmup}" if warmup else "give it to the wrapped pruner"
        raise SweeperError(
            f"{loc.where(kp + ('warmup_steps',))}: warmup_steps applies to the median and percentile pruners "
            f"only, not {pruner['type']!r}; {hint}"
        )
    if pruner["type"] == "patient" and isinstance(args.get("wrapped"), str):
        args["wrapped"] = {"type": args["wrapped"]}  # "wrapped: median" shorthand
    if pruner["type"] == "patient" and args.get("wrapped") is not None:
        _check_pruner_spec(args["wrapped"], loc, kp + ("args", "wrapped"))
        if args["wrapped"]["type"] == "patient":
            raise SweeperError(f"{loc.where(kp + ('args', 'wrapped', 'type'))}: a patient pruner cannot wrap another")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_collapse(collapse: dict[str, Any], loc: Located) -> None:
    low = collapse["min"]
    _need(collapse["metric"] != "", loc, ("collapse", "metric"), "name a diversity metric, e.g. diversity_px")
    _need(low is None or (_is_num(low) and low >= 0), loc, ("collapse", "min"),
          f"expected a number >= 0 (e.g. 0.35), or null for no collapse guard; got {low!r}")


def _check_constraints(constraints: Any, sampler: str, loc: Located) -> dict[str, dict[str, float]]:
    kp = ("sweep", "constraints")
    if constraints is None:
        return {}
    if not isinstance(constraints, dict):
        raise SweeperError(f"{loc.where(kp)}: expected a mapping like {{memorized_frac: {{max: 0.2}}}}, got {constraints!r}")
    for metric, bounds in constraints.items():
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"max", "min"} or \
                not all(_is_num(v) for v in bounds.values()):
            raise SweeperError(f"{loc.where(kp + (metric,))}: expected {{max: X}} and/or {{min: X}} with numbers, "
                               f"got {bounds!r}")
    if constraints and not _SAMPLER_ENTRIES[sampler].constraints:
        takes = ", ".join(k for k, e in _SAMPLER_ENTRIES.items() if e.constraints)
        raise SweeperError(f"{loc.where(kp)}: the {sampler} sampler takes no constraints; use sampler {takes}, "
                           "or drop sweep.constraints")
    return constraints

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
      collapse: {metric: diversity_px, min: 0.35}   # an evaluation below min is collapsed: tagged,
                                               # counted in the progress line, left out of `sweeper
                                               # best` (sweeper.eval.guards); min null = no guard
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

import optuna

from sweeper.config.run_config import Located, check_keys, check_type, read_yaml, resolve, set_dotted
from sweeper.errors import SweeperError
from sweeper.config.optuna_catalog import PRUNERS as _PRUNER_ENTRIES
from sweeper.config.optuna_catalog import SAMPLERS as _SAMPLER_ENTRIES
from sweeper.config.optuna_catalog import build_pruner, build_sampler, grid_size

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
    "collapse": {"metric": "diversity_px", "min": ByHand(0.35)},
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
PARAM_TYPES = ("int", "float", "categorical")

# The values double as the "for example" of type errors.
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "int", "low": 4, "high": 64, "log": False, "step": 1},
    "float": {"type": "float", "low": 0.0, "high": 1.0, "log": False, "step": _BY_HAND},
    "categorical": {"type": "categorical", "choices": [1, 4, 8]},
}

_PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "int": {"log": False, "step": 1},
    "float": {"log": False, "step": None},
    "categorical": {},
}


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
    sweep["params"] = _check_params(sweep["params"], run_config, loc)
    _check_optuna_objects(sweep, loc)
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


def _no_nulls(given: dict, defaults: dict, loc: Located, kp: tuple) -> None:
    """An empty value (``trials:`` with nothing after it) is a mistake wherever the default is not null."""
    for k, d in defaults.items():
        v = given.get(k)
        if isinstance(d, dict) and isinstance(v, dict) and k not in ("args", "params"):
            _no_nulls(v, d, loc, kp + (k,))
        elif v is None and d is not None and k not in ("args",):
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


def _check_params(params: Any, run_config: dict[str, Any], loc: Located) -> dict[str, dict[str, Any]]:
    pp = ("sweep", "params")
    if not isinstance(params, dict) or not params:
        raise SweeperError(
            f"{loc.where(pp)}: no parameters to search; add at least one dotted path, e.g. "
            "'model.moca.memory_size: {type: int, low: 4, high: 64, log: true}'"
        )
    out: dict[str, dict[str, Any]] = {}
    for name, p in params.items():
        kp = pp + (name,)
        if not isinstance(name, str):
            raise SweeperError(f"{loc.where(kp)}: a param name is a dotted path string, got {name!r}")
        _check_path(name, run_config, loc, kp)
        _check_not_fixed(name, run_config, loc, kp)
        if not isinstance(p, dict):
            raise SweeperError(f"{loc.where(kp)}: expected a mapping like {{type: float, low: 0, high: 1}}, got {p!r}")
        ptype = p.get("type")
        if ptype not in PARAM_TYPES:
            close = difflib.get_close_matches(str(ptype), PARAM_TYPES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SweeperError(f"{loc.where(kp + ('type',))}: param type {ptype!r} is not known; {hint}use int, float or categorical")
        check_keys(p, _PARAM_SCHEMAS[ptype], loc, kp)
        q = {**p, **{k: v for k, v in _PARAM_DEFAULTS[ptype].items() if k not in p}}
        _check_range(q, loc, kp)
        out[name] = q
        _check_values_fit(name, q, run_config, loc, kp)
    return out


def _check_path(name: str, run_config: dict[str, Any], loc: Located, kp: tuple) -> None:
    """The dotted path must name a leaf (a value, not a section) of the resolved run config."""
    cur: Any = run_config
    done: list[str] = []
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            known = list(cur) if isinstance(cur, dict) else []
            close = difflib.get_close_matches(part, known, n=1)
            prefix = ".".join(done)
            if close:
                hint = f"did you mean {'.'.join(done + [close[0]])!r}?"
            elif known:
                hint = f"keys under {prefix or 'the top level'}: {', '.join(map(str, known))}"
            else:
                hint = f"{prefix} is a value, not a section"
            raise SweeperError(f"{loc.where(kp)}: {name!r} is not a key of the run config; {hint}")
        cur = cur[part]
        done.append(part)
    if isinstance(cur, dict):
        raise SweeperError(f"{loc.where(kp)}: {name!r} is a section of the run config; name one of its keys: {', '.join(cur)}")


def _check_not_fixed(name: str, run_config: dict[str, Any], loc: Located, kp: tuple) -> None:
    """A family's SWEEP_FIXED keys set how a reported metric is measured: every trial shares them."""
    from models import get_family  # the registry; no concrete model is named here

    for key in getattr(get_family(run_config["model"].get("family")), "SWEEP_FIXED", ()):
        if name == f"model.{key}" or name.startswith(f"model.{key}."):
            raise SweeperError(f"{loc.where(kp)}: {name!r} sets how every trial's metrics are measured, so it "
                               f"cannot differ between trials; set it once under model: and remove it from sweep.params")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_range(q: dict[str, Any], loc: Located, kp: tuple) -> None:
    def need(ok: bool, key: str | None, msg: str) -> None:
        if not ok:
            raise SweeperError(f"{loc.where(kp + ((key,) if key else ()))}: {msg}")

    t = q["type"]
    if t == "categorical":
        choices = q.get("choices")
        need(isinstance(choices, list), "choices", f"expected a list of values, got {choices!r}")
        need(len(choices) > 0, "choices", "empty choices; list at least one value")
        for c in choices:
            need(c is None or isinstance(c, (bool, int, float, str)), "choices",
                 f"choice {c!r} is a {type(c).__name__}; Optuna takes null, bool, int, float or str")
        need(len(set(map(repr, choices))) == len(choices), "choices", f"{choices!r} lists a value twice")
        return
    for key in ("low", "high"):
        need(key in q, key, f"missing; a {t} param needs low and high")
        check_type(q[key], _PARAM_SCHEMAS[t][key], loc, kp + (key,))
        need(q[key] is not None, key, "must be a number")
    low, high, log, step = q["low"], q["high"], q["log"], q["step"]
    need(low < high, None, f"empty range: low {low} >= high {high}; make low < high")
    need(not log or low > 0, "low", f"log scale needs low > 0, got {low}")
    if t == "int":
        need(step is not None and step >= 1, "step", f"must be an int >= 1, got {step!r}")
        need(not (log and step != 1), "step", "log scale needs step 1 (Optuna)")
        need((high - low) % step == 0, "step", f"high - low ({high - low}) is not a multiple of step {step}")
    else:
        need(step is None or (_is_num(step) and step > 0), "step", f"must be a number > 0 or null, got {step!r}")
        need(not (log and step is not None), "step", "log scale and step cannot both be set (Optuna)")


def _check_values_fit(name: str, q: dict[str, Any], run_config: dict[str, Any], loc: Located, kp: tuple) -> None:
    """Each bound / choice, applied alone to the run config, must give a valid run config.

    This catches a choice the model family rejects (or an int key swept with floats) before any
    trial starts; combinations are checked per trial by :func:`apply`.
    """
    probes = q["choices"] if q["type"] == "categorical" else [q["low"], q["high"]]
    key = "choices" if q["type"] == "categorical" else None
    for v in probes:
        if q["type"] in ("int", "float"):
            v = int(v) if q["type"] == "int" else float(v)  # what Optuna will hand out
        try:
            apply(run_config, {name: v})
        except SweeperError as e:
            msg = str(e).removeprefix("<config>: ")
            where = loc.where(kp + ((key,) if key else ()))
            raise SweeperError(f"{where}: value {v!r} gives an invalid run config: {msg}") from None


# --------------------------------------------------------------------------------------------
# using a spec


def suggest(trial: optuna.Trial, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ask an Optuna trial for one value per param; the names are the dotted paths.

    >>> suggest(study.ask(), spec.sweep["params"])  # doctest: +SKIP
    {'model.moca.memory_size': 12, 'model.moca.momentum': 0.41}
    """
    out: dict[str, Any] = {}
    for name, p in params.items():
        if p["type"] == "int":
            out[name] = trial.suggest_int(name, p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False))
        elif p["type"] == "float":
            out[name] = trial.suggest_float(name, p["low"], p["high"], step=p.get("step"), log=p.get("log", False))
        else:
            out[name] = trial.suggest_categorical(name, p["choices"])
    return out


def distributions(params: dict[str, dict[str, Any]]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every param (used to check a resumed study has the same space)."""
    D = optuna.distributions
    out: dict[str, D.BaseDistribution] = {}
    for name, p in params.items():
        if p["type"] == "int":
            out[name] = D.IntDistribution(p["low"], p["high"], log=p.get("log", False), step=p.get("step", 1))
        elif p["type"] == "float":
            out[name] = D.FloatDistribution(p["low"], p["high"], log=p.get("log", False), step=p.get("step"))
        else:
            out[name] = D.CategoricalDistribution(p["choices"])
    return out


def apply(run_config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A new, re-resolved run config with the dotted ``values`` set; keys starting ``__`` are skipped.

    >>> cfg = apply(spec.run_config, {"model.moca.clusters": 4})  # doctest: +SKIP
    >>> cfg["model"]["moca"]["clusters"]  # doctest: +SKIP
    4
    """
    cfg = copy.deepcopy(run_config)
    for dotted, v in values.items():
        if dotted.startswith("__"):
            continue  # bookkeeping keys of the searcher (e.g. the Optuna trial number)
        set_dotted(cfg, dotted, v)
    return resolve(cfg)

"""The ``sweep.params`` of a spec: each a dotted path into the run config with an Optuna
distribution, checked against the config (the path exists and is a leaf, the values fit the
family's checks, a family's SWEEP_FIXED keys are not searched); and the three uses of a checked
table: ``suggest`` (define-by-run), ``distributions`` (ask-and-tell), ``apply`` (a trial's config).

>>> params = check_params(raw["sweep"]["params"], run_config, loc)  # doctest: +SKIP
>>> apply(run_config, suggest(optuna_trial, params))                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import optuna

from sweeper.config.run_config import Located, check_keys, check_type, resolve, set_dotted
from sweeper.errors import SweeperError

PARAM_TYPES = ("int", "float", "categorical")
_FREE = object()  # schema marker: a value checked by hand (a float's step may be null)
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "int", "low": 4, "high": 64, "log": False, "step": 1},
    "float": {"type": "float", "low": 0.0, "high": 1.0, "log": False, "step": _FREE},
    "categorical": {"type": "categorical", "choices": [1, 4, 8]},
}

_PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "int": {"log": False, "step": 1},
    "float": {"log": False, "step": None},
    "categorical": {},
}




def check_params(params: Any, run_config: dict[str, Any], loc: Located) -> dict[str, dict[str, Any]]:
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

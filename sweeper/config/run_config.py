"""Run configuration: the one YAML format that `sweeper train` runs and `sweeper best` writes.

Defaults live here, in one place. A config file only states what differs. Every key is checked
against the defaults (and the model family's own defaults) so a typo is an error naming the file,
the key and its line, never a silently ignored value.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from sweeper.errors import SweeperError
from sweeper.eval.context import EVAL_DEFAULTS
from sweeper.eval.registry import metrics_for

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "data": {
        "path": "builtin:lfw-faces",  # an image folder, s3://bucket/prefix, or builtin:lfw-faces
        "image_size": 32,
        "hflip": True,
        "subset": None,  # K: train (and evaluate) on a seeded subset of K images; null = all
        "subset_seed": 0,  # which K images; subsets of one seed are nested (K=8 lies inside K=16)
    },
    "model": {"family": None},  # required; the family's own keys (optimisers too) come from models/<family>.py
    "train": {
        "steps": 1000,
        "batch_size": 8,
        "checkpoint_every": 500,
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "precision": "fp32",  # fp32 | bf16 (autocast; CUDA only)
        "log_every": 10,
    },
    "eval": dict(EVAL_DEFAULTS),  # sweeper/eval/context.py: the evaluation keeps its own defaults
    "storage": "./runs",  # local folder or s3://bucket/prefix
}

# Keys whose value is a free-form mapping (not checked key by key here).
_FREE = {("model",)}
# Keys that moved: an old config gets told where they live now.
_MOVED = {("train", "lr"): "model.lr", ("train", "betas"): "model.betas", ("train", "ema_decay"): "model.ema_decay"}


class Located:
    """Line numbers of every key path in a YAML file, for error messages."""

    def __init__(self, path: str | None, lines: dict[tuple, int] | None = None):
        self.path = path or "<config>"
        self.lines = lines or {}

    def where(self, keypath: tuple) -> str:
        dotted = ".".join(str(k) for k in keypath)
        line = None
        kp = tuple(keypath)
        while kp and line is None:
            line = self.lines.get(kp)
            kp = kp[:-1]
        return f"{self.path}:{line}: {dotted}" if line else f"{self.path}: {dotted}"


def _lines_of(node: yaml.Node, prefix: tuple, out: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out[key] = k.start_mark.line + 1
            _lines_of(v, key, out)


def read_yaml(path: str | Path) -> tuple[dict, Located]:
    """Parse a YAML mapping; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise SweeperError(f"{path}: no such config file; check the path")
    text = p.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SweeperError(f"{path}{line}: YAML syntax error: {problem}; fix the YAML at that line") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweeperError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    lines: dict[tuple, int] = {}
    if node is not None:
        _lines_of(node, (), lines)
    return data, Located(str(path), lines)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_keys(cfg: dict, schema: dict, loc: Located, prefix: tuple = ()) -> None:
    """Reject keys the schema does not know, and values of the wrong type."""
    for k, v in cfg.items():
        kp = prefix + (k,)
        if k not in schema and kp in _MOVED:
            raise SweeperError(f"{loc.where(kp)}: optimiser settings belong to the model family now; "
                               f"move it to {_MOVED[kp]}")
        if k not in schema:
            close = difflib.get_close_matches(str(k), [str(s) for s in schema], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(map(str, schema))}"
            raise SweeperError(f"{loc.where(kp)}: unknown key {k!r}{hint}")
        ref = schema[k]
        if kp in _FREE:
            continue
        if isinstance(ref, dict):
            if not isinstance(v, dict):
                raise SweeperError(f"{loc.where(kp)}: expected a mapping of keys, got {v!r}")
            check_keys(v, ref, loc, kp)
        else:
            check_type(v, ref, loc, kp)


def check_type(v: Any, ref: Any, loc: Located, kp: tuple) -> None:
    if ref is None or v is None:
        return
    if isinstance(ref, bool):
        ok = isinstance(v, bool)
    elif isinstance(ref, int):
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif isinstance(ref, float):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif isinstance(ref, str):
        ok = isinstance(v, str)
    elif isinstance(ref, list):
        ok = isinstance(v, list)
    else:
        ok = True
    if not ok:
        raise SweeperError(
            f"{loc.where(kp)}: expected {type(ref).__name__}, got {v!r} ({type(v).__name__}); "
            f"for example {ref!r}"
        )


def resolve(raw: dict, loc: Located | None = None) -> dict:
    """Defaults + file values + the model family's defaults, all checked. Returns a full config."""
    from models import get_family  # the registry; no concrete model is named here

    loc = loc or Located(None)
    schema = {k: v for k, v in DEFAULTS.items()}
    check_keys(raw, schema, loc)
    cfg = deep_merge(DEFAULTS, raw)
    try:
        family = get_family(cfg["model"].get("family"))
    except SweeperError as e:
        raise SweeperError(f"{loc.where(('model', 'family'))}: {str(e).split(':', 1)[1].strip()}") from None
    model_schema = {"family": "", **family.DEFAULTS}
    check_keys(raw.get("model", {}), model_schema, loc, ("model",))
    cfg["model"] = deep_merge({"family": family.family_name, **family.DEFAULTS}, raw.get("model", {}))
    _check_values(cfg, loc)
    try:
        family.validate(cfg["model"], cfg["data"]["image_size"])
    except SweeperError as e:
        # the family names the key inside model:, we add the file and line
        msg = str(e)
        key = msg.split(":", 1)[0]
        raise SweeperError(f"{loc.where(tuple(key.split('.')))}: {msg.split(':', 1)[1].strip()}") from None
    return cfg


def _check_values(cfg: dict, loc: Located) -> None:
    def need(cond: bool, kp: tuple, msg: str) -> None:
        if not cond:
            raise SweeperError(f"{loc.where(kp)}: {msg}")

    size = cfg["data"]["image_size"]
    need(size >= 8, ("data", "image_size"), f"{size} is too small; the model family lists what it supports")
    k = cfg["data"]["subset"]
    need(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 2), ("data", "subset"),
         f"{k!r}: use null (every image) or an integer >= 2 (the number of training images)")
    t, e = cfg["train"], cfg["eval"]
    need(t["steps"] >= 1, ("train", "steps"), f"must be >= 1, got {t['steps']}")
    need(t["batch_size"] >= 1, ("train", "batch_size"), f"must be >= 1, got {t['batch_size']}")
    need(t["checkpoint_every"] >= 1, ("train", "checkpoint_every"), "must be >= 1")
    need(t["precision"] in ("fp32", "bf16"), ("train", "precision"), f"{t['precision']!r}: use fp32 or bf16")
    need(e["every"] >= 1, ("eval", "every"), "must be >= 1")
    need(e["n_gen"] >= 2, ("eval", "n_gen"), "must be >= 2")
    b = e["se_splits"]
    need(isinstance(b, int) and not isinstance(b, bool) and (b == 0 or b >= 2), ("eval", "se_splits"),
         f"{b!r}: use 0 (no standard errors) or an integer >= 2 (splits of eval.n_gen; default 8)")
    need(e["features"] in ("inception", "randcnn"), ("eval", "features"), f"{e['features']!r}: use inception or randcnn")
    need(
        e["mode"] in ("clean", "legacy_pytorch", "legacy_tensorflow"),
        ("eval", "mode"),
        f"{e['mode']!r}: use clean, legacy_pytorch or legacy_tensorflow",
    )
    need(e["sample_space"] in ("features", "pixels"), ("eval", "sample_space"),
         f"{e['sample_space']!r}: use features or pixels")
    need(e["metrics"] is None or isinstance(e["metrics"], list), ("eval", "metrics"),
         f"{e['metrics']!r}: use null (every metric) or a list of metric names")
    if e["metrics"] is not None:
        try:
            metrics_for(cfg["model"]["family"], e["metrics"])
        except SweeperError as err:
            raise SweeperError(f"{loc.where(('eval', 'metrics'))}: {str(err).split(':', 1)[1].strip()}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and resolve a run config file (optionally with dotted-key overrides applied)."""
    raw, loc = read_yaml(path)
    if overrides:
        raw = deep_merge(raw, overrides)
    return resolve(raw, loc)


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = cfg
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value


def dump_config(cfg: dict, header: str = "") -> str:
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    if header:
        body = "".join(f"# {line}\n" for line in header.splitlines()) + body
    return body

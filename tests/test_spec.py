"""Sweep spec checking: one invalid file per mistake class, each error names file, key and line.

A tiny model family ``toy`` is registered here so these tests need no real model file.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from sweeper.errors import SweeperError
from sweeper.config.space import SWEEP_DEFAULTS, apply, build_pruner, build_sampler, load_spec, suggest


# The toy family ("toy") is registered once, in conftest.py.


VALID = """\
name: toy-sweep
seed: 3
model:
  family: toy
train:
  steps: 40
eval:
  every: 10
sweep:
  objective: {metric: fd_randcnn, mode: min}
  sampler: {type: tpe, args: {n_startup_trials: 2}}
  pruner: {type: median, warmup_steps: 10, args: {n_startup_trials: 2}}
  trials: 6
  max_concurrent: 1
  params:
    model.moca.memory_size: {type: int, low: 4, high: 64, log: true}
    model.moca.momentum: {type: float, low: 0.0, high: 0.99}
    model.moca.clusters: {type: categorical, choices: [1, 4, 8]}
    model.moca.layer: {type: categorical, choices: [8, 16]}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(SweeperError) as e:
        load_spec(p)
    msg = str(e.value)
    assert msg.startswith(str(p)), msg  # every message names the file first
    return msg


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing needle (the line the error must name)."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_valid_spec_round_trips(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    assert spec.path.endswith("spec.yaml")
    assert "sweep" not in spec.run_config
    assert spec.run_config["model"]["family"] == "toy"
    assert spec.run_config["train"]["steps"] == 40
    sw = spec.sweep
    assert set(sw) == set(SWEEP_DEFAULTS)
    assert sw["objective"] == {"metric": "fd_randcnn", "mode": "min"}
    assert sw["sampler"] == {"type": "tpe", "seed": 3, "args": {"n_startup_trials": 2}}  # seed from run config
    assert sw["scheduler"] == "optuna" and sw["resources"] == {"cpus": 1.0, "gpus": 0.0, "workers": 1}
    assert sw["params"]["model.moca.memory_size"] == {"type": "int", "low": 4, "high": 64, "log": True, "step": 1}
    assert sw["params"]["model.moca.momentum"]["step"] is None

    sampler, pruner = build_sampler(sw), build_pruner(sw)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    study = optuna.create_study(sampler=sampler, pruner=pruner)
    for _ in range(3):
        trial = study.ask()
        values = suggest(trial, sw["params"])
        assert set(values) == set(sw["params"])
        assert 4 <= values["model.moca.memory_size"] <= 64 and values["model.moca.layer"] in (8, 16)
        cfg = apply(spec.run_config, {**values, "__optuna_trial": trial.number})
        assert cfg["model"]["moca"]["clusters"] == values["model.moca.clusters"]
        assert spec.run_config["model"]["moca"]["clusters"] == 4  # apply copies
        study.tell(trial, 1.0)


def test_every_sampler_and_pruner_builds(tmp_path):
    for sampler in ("tpe", "random", "gp", "cmaes", "qmc", "grid"):
        extra = "" if sampler != "grid" else "  trials: 4\n"
        text = VALID.replace("type: tpe, args: {n_startup_trials: 2}", f"type: {sampler}")
        if sampler == "grid":
            text = text.replace("  trials: 6\n", extra).replace(
                "    model.moca.memory_size: {type: int, low: 4, high: 64, log: true}\n"
                "    model.moca.momentum: {type: float, low: 0.0, high: 0.99}\n", "")
            text = text.replace("choices: [1, 4, 8]", "choices: [1, 4]")
        try:
            spec = load_spec(write(tmp_path, text))
        except SweeperError as e:  # cmaes without its package: a clear message, not a crash later
            assert sampler == "cmaes" and "pip install cmaes" in str(e)
            continue
        assert spec.sweep["sampler"]["type"] == sampler
    pruners = {
        "percentile": "{type: percentile, args: {percentile: 25.0}}",
        "successive_halving": "{type: successive_halving, args: {min_resource: 10}}",
        "hyperband": "{type: hyperband, args: {min_resource: 10, max_resource: 40}}",
        "wilcoxon": "{type: wilcoxon, args: {p_threshold: 0.05}}",
        "patient": "{type: patient, args: {patience: 2, wrapped: {type: median, warmup_steps: 10}}}",
        "none": "{type: none}",
    }
    for name, text in pruners.items():
        spec = load_spec(write(tmp_path, VALID.replace(
            "{type: median, warmup_steps: 10, args: {n_startup_trials: 2}}", text)))
        assert type(build_pruner(spec.sweep)).__name__.lower().startswith(
            {"successive_halving": "successivehalving", "none": "nop"}.get(name, name))


# One file per mistake class: (description, yaml text, needle marking the line, expected phrases)
BAD = [
    ("yaml syntax", VALID.replace("  trials: 6", "  trials: 6: 7"), "trials: 6: 7", ["YAML syntax error"]),
    ("unknown sweep key", VALID.replace("  trials: 6", "  trails: 6"), "trails: 6",
     ["sweep.trails", "unknown key 'trails'", "did you mean 'trials'"]),
    ("unknown nested key", VALID.replace("{metric: fd_randcnn, mode: min}", "{metric: fd_randcnn, mdoe: min}"),
     "objective:", ["sweep.objective.mdoe", "did you mean 'mode'"]),
    ("unknown param key", VALID.replace("high: 0.99}", "hihg: 0.99}"), "model.moca.momentum:",
     ["sweep.params.model.moca.momentum.hihg", "did you mean 'high'"]),
    ("unknown run-config key", VALID.replace("  steps: 40", "  stpes: 40"), "stpes", ["train.stpes", "did you mean 'steps'"]),
    ("wrong type", VALID.replace("  trials: 6", "  trials: six"), "trials: six", ["sweep.trials", "expected int", "'six'"]),
    ("wrong bound type", VALID.replace("low: 4, high: 64", "low: four, high: 64"), "model.moca.memory_size:",
     ["sweep.params.model.moca.memory_size.low", "expected int"]),
    ("empty range", VALID.replace("low: 0.0, high: 0.99", "low: 0.99, high: 0.5"), "model.moca.momentum:",
     ["sweep.params.model.moca.momentum", "empty range", "low 0.99 >= high 0.5"]),
    ("log with low <= 0", VALID.replace("low: 4, high: 64, log: true", "low: 0, high: 64, log: true"),
     "model.moca.memory_size:", ["log scale needs low > 0"]),
    ("empty choices", VALID.replace("choices: [1, 4, 8]", "choices: []"), "model.moca.clusters:", ["empty choices"]),
    ("choice the family rejects", VALID.replace("choices: [8, 16]", "choices: [8, 12]"), "model.moca.layer:",
     ["sweep.params.model.moca.layer.choices", "value 12 gives an invalid run config", "use 8 or 16"]),
    ("float swept into an int key", VALID.replace("{type: int, low: 4, high: 64, log: true}",
                                                   "{type: float, low: 4, high: 64}"),
     "model.moca.memory_size:", ["gives an invalid run config", "expected int"]),
    ("unknown sampler", VALID.replace("type: tpe", "type: tpee"), "type: tpee",
     ["sweep.sampler.type", "unknown sampler type 'tpee'", "did you mean 'tpe'"]),
    ("unknown pruner", VALID.replace("type: median", "type: medain"), "type: medain",
     ["sweep.pruner.type", "unknown pruner type 'medain'", "did you mean 'median'"]),
    ("unknown scheduler", VALID.replace("  trials: 6", "  scheduler: ashha\n  trials: 6"), "scheduler: ashha",
     ["sweep.scheduler", "unknown scheduler type 'ashha'", "did you mean 'asha'"]),
    ("bad pruner arg", VALID.replace("args: {n_startup_trials: 2}}\n  trials", "args: {n_startup: 2}}\n  trials"),
     "pruner:", ["sweep.pruner.args.n_startup", "unexpected keyword argument 'n_startup'",
                 "did you mean 'n_startup_trials'"]),
    ("bad pruner value", VALID.replace("{type: median, warmup_steps: 10, args: {n_startup_trials: 2}}",
                                       "{type: percentile, args: {percentile: 150}}"),
     "pruner:", ["sweep.pruner.args.percentile", "percentile"]),
    ("missing pruner arg", VALID.replace("{type: median, warmup_steps: 10, args: {n_startup_trials: 2}}",
                                         "{type: patient}"),
     "pruner:", ["sweep.pruner.args", "patience"]),
    ("warmup on a pruner without it", VALID.replace("{type: median, warmup_steps: 10, args: {n_startup_trials: 2}}",
                                                    "{type: wilcoxon, warmup_steps: 3}"),
     "pruner:", ["sweep.pruner.warmup_steps", "args.n_startup_steps"]),
    ("bad sampler arg", VALID.replace("args: {n_startup_trials: 2}}\n  pruner", "args: {n_startup_trails: 2}}\n  pruner"),
     "sampler:", ["sweep.sampler.args.n_startup_trails", "did you mean 'n_startup_trials'"]),
    ("nonexistent param path", VALID.replace("model.moca.memory_size:", "model.moca.memroy_size:"),
     "memroy_size", ["sweep.params.model.moca.memroy_size", "not a key of the run config",
                     "did you mean 'model.moca.memory_size'"]),
    ("param path is a section", VALID.replace("model.moca.layer:", "model.moca:"), "model.moca:",
     ["is a section of the run config"]),
    ("bad mode", VALID.replace("mode: min}", "mode: minimize}"), "objective:",
     ["sweep.objective.mode", "'minimize': use min or max"]),
    ("empty value", VALID.replace("  trials: 6", "  trials:"), "  trials:", ["sweep.trials", "empty value"]),
    ("trials < 1", VALID.replace("  trials: 6", "  trials: 0"), "trials: 0", ["sweep.trials", "must be >= 1"]),
    ("negative resources", VALID.replace("  trials: 6", "  resources: {cpus: -1}\n  trials: 6"), "resources:",
     ["sweep.resources.cpus", "must be >= 0"]),
    ("no params", VALID[: VALID.index("  params:")], "sweep:", ["sweep.params", "no parameters to search"]),
    ("grid too small", VALID.replace("type: tpe, args: {n_startup_trials: 2}", "type: grid").replace(
        "    model.moca.memory_size: {type: int, low: 4, high: 64, log: true}\n"
        "    model.moca.momentum: {type: float, low: 0.0, high: 0.99}\n", "").replace("trials: 6", "trials: 7"),
     "trials: 7", ["sweep.trials", "7 trials but the grid has only 6 points"]),
]


@pytest.mark.parametrize("what,text,needle,phrases", BAD, ids=[b[0] for b in BAD])
def test_invalid_spec_names_file_key_and_line(tmp_path, what, text, needle, phrases):
    msg = error_of(tmp_path, text)
    line = line_of(text, needle)
    assert f"spec.yaml:{line}:" in msg, (what, msg)
    for phrase in phrases:
        assert phrase in msg, (what, phrase, msg)


def test_short_forms(tmp_path):
    text = VALID.replace("sampler: {type: tpe, args: {n_startup_trials: 2}}", "sampler: random").replace(
        "pruner: {type: median, warmup_steps: 10, args: {n_startup_trials: 2}}",
        "pruner: {type: patient, args: {patience: 2, wrapped: median}}")
    sw = load_spec(write(tmp_path, text)).sweep
    assert sw["sampler"] == {"type": "random", "seed": 3, "args": {}}
    assert sw["pruner"]["args"]["wrapped"] == {"type": "median", "warmup_steps": 0, "args": {}}
    assert isinstance(build_pruner(sw), optuna.pruners.PatientPruner)


def test_missing_sweep_section(tmp_path):
    msg = error_of(tmp_path, VALID[: VALID.index("sweep:")])
    assert "no 'sweep:' section" in msg


def test_apply_rejects_a_bad_combination(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    with pytest.raises(SweeperError, match="model.moca.layer"):
        apply(spec.run_config, {"model.moca.layer": 12})


def test_the_collapse_guard_defaults_on_turns_off_with_null_and_rejects_a_negative_bound(tmp_path):
    import yaml

    raw = yaml.safe_load(VALID)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(str(path)).sweep["collapse"] == {"metric": "diversity_px", "min": 0.35, "prune": False}
    raw["sweep"]["collapse"] = {"min": None}
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(str(path)).sweep["collapse"] == {"metric": "diversity_px", "min": None, "prune": False}
    raw["sweep"]["collapse"] = {"min": -0.1}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweeperError, match=r"sweep\.collapse\.min: expected a number >= 0 \(e\.g\. 0\.35\), or null"):
        load_spec(str(path))


# ---------------------------------------------------------------------------- metrics nothing reports
def _real(tmp_path: Path, **sweep) -> Path:
    """A tiny MoCA-FastGAN space (randcnn features: it reports fd_randcnn / kd_randcnn, not fid)."""
    import yaml

    from conftest import tiny_spec

    p = tmp_path / "real.yaml"
    p.write_text(yaml.safe_dump(tiny_spec("real", sweep={
        "params": {"model.moca.memory_size": {"type": "int", "low": 4, "high": 8}}, **sweep})))
    return p


@pytest.mark.parametrize("sweep,key,hint", [
    ({"sampler": {"type": "tpe", "seed": 0}, "constraints": {"not_a_metric": {"max": 1}}},
     "sweep.constraints.not_a_metric", ""),
    ({"objective": {"metric": "fid", "mode": "min"}}, "sweep.objective.metric",
     "fid is what eval.features: inception reports, this space's randcnn reports fd_randcnn; "),
    ({"objective": {"metric": "fd_randcn", "mode": "min"}}, "sweep.objective.metric", "did you mean 'fd_randcnn'? "),
    ({"collapse": {"metric": "diversity_pix", "min": 0.3}}, "sweep.collapse.metric", "did you mean 'diversity_px'? "),
], ids=["constraint", "fid_with_randcnn", "typo", "collapse"])
def test_a_metric_no_evaluation_of_the_space_reports_is_one_line_before_any_trial(tmp_path, sweep, key, hint):
    with pytest.raises(SweeperError) as e:
        load_spec(_real(tmp_path, **sweep))
    msg = str(e.value)
    assert f": {key}: " in msg and "is reported by no evaluation or training step of this space" in msg, msg
    assert hint in msg and "\n" not in msg


def test_losses_split_values_and_every_family_metric_are_known_names(tmp_path):
    ok = {"loss_g": {"min": 0.1}, "diversity_px": {"min": 0.35}, "fd_randcnn_se": {"max": 1.0},
          "frac_memorized": {"max": 0.2}, "cluster_perplexity": {"min": 1.0}, "steps_per_s": {"min": 0.0}}
    spec = load_spec(_real(tmp_path, sampler={"type": "tpe", "seed": 0}, constraints=ok))
    assert sorted(spec.sweep["constraints"]) == sorted(ok)


def test_a_space_with_an_undeclared_metric_is_not_second_guessed(tmp_path):
    from sweeper.eval.registry import _METRICS, register_metric

    register_metric("undeclared_extra")(lambda ctx: {"whatever": 1.0})
    try:
        spec = load_spec(_real(tmp_path, sampler={"type": "tpe", "seed": 0}, constraints={"whatever": {"max": 2}}))
        assert "whatever" in spec.sweep["constraints"]
    finally:
        _METRICS.pop("undeclared_extra")


def test_the_command_line_refuses_it_with_exit_2_and_starts_nothing(tmp_path, capsys):
    from sweeper.cli import main

    path = _real(tmp_path, sampler={"type": "tpe", "seed": 0}, constraints={"not_a_metric": {"max": 1}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep.constraints.not_a_metric" in err
    assert not (tmp_path / "sweeps").exists()

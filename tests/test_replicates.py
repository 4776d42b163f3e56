"""`sweeper best --replicates N`: the top configuration of a finished tiny sweep trained again with
N more training seeds through Ray, logged to the sweep's MLflow experiment, ranked by the mean."""

from __future__ import annotations

import contextlib
import io
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml
import json

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from conftest import tiny_spec  # noqa: E402
from sweeper.cli import main  # noqa: E402
from sweeper.results.replicates import Replicated, replicate_seeds  # noqa: E402

NAME = "replicated"
SPEC = tiny_spec(NAME, train={"steps": 10, "checkpoint_every": 10}, eval={"every": 10}, sweep={
    "params": {"model.moca.memory_size": {"type": "int", "low": 2, "high": 16}},
})
METRIC = SPEC["sweep"]["objective"]["metric"]
PRINTED: dict = {}  # what the finished sweep returned and printed


def test_replicate_seeds_differ_from_the_original_and_from_each_other():
    for seed in (0, 7, -3):
        seeds = replicate_seeds(seed, 3)
        assert len(set(seeds)) == 3 and seed not in seeds
        assert seeds == replicate_seeds(seed, 3)  # deterministic: a re-run asks for the same ones


def test_mean_and_sd_cover_the_original_and_its_replicates():
    row = Replicated(trial=None, seed=0, value=10.0, values={1: 12.0, 2: 14.0})
    assert row.mean == pytest.approx(12.0) and row.sd == pytest.approx(2.0)
    assert row.replicates_mean == pytest.approx(13.0)
    assert math.isnan(Replicated(trial=None, seed=0, value=1.0).sd)


def test_table_ranks_by_the_mean_and_says_which_replicates_are_missing():
    from types import SimpleNamespace

    from sweeper.results.replicates import format_replicates

    lucky = Replicated(trial=SimpleNamespace(run_name="trial-1", trial_id="aaa", rank=1), seed=0, value=1.0,
                       values={1: 3.0, 2: 3.2}, rank=2)
    steady = Replicated(trial=SimpleNamespace(run_name="trial-2", trial_id="bbb", rank=2), seed=0, value=1.5,
                        values={1: 1.7}, missing=[2], rank=1)
    text = format_replicates([steady, lucky], SimpleNamespace(metric="fid"))
    first, second = [ln.split() for ln in text.splitlines()[1:3]]
    assert first[:3] == ["1", "trial-2", "bbb"] and first[-1] == "2"  # was rank 2, now first by the mean
    assert "1.6" in first and "0.141" in first  # mean and sd of 1.5 and 1.7
    assert "2.4" in second and "1.22" in second  # mean and sd of 1.0, 3.0, 3.2
    assert "no completed run for seed 2" in text and "the same command again trains them" in text


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spec file of a finished 2-trial, 10-step sweep; one local Ray serves the sweep and the
    replicates (each verb leaves a Ray it did not start running)."""
    import ray

    from sweeper.run.sweep import run_sweep

    root = tmp_path_factory.mktemp("replicates")
    spec = root / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "storage": str(root / "sweeps")}))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            summary = run_sweep(str(spec))
        assert summary["completed"] == 2
        PRINTED.update(summary=summary, out=out.getvalue())
        yield spec
    finally:
        ray.shutdown()


def runs_of(spec: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{spec.parent / 'sweeps' / NAME / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    return client, exp, client.search_runs([exp.experiment_id], max_results=100)


def test_replicates_train_new_seeds_of_the_top_config_and_rank_by_their_mean(finished: Path, tmp_path, capsys):
    from sweeper.store.tracking import best_point

    assert main(["best", "--space", str(finished), "--replicates", "2", "--top", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    client, exp, runs = runs_of(finished)
    trials = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    reps = [r for r in runs if r.data.tags.get("sweeper.role") == "replicate"]
    assert len(trials) == 2 and len(reps) == 2  # same experiment; K x N = 1 x 2 replicates
    best_file = yaml.safe_load((tmp_path / "1.yaml").read_text())
    top = [t for t in trials if t.info.run_id in (tmp_path / "1.yaml").read_text()]
    assert len(top) == 1
    assert {r.data.tags["sweeper.replicate_seed"] for r in reps} == {"1", "2"}  # the original trained with seed 0
    assert best_file["seed"] == 0
    for r in reps:
        t = r.data.tags
        assert t["sweeper.replicate_of"] == top[0].info.run_id == t["mlflow.parentRunId"]
        assert t["sweeper.status"] == "completed" and r.info.status == "FINISHED"
        assert r.data.params["seed"] == t["sweeper.replicate_seed"]
        # the same configuration apart from the seed
        assert r.data.params["model.moca.memory_size"] == top[0].data.params["model.moca.memory_size"]
        assert r.data.params["eval.seed"] == top[0].data.params["eval.seed"]

    def value(run_id: str) -> float:
        return best_point(client.get_metric_history(run_id, METRIC), "min")[0]

    values = [value(top[0].info.run_id)] + [value(r.info.run_id) for r in
                                            sorted(reps, key=lambda r: r.data.tags["sweeper.replicate_seed"])]
    assert len(set(values)) == 3  # another training seed trains another model
    row = [ln for ln in out.splitlines() if ln.startswith("1 ") and " | " in ln and top[0].data.tags["sweeper.trial_id"] in ln]
    assert len(row) == 1, out
    cells = row[0].split()
    assert f"{statistics.fmean(values):.5g}" in cells and f"{statistics.stdev(values):.3g}" in cells
    assert all(f"{v:.5g}" in row[0] for v in values)

    # A re-run trains nothing again, and the replicates are not trials of the sweep.
    assert main(["best", "--space", str(finished), "--replicates", "2", "--top", "1", "--out", str(tmp_path)]) == 0
    again = capsys.readouterr().out
    assert "training" not in again and row[0] in again
    assert len([r for r in runs_of(finished)[2] if r.data.tags.get("sweeper.role") == "replicate"]) == 2
    assert "top 1 of 2 eligible trials" in again


def test_the_sweep_section_comes_back_from_the_parent_run_without_a_spec(finished: Path):
    from sweeper.results.replicates import sweep_section
    from sweeper.config.space import load_spec

    client, exp, _ = runs_of(finished)
    assert sweep_section(client, exp.experiment_id) == load_spec(finished).sweep


def test_replicates_below_one_is_a_one_line_error(finished: Path, capsys):
    assert main(["best", "--space", str(finished), "--replicates", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--replicates 0" in err and "at least 1" in err


def test_the_run_summary_shows_the_best_trials_standard_error(finished: Path):
    client, exp, runs = runs_of(finished)
    summary, out = PRINTED["summary"], PRINTED["out"]
    best = summary["best"]
    run = [r for r in runs if r.data.tags.get("sweeper.optuna_trial") == str(best["number"])
           and r.data.tags.get("sweeper.role") == "trial"]
    assert len(run) == 1
    se = run[0].data.metrics[f"{METRIC}_se"]  # logged beside the objective at the last evaluation
    assert se > 0 and best["se"] == pytest.approx(se)
    m = re.search(rf"\[sweeper\] best {METRIC} = (\S+) \(standard error (\S+), optuna trial {best['number']}\)", out)
    assert m, out[-1500:]
    assert float(m.group(1)) == pytest.approx(best["value"], rel=1e-3)
    assert float(m.group(2)) == pytest.approx(se, rel=0.05)
    assert json.loads((finished.parent / "sweeps" / NAME / "summary.json").read_text())["best"]["se"] == pytest.approx(se)


def test_replicates_count_in_the_sweeps_cost_and_the_parent_run_holds_the_new_totals(finished: Path, tmp_path):
    from sweeper.run.cost import experiment_cost

    assert main(["best", "--space", str(finished), "--replicates", "2", "--top", "1", "--out", str(tmp_path)]) == 0
    client, exp, runs = runs_of(finished)
    reps = [r for r in runs if r.data.tags.get("sweeper.role") == "replicate"]
    trials = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert len(reps) == 2 and all(r.data.metrics["cpu_s"] > 0 for r in reps)
    c = experiment_cost(client, exp.experiment_id)
    assert c["replicates_costed"] == 2
    assert c["cpu_s"] == pytest.approx(sum(r.data.metrics["cpu_s"] for r in trials + reps))
    assert c["replicate_cpu_s"] == pytest.approx(sum(r.data.metrics["cpu_s"] for r in reps))
    assert PRINTED["summary"]["cost"]["cpu_s"] < c["cpu_s"]  # the sweep's own total was before them
    parent = [r for r in runs if r.data.tags.get("sweeper.role") == "sweep"][0]
    assert parent.data.metrics["cpu_s"] == pytest.approx(c["cpu_s"])
    assert parent.data.metrics["replicates_costed"] == 2


def test_sweeper_report_counts_the_replicates_in_its_cost_line(finished: Path, tmp_path, capsys):
    from sweeper.run.cost import cost_line, experiment_cost

    client, exp, runs = runs_of(finished)
    if not [r for r in runs if r.data.tags.get("sweeper.role") == "replicate"]:
        assert main(["best", "--space", str(finished), "--replicates", "1", "--top", "1", "--out", str(tmp_path)]) == 0
        capsys.readouterr()
    assert main(["report", "--space", str(finished), "--out", str(tmp_path / "report")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == cost_line(experiment_cost(client, exp.experiment_id)) and "replicate" in first, first

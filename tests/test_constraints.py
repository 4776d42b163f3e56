"""``sweep.constraints`` on the MLflow side: each trial run carries the bounds its latest
evaluation broke (tag ``sweeper.violates``), and `sweeper best` leaves those trials out unless
``--include-violating``. Trial records written by the real TrialTracker (SQLite, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.results.ranking import best_trials
from sweeper.results.records import locate_sweep
from sweeper.cli import main
from sweeper.eval.guards import violation_text, violations
from conftest import ScriptedTrial, write_records  # noqa: E402  (shared test set-up)

CONSTRAINTS = {"memorized_frac": {"max": 0.2}}
# trial id -> {step: (fid, memorized_frac)}: C wins on fid by copying (0.5 at its last evaluation)
TRIALS = {"A": {10: (30.0, 0.1)}, "B": {10: (40.0, 0.0)}, "C": {10: (20.0, 0.5)}}


def write(storage: Path, name: str, trials: dict) -> None:
    write_records(storage, name, {
        trial_id: ScriptedTrial("completed", {step: {"fid": fid, "memorized_frac": memorized}
                                              for step, (fid, memorized) in evals.items()})
        for trial_id, evals in trials.items()}, sweep={"constraints": CONSTRAINTS})


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("constraints") / "sweeps"
    write(root, "bounded", TRIALS)
    write(root, "all-copy", {"C": TRIALS["C"]})
    return root


def test_violations_are_optuna_constraint_values_and_words():
    assert violations({"memorized_frac": 0.5}, CONSTRAINTS) == pytest.approx([0.3])
    assert violations({}, CONSTRAINTS) == [float("inf")]  # not reported: infeasible
    assert violation_text({"memorized_frac": 0.5}, CONSTRAINTS) == "memorized_frac 0.5 > max 0.2"
    assert violation_text({"memorized_frac": 0.1}, CONSTRAINTS) == ""


def test_best_leaves_out_violating_trials_unless_asked(storage: Path):
    ref = locate_sweep(sweep="bounded", storage_root=str(storage))
    ranking = best_trials(ref, "fid", top=10)
    assert [t.trial_id for t in ranking.trials] == ["A", "B"]
    assert ranking.violating == 1 and "1 dropped for violating sweep.constraints" in ranking.summary("s")
    assert ranking.trials[0].tags["sweeper.violates"] == ""
    everyone = best_trials(ref, "fid", top=10, include_violating=True)
    assert [t.trial_id for t in everyone.trials] == ["C", "A", "B"]
    assert everyone.trials[0].tags["sweeper.violates"] == "memorized_frac 0.5 > max 0.2"


def test_only_violating_trials_is_a_one_line_error_naming_the_flag(storage: Path, capsys):
    assert main(["best", "--sweep", "all-copy", "--storage", str(storage), "--metric", "fid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "violate sweep.constraints" in err and "--include-violating" in err
    assert "memorized_frac 0.5 > max 0.2" in err

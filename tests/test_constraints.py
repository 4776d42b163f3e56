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


# ---------------------------------------------------------------------------- the collapse guard
COLLAPSE = {"metric": "diversity_px", "min": 0.35}
# M draws one mean face 64 times and wins on fid; V and W draw varied faces; L is varied at the
# end but only just (0.4: collapsed under --min-diversity 0.5)
SPREAD = {"M": [(10, 400.0, 0.6), (20, 340.0, 0.16)], "V": [(10, 480.0, 0.5), (20, 420.0, 0.72)],
          "W": [(20, 450.0, 0.8)], "L": [(20, 430.0, 0.4)]}


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collapse") / "sweeps"
    for name, which in (("spread", SPREAD), ("one-face", {"M": SPREAD["M"]}),
                        ("stopped", {"P": SPREAD["M"][:1] + [(20, 300.0, 0.1)], "V": SPREAD["V"]})):
        write_records(root, name, {
            tid: ScriptedTrial("pruned" if tid == "P" else "completed",
                               {step: {"fid": fid, "diversity_px": div} for step, fid, div in evals})
            for tid, evals in which.items()}, sweep={"collapse": COLLAPSE})
    return root


def test_a_mean_face_generator_is_tagged_collapsed_and_left_out_of_best(spread: Path):
    ref = locate_sweep(sweep="spread", storage_root=str(spread))
    ranking = best_trials(ref, "fid", top=10, at="final")
    assert [t.trial_id for t in ranking.trials] == ["V", "L", "W"]  # M's fid 340 would win
    assert [(name, rule) for name, rule in ranking.collapsed] == [("trial-0", "diversity_px 0.16 < min 0.35")]
    assert "1 dropped as collapsed" in ranking.summary("s") and "--include-collapsed" in ranking.summary("s")
    everyone = best_trials(ref, "fid", top=10, at="final", include_collapsed=True)
    assert [t.trial_id for t in everyone.trials] == ["M", "V", "L", "W"]
    assert everyone.trials[0].tags["sweeper.collapsed"] == "diversity_px 0.16 < min 0.35"  # the latest evaluation's
    assert everyone.trials[1].tags["sweeper.collapsed"] == ""


def test_min_diversity_judges_the_final_value_instead_of_the_tag(spread: Path):
    ref = locate_sweep(sweep="spread", storage_root=str(spread))
    ranking = best_trials(ref, "fid", top=10, at="final", min_diversity=0.5)
    assert [t.trial_id for t in ranking.trials] == ["V", "W"]  # L (0.4) is below 0.5 too
    assert sorted(rule for _, rule in ranking.collapsed) == ["diversity_px 0.16 < min 0.5", "diversity_px 0.4 < min 0.5"]
    assert [t.trial_id for t in best_trials(ref, "fid", top=10, at="final", min_diversity=0.1).trials] == \
        ["M", "V", "L", "W"]


def test_best_shows_the_diversity_column_and_a_collapsed_only_sweep_is_one_line(spread: Path, capsys, tmp_path):
    assert main(["best", "--sweep", "spread", "--storage", str(spread), "--metric", "fid", "--top", "4", "--at", "final",
                 "--include-collapsed", "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    head, first = out.splitlines()[1:3]
    assert "diversity" in head.split() and "0.16 collapsed" in first
    assert main(["best", "--sweep", "one-face", "--storage", str(spread), "--metric", "fid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "are collapsed" in err and "--include-collapsed" in err


def test_a_collapsed_trial_the_pruner_stopped_is_still_named_in_the_summary(spread: Path):
    ranking = best_trials(locate_sweep(sweep="stopped", storage_root=str(spread)), "fid", top=10)
    assert [t.trial_id for t in ranking.trials] == ["V"] and ranking.collapsed == []
    assert ranking.collapsed_elsewhere == [("trial-0", "diversity_px 0.1 < min 0.35", "pruned")]
    assert "collapsed and not a candidate: trial-0 (diversity_px 0.1 < min 0.35, pruned)" in ranking.summary("s")


def test_min_diversity_marks_the_table_by_its_own_bound_and_needs_the_metric(spread: Path, storage: Path):
    from sweeper.errors import SweeperError
    from sweeper.results.best import format_table

    ranking = best_trials(locate_sweep(sweep="spread", storage_root=str(spread)), "fid", top=10, at="final",
                          include_collapsed=True, min_diversity=0.5)
    marked = {line.split()[2]: "collapsed" in line for line in format_table(ranking).splitlines()[1:5]}
    assert marked == {"M": True, "L": True, "V": False, "W": False}  # L (0.4) has no tag, but is below 0.5
    with pytest.raises(SweeperError, match="--min-diversity needs diversity_px, which no trial of sweep 'bounded' logged"):
        best_trials(locate_sweep(sweep="bounded", storage_root=str(storage)), "fid", min_diversity=0.3)

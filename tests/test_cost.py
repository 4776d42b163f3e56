"""What a sweep cost, from trial records as a sweep writes them (real TrialTracker, SQLite MLflow):
the totals are the sums over trials, per completed trial, and pruning's saving is each pruned
trial's untrained steps at its own measured seconds per step."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeper.results.records import open_experiment, locate_sweep
from sweeper.store.trial_runs import trial_results
from sweeper.run.cost import Meter, cost_line, experiment_cost, sweep_cost
from conftest import ScriptedTrial, write_records  # noqa: E402  (shared test set-up)

STEPS = 100  # train.steps of every scripted trial
# trial id -> (status, the step it stopped at, {step: (accelerator_s, cpu_s, trial_wall_s)})
TRIALS = {
    "A": ("completed", 100, {50: (10.0, 20.0, 10.0), 100: (20.0, 41.0, 20.0)}),
    "B": ("completed", 100, {50: (12.0, 25.0, 12.0), 100: (24.0, 49.0, 24.0)}),
    "P": ("pruned", 50, {50: (5.0, 9.0, 5.0)}),  # 0.1 GPU-s and 0.18 CPU-s per step; 50 steps left
    "F": ("failed", 50, {50: (3.0, 4.0, 3.0)}),
}
# a replicate of A (`sweeper best --replicates`): a run of the experiment, not a trial of the search
REPLICATE = {"R": ("completed", 100, {50: (9.0, 19.0, 9.0), 100: (18.0, 37.0, 18.0)})}


def write_costed(storage: Path, name: str) -> None:
    stops = {"pruned": "sweeper.pruned_at_step", "failed": "sweeper.failed_at_step"}
    role = {"R": {"sweeper.role": "replicate"}}
    write_records(storage, name, {
        trial_id: ScriptedTrial(status, {step: {"fid": 10.0, "accelerator_s": acc, "cpu_s": cpu, "trial_wall_s": wall}
                                         for step, (acc, cpu, wall) in spent.items()},
                                final_step=stop if status == "completed" else None,
                                tags={**({stops[status]: stop} if status in stops else {}), **role.get(trial_id, {})})
        for trial_id, (status, stop, spent) in {**TRIALS, **REPLICATE}.items()}, run={"train": {"steps": STEPS}})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("cost") / "sweeps"
    write_costed(storage, "costed")
    return open_experiment(locate_sweep(sweep="costed", storage_root=str(storage)))


@pytest.fixture(scope="module")
def costed(experiment) -> list:
    client, exp = experiment
    return trial_results(client, exp.experiment_id)


def test_totals_are_the_sums_over_trials_of_their_final_seconds(costed: list):
    c = sweep_cost(costed)
    assert c["trials_costed"] == 4 and c["completed"] == 2
    assert c["accelerator_s"] == pytest.approx(20 + 24 + 5 + 3)  # every trial's last value, failed ones too
    assert c["cpu_s"] == pytest.approx(41 + 49 + 9 + 4)
    assert c["trial_wall_s"] == pytest.approx(20 + 24 + 5 + 3)
    assert c["accelerator_s_per_completed"] == pytest.approx(52 / 2)
    assert c["cpu_s_per_completed"] == pytest.approx(103 / 2)


def test_pruning_saving_is_untrained_steps_at_the_trials_own_rate(costed: list):
    c = sweep_cost(costed)
    assert c["pruned_steps_saved"] == STEPS - 50  # only the pruned trial; a failure saved nothing
    assert c["accelerator_s_saved"] == pytest.approx(50 * 5.0 / 50)
    assert c["cpu_s_saved"] == pytest.approx(50 * 9.0 / 50)
    assert cost_line(c) == ("cost: 0.01 GPU-h, 0.03 CPU-h over 4 trials (0.01 GPU-h, 0.01 CPU-h per completed "
                            "trial); pruning saved ~50 steps, ~0.00 GPU-h, ~0.00 CPU-h")


def test_replicates_count_in_the_totals_but_not_in_the_cost_per_completed_trial(experiment, costed: list):
    client, exp = experiment
    assert "R" not in {t.trial_id for t in costed}  # not a trial of the search
    c, search = experiment_cost(client, exp.experiment_id), sweep_cost(costed)
    assert c["replicates_costed"] == 1 and c["trials_costed"] == 4
    assert c["accelerator_s"] == pytest.approx(search["accelerator_s"] + 18.0)
    assert c["cpu_s"] == pytest.approx(search["cpu_s"] + 37.0)
    assert c["trial_wall_s"] == pytest.approx(search["trial_wall_s"] + 18.0)
    assert (c["replicate_accelerator_s"], c["replicate_cpu_s"]) == pytest.approx((18.0, 37.0))
    assert c["cpu_s_per_completed"] == pytest.approx(search["cpu_s_per_completed"])  # the search's own
    assert c["pruned_steps_saved"] == search["pruned_steps_saved"]
    assert cost_line(c).startswith("cost: 0.02 GPU-h, 0.04 CPU-h over 4 trials and 1 replicate (")  # 70 s, 140 s


def test_a_meter_counts_gpus_times_wall_time_and_goes_on_from_an_earlier_attempt():
    meter = Meter(gpus=2.0, offset={"accelerator_s": 100.0, "cpu_s": 7.0, "trial_wall_s": 50.0})
    sum(i * i for i in range(200_000))  # some CPU time
    got = meter.read()
    wall = got["trial_wall_s"] - 50.0
    assert wall > 0 and got["accelerator_s"] == pytest.approx(100.0 + 2.0 * wall, rel=1e-3)
    assert got["cpu_s"] > 7.0
    assert Meter(gpus=0.0).read()["accelerator_s"] == 0.0  # a CPU trial holds no accelerator

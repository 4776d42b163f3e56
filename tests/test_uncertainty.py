"""How much to trust a ranking: standard errors of the distances, paired margins, ties, and
`sweeper best --reeval`. The standard error is checked against what it claims to predict (the
spread over fresh latent banks); the ranking side runs on one real 3-trial sweep in which two
trials have the same configuration, hence the same checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from conftest import tiny_spec  # noqa: E402
from sweeper.results.ranking import best_trials
from sweeper.results.records import locate_sweep  # noqa: E402
from sweeper.cli import main  # noqa: E402
from sweeper.config.run_config import resolve  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402
from sweeper.eval.evaluator import Evaluator  # noqa: E402
from sweeper.eval.uncertainty import compare, split_count, splits_of  # noqa: E402


# ---------------------------------------------------------------------------- the standard error
def memory_mixture(faces: torch.Tensor, temperature: float):
    """A fixed generator: a softmax mixture of 50 real faces weighted by its latent, plus pixel
    noise; the latent and the noise come from the evaluation's seed, as a family's do."""
    protos = faces[:50].float() / 127.5 - 1

    def sample(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, len(protos), generator=g)
        eps = torch.randn(n, 3, *protos.shape[2:], generator=g)
        w = torch.softmax(z / temperature, dim=1)
        return (torch.einsum("nk,kchw->nchw", w, protos) + 0.1 * eps).clamp(-1, 1)

    return sample


def test_reported_se_matches_the_spread_over_fresh_latent_banks(faces: torch.Tensor, tmp_path: Path):
    """20 evaluations of two fixed generators, each on a fresh latent bank (eval.seed 100..119),
    64 samples in 8 splits, randcnn features of the 32-px images (mode legacy_tensorflow: no
    resize to 299 px, 10x cheaper). The mean reported standard error must be within a factor of 2
    of the standard deviation of the 20 values. Why 2: the FD's spread over banks is heavy-tailed,
    so 20 values pin it down only to about +-25 %, and with 8 samples per split the split estimate
    runs low (the ratio se / spread measured in 10 runs of 20-80 banks: 0.64-1.16, mean 0.8; at 32
    samples per split 0.87-1.01). These seeds give 0.64 (FD) and 0.98 (KD).
    The paired error of the difference must match the spread of the differences likewise, and be
    far smaller than either trial's own error (common random numbers; measured ~6x)."""
    a, b = memory_mixture(faces, 0.3), memory_mixture(faces, 0.35)
    rows = []
    for seed in range(100, 120):
        ev = Evaluator(dict(features="randcnn", mode="legacy_tensorflow", n_gen=64, batch_size=32, kid_subsets=10,
                            grid_size=0, seed=seed, metrics=["distances"], se_splits=8), faces, str(tmp_path),
                       out_dir=str(tmp_path))
        ma, _ = ev.evaluate(a, 0)
        mb, _ = ev.evaluate(b, 0)
        pair = compare(splits_of(ma, "fd_randcnn"), splits_of(mb, "fd_randcnn"), ma["fd_randcnn"], mb["fd_randcnn"])
        assert pair.paired and len(splits_of(ma, "fd_randcnn")) == 8
        rows.append((ma["fd_randcnn"], ma["fd_randcnn_se"], ma["kd_randcnn"], ma["kd_randcnn_se"],
                     mb["fd_randcnn"], mb["fd_randcnn_se"], pair.diff, pair.se))
    fd_a, se_a, kd_a, kse_a, fd_b, se_b, diff, se_diff = map(np.array, zip(*rows))
    for values, ses in ((fd_a, se_a), (kd_a, kse_a), (fd_b, se_b), (diff, se_diff)):
        ratio = ses.mean() / values.std(ddof=1)
        assert 0.5 < ratio < 2.0, (ratio, ses.mean(), values.std(ddof=1))
    assert se_diff.mean() * 3 < min(se_a.mean(), se_b.mean())
    assert abs(diff.mean()) > 3 * diff.std(ddof=1)  # the two generators differ, and pairing shows it


def test_same_values_on_every_split_are_a_tie_and_a_clear_lead_is_not():
    same = compare([3.0, 3.2, 2.9], [3.0, 3.2, 2.9], 3.05, 3.05)
    assert same.paired and same.margin == 0 and same.tie
    shifted = compare([3.0, 3.2, 2.9, 3.1], [3.5, 3.8, 3.3, 3.6], 3.05, 3.55)  # paired se ~0.05
    assert shifted.paired and shifted.margin > 5 and not shifted.tie
    # without splits: the two errors combined, not paired
    apart = compare(None, None, 3.0, 3.1, 0.1, 0.1)
    assert not apart.paired and apart.se == pytest.approx(0.1 * 2**0.5) and apart.tie
    assert compare(None, None, 3.0, 3.1) is None


def test_small_evaluations_use_fewer_splits_and_a_bad_setting_is_one_line():
    assert [split_count(n, 8) for n in (3, 8, 16, 5000)] == [0, 4, 8, 8]
    assert split_count(5000, 0) == 0
    with pytest.raises(SweeperError, match=r"eval\.se_splits: 1: use 0 \(no standard errors\) or an integer >= 2"):
        resolve({"name": "x", "model": {"family": "toy"}, "eval": {"se_splits": 1}})


# ---------------------------------------------------------------------------- a real sweep
NAME = "twins"
EVERY, STEPS = 10, 20
# 3 trials drawn from 2 configurations: two trials share one, train identically (same seed, one
# thread each) and keep the same checkpoints.
SPEC = tiny_spec(NAME, train={"steps": STEPS, "checkpoint_every": EVERY}, eval={"every": EVERY}, sweep={
    "trials": 3, "params": {"model.moca.memory_size": {"type": "categorical", "choices": [4, 8]}},
})


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sweeper.run.sweep import run_sweep

    root = tmp_path_factory.mktemp("twins")
    spec = root / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "storage": str(root / "sweeps")}))
    assert run_sweep(str(spec), num_cpus=2)["completed"] == 3
    return spec


def twin_size(trials) -> str:
    """The memory size two of the three trials share."""
    sizes = [t.params["model.moca.memory_size"] for t in trials]
    return next(s for s in sizes if sizes.count(s) == 2)


def test_every_distance_logs_its_se_and_splits_at_each_evaluation(twins: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(locate_sweep(space=str(twins)).tracking)
    run = client.search_runs([client.get_experiment_by_name(NAME).experiment_id], "tags.`sweeper.role` = 'trial'")[0]
    for key in ("fd_randcnn_se", "kd_randcnn_se", "fd_randcnn_split/0", "fd_randcnn_split/7", "kd_randcnn_split/7"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [EVERY, STEPS], key
    assert "fd_randcnn_split/8" not in run.data.metrics  # n_gen 32: 8 splits of 4 samples
    assert run.data.metrics["fd_randcnn_se"] > 0


def test_two_trials_with_the_same_checkpoint_are_reported_as_tied(twins: Path, tmp_path: Path, capsys):
    ranking = best_trials(locate_sweep(space=str(twins)), top=3)
    twin = twin_size(ranking.trials)
    i, j = [k for k, t in enumerate(ranking.trials) if t.params["model.moca.memory_size"] == twin]
    assert j == i + 1  # equal values rank next to each other
    first, other = ranking.trials[i], ranking.trials[({0, 1, 2} - {i, j}).pop()]
    assert first.splits == ranking.trials[j].splits and first.lead.paired and first.lead.margin == 0 and first.lead.tie
    assert other.splits != first.splits and other.se > 0
    assert main(["best", "--space", str(twins), "--top", "3", "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    row = [ln for ln in out.splitlines() if ln.startswith(f"{i + 1} ")][0]
    assert "0 tie" in row  # margin column: 0 standard errors, a tie
    assert "below 2: a statistical tie" in out
    header = (tmp_path / "best" / f"{i + 1}.yaml").read_text()
    assert f"# uncertainty: +- {first.se:.3g} (standard error over 8 splits" in header
    assert f"TIED with rank {i + 2}" in header


def test_reeval_reranks_the_top_checkpoints_on_fresh_banks_and_logs_to_mlflow(twins: Path, tmp_path: Path, capsys):
    from mlflow.tracking import MlflowClient

    ref = locate_sweep(space=str(twins))
    before = {t.run_id: t for t in best_trials(ref, top=3).trials}
    assert main(["best", "--space", str(twins), "--top", "3", "--reeval", "2", "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "re-evaluated the top 3 by fd_randcnn on 2 fresh latent bank(s) (eval.seed 1235..1236)" in out
    client = MlflowClient(ref.tracking)
    got = {}
    for run_id, t in before.items():
        run = client.get_run(run_id)
        m, tags = run.data.metrics, run.data.tags
        assert m["fd_randcnn_reeval_banks"] == 2 and m["fd_randcnn_reeval_se"] > 0 and m["fd_randcnn_reeval_sd"] > 0
        hist = client.get_metric_history(run_id, "fd_randcnn_reeval_mean")
        assert [h.step for h in hist] == [t.step]  # logged at the step of the checkpoint it evaluated
        assert m["fd_randcnn_reeval_mean"] != pytest.approx(t.best[0], rel=1e-9)  # other latents, other value
        assert "eval.seed 1235, 1236" in tags["sweeper.reeval"] and f"(step {t.step})" in tags["sweeper.reeval"]
        got[int(tags["sweeper.reeval_rank"])] = (m["fd_randcnn_reeval_mean"], t)
    assert sorted(got) == [1, 2, 3]
    means = [got[r][0] for r in (1, 2, 3)]
    assert means == sorted(means)  # re-ranked by the mean (min)
    twin = twin_size(before.values())
    a, b = [mean for mean, t in got.values() if t.params["model.moca.memory_size"] == twin]
    assert a == b  # the same checkpoint on the same fresh banks: equal, and tied
    assert "0 tie" in out.split("re-evaluated the top 3")[1]
    # the written configs follow the re-evaluated order
    assert f"trial: {got[1][1].trial_id}" in (tmp_path / "best" / "1.yaml").read_text()
    assert "# re-evaluated: mean " in (tmp_path / "best" / "1.yaml").read_text()
    assert main(["best", "--space", str(twins), "--reeval", "0", "--out", str(tmp_path / "none")]) == 2
    assert "--reeval 0: the number of fresh latent banks must be at least 1" in capsys.readouterr().err
    parent = client.search_runs([client.get_experiment_by_name(NAME).experiment_id], "tags.`sweeper.role` = 'sweep'")[0]
    assert "reeval/fd_randcnn.txt" in [a.path for a in client.list_artifacts(parent.info.run_id, "reeval")]

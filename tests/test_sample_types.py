"""Memorised, spurious or generalised samples (the DenseAM lens), and the training-set size as a sweep axis."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sweeper.config.run_config import resolve
from sweeper.store.data import sample_batch, subset_indices, training_images
from sweeper.errors import SweeperError
from sweeper.eval.evaluator import Evaluator
from sweeper.eval.memorization import leave_one_out_distances, memorization_metrics, memorization_threshold
from sweeper.eval.sample_types import COPY_SCALE, GENERALIZED, MEMORIZED, SPURIOUS, classify_samples, nearest_other

TOLERANCE = 0.05  # each recovered fraction within 5 points of the truth


def synthetic(seed: int = 0, d: int = 64):
    """Training points; 30 copies of them (memorised), 30 samples around 3 new points (spurious),
    40 scattered new points (generalised). Returns (train, generated, true labels)."""
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((50, d))
    copies = train[np.arange(30) % 50] + 0.02 * rng.standard_normal((30, d))
    attractors = np.repeat(rng.standard_normal((3, d)), 10, axis=0) + 0.02 * rng.standard_normal((30, d))
    scattered = rng.standard_normal((40, d))
    labels = np.repeat([MEMORIZED, SPURIOUS, GENERALIZED], [30, 30, 40])
    return train.astype(np.float32), np.concatenate([copies, attractors, scattered]).astype(np.float32), labels


def test_synthetic_groups_are_recovered_and_the_thresholds_fall_between_the_modes():
    train, gen, truth = synthetic()
    st = classify_samples(gen, train)
    fr = st.metrics()
    assert abs(fr["frac_memorized"] - 0.3) <= TOLERANCE
    assert abs(fr["frac_spurious"] - 0.3) <= TOLERANCE
    assert abs(fr["frac_generalized"] - 0.4) <= TOLERANCE
    assert fr["delta_m_fallback"] == 0.0 and fr["delta_s_fallback"] == 0.0  # both read off a valley
    mem, new = truth == MEMORIZED, truth != MEMORIZED
    assert st.d_train[mem].max() < st.delta_m.value < st.d_train[new].min()
    spur, gen_ = truth == SPURIOUS, truth == GENERALIZED
    assert st.d_syn[spur].max() < st.delta_s.value < st.d_syn[gen_].min()
    assert "valley" in st.delta_m.rule and "valley" in st.delta_s.rule


def test_a_one_mode_histogram_falls_back_to_the_calibrated_threshold_and_says_so():
    train, gen, truth = synthetic()
    novel = gen[truth == GENERALIZED]  # only scattered new points: one mode in both histograms
    st = classify_samples(novel, train)
    m = st.metrics()
    loo = leave_one_out_distances(train)
    assert m["delta_m_fallback"] == 1.0 and m["delta_s_fallback"] == 1.0
    assert m["delta_m"] == pytest.approx(memorization_threshold(loo))
    assert m["delta_s"] == pytest.approx(COPY_SCALE * np.median(loo))
    # with the fallback, frac_memorized is the existing memorized_frac
    assert m["frac_memorized"] == memorization_metrics(st.d_train, memorization_threshold(loo))["memorized_frac"]
    assert st.delta_m.rule.startswith("one mode") and "calibrated" in st.delta_m.rule
    assert st.delta_s.rule.startswith("one mode")
    assert m["frac_spurious"] == 0.0


def test_nearest_other_sample_excludes_itself_and_an_exact_duplicate_is_at_zero():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 40)).astype(np.float32) * 50  # large norms: float32 |a|^2+|b|^2-2ab is coarse
    x[7] = x[200]
    d, i = nearest_other(x, k=3, chunk=64)
    full = np.linalg.norm(x[:, None].astype(np.float64) - x[None].astype(np.float64), axis=-1)
    np.fill_diagonal(full, np.inf)
    assert np.array_equal(i[:, 0], full.argmin(1))
    assert np.allclose(d, np.sort(full, axis=1)[:, :3], rtol=1e-12, atol=0)
    assert d[7, 0] == 0.0 and i[7, 0] == 200 and (i != np.arange(300)[:, None]).all()


# ---------------------------------------------------------------------------- in the evaluator
def _mixed_generator(faces: torch.Tensor):
    """20 near-copies of training faces, 24 samples on 3 new faces, 20 other new faces, shuffled;
    served batch by batch from the evaluation's batch seeds (deterministic)."""
    g = torch.Generator().manual_seed(0)
    train, novel = faces[:50], faces[50:]

    def jitter(im):
        return (im.float() + 2.0 * torch.randn(im.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)

    images = torch.cat([jitter(train[:20]), jitter(novel[:3].repeat_interleave(8, 0)), novel[3:23]])
    truth = np.repeat([MEMORIZED, SPURIOUS, GENERALIZED], [20, 24, 20])
    perm = torch.randperm(len(images), generator=g)
    images, truth = images[perm], truth[perm.numpy()]
    served = {"next": 0}

    def sample(n: int, seed: int) -> torch.Tensor:
        start = served["next"] % len(images)
        served["next"] += n
        return images[start : start + n].float() / 127.5 - 1

    return train, sample, truth


@pytest.mark.parametrize("space", ["features", "pixels"])
def test_every_evaluation_reports_the_three_fractions_with_pictures(faces, tmp_path, space):
    train, sample, truth = _mixed_generator(faces)
    cfg = dict(features="randcnn", n_gen=64, batch_size=32, kid_subsets=10, grid_size=16, seed=7, sample_space=space)
    ev = Evaluator(cfg, train, str(tmp_path / "store"), out_dir=str(tmp_path / "out"))
    metrics, artifacts = ev.evaluate(sample, step=5)
    expected = {"frac_memorized": 20 / 64, "frac_spurious": 24 / 64, "frac_generalized": 20 / 64}
    for name, value in expected.items():
        assert abs(metrics[name] - value) <= TOLERANCE, (name, metrics)
    assert sum(metrics[n] for n in expected) == pytest.approx(1.0)
    for key in ("delta_m", "delta_s", "delta_m_fallback", "delta_s_fallback"):
        assert np.isfinite(metrics[key])
    names = {os.path.basename(a) for a in artifacts}
    assert {"sample_types_0000005.png", "sample_type_histograms_0000005.png"} <= names
    figure1 = Image.open(tmp_path / "out" / "sample_types_0000005.png")
    # three type bands, each with 2 samples of 2 rows of 96 px tiles, and 1 + 4 columns
    assert figure1.size[0] >= 5 * 96 and figure1.size[1] >= 3 * 2 * 2 * 96
    assert np.asarray(figure1.convert("L")).std() > 20  # pictures, not an empty canvas


def test_the_thumbnails_kept_per_sample_are_at_most_64_px(tmp_path):
    big = (torch.rand(6, 3, 128, 128) * 255).to(torch.uint8)

    def sample(n, seed):
        return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    ev = Evaluator(dict(features="randcnn", n_gen=8, batch_size=4, kid_subsets=2, grid_size=0, seed=1),
                   big, str(tmp_path / "s"), out_dir=str(tmp_path / "o"))
    metrics, artifacts = ev.evaluate(sample, step=1)
    img = Image.open(next(a for a in artifacts if "sample_types_" in a))
    assert "frac_spurious" in metrics and img.size[0] < 2000  # tiles from 64 px thumbnails, not 128 px images


# ---------------------------------------------------------------------------- data.subset
def _cfg(tmp_path, **data):
    return resolve({"data": {"path": "builtin:lfw-faces", "image_size": 32, **data},
                    "model": {"family": "patch_lut", "width": 16, "depth": 1, "heads": 2, "dictionary_size": 8,
                              "sample_steps": 2},
                    "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
                    "eval": {"every": 2, "n_gen": 32, "batch_size": 16, "features": "randcnn", "kid_subsets": 4},
                    "storage": str(tmp_path / "runs")})


def test_data_subset_trains_on_exactly_k_images_the_same_for_the_same_seed(tmp_path):
    from sweeper.run.trainer import Trainer

    everything = training_images(_cfg(tmp_path)["data"])
    tr = Trainer(_cfg(tmp_path, subset=8), str(tmp_path / "a"), progress=False, evaluate=False)
    assert tr.images.shape == (8, 3, 32, 32)
    rows = subset_indices(100, 8, seed=0)
    assert torch.equal(tr.images, everything[rows])
    assert torch.equal(Trainer(_cfg(tmp_path, subset=8), str(tmp_path / "b"), progress=False,
                               evaluate=False).images, tr.images)
    other = training_images(_cfg(tmp_path, subset=8, subset_seed=1)["data"])
    assert not torch.equal(other, tr.images)
    # nested: the 8 lie inside the 16 of the same seed
    assert set(rows.tolist()) <= set(subset_indices(100, 16, seed=0).tolist())
    # every training batch is drawn from those 8 images (mirrored or not)
    allowed = {im.numpy().tobytes() for im in tr.images} | {im.flip(-1).numpy().tobytes() for im in tr.images}
    for step in range(6):
        batch = sample_batch(tr.images_dev, 4, seed=0, step=step)
        u8 = ((batch + 1) * 127.5).round().to(torch.uint8)
        assert all(im.numpy().tobytes() in allowed for im in u8)


def test_data_subset_changes_the_reference_statistics_cache_key(tmp_path):
    def uri(**data):
        images = training_images(_cfg(tmp_path, **data)["data"])
        return Evaluator(_cfg(tmp_path)["eval"], images, str(tmp_path / "s")).cache_uri

    assert uri(subset=8) == uri(subset=8)
    assert len({uri(subset=8), uri(subset=16), uri(subset=8, subset_seed=1), uri()}) == 4


def test_data_subset_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(SweeperError, match=r"data\.subset: 1: use null .* or an integer >= 2"):
        _cfg(tmp_path, subset=1)
    with pytest.raises(SweeperError, match=r"data\.subset: 500 images asked for, but .* holds 100; use at most 100"):
        training_images(_cfg(tmp_path, subset=500)["data"])


def test_data_subset_is_a_sweep_parameter(tmp_path):
    from sweeper.config.space import apply, load_spec

    space = tmp_path / "k.yaml"
    space.write_text(
        "name: k\ndata: {path: builtin:lfw-faces, image_size: 32}\n"
        "model: {family: patch_lut, width: 16, depth: 1, heads: 2}\n"
        "eval: {features: randcnn}\n"
        "sweep:\n  objective: {metric: fd_randcnn, mode: min}\n"
        "  params:\n    data.subset: {type: int, low: 8, high: 100, log: true}\n")
    spec = load_spec(str(space))
    assert spec.sweep["params"]["data.subset"]["log"] is True
    assert apply(spec.run_config, {"data.subset": 13})["data"]["subset"] == 13


# ---------------------------------------------------------------------------- the phase diagram
def test_the_report_draws_the_phase_diagram_of_a_real_sweep_over_k(tmp_path):
    import csv

    import yaml
    from mlflow.tracking import MlflowClient

    from sweeper.run.sweep import bind_loopback

    bind_loopback()  # before anything imports ray
    from sweeper.results.records import locate_sweep
    from sweeper.results.report import write_report
    from sweeper.run.sweep import run_sweep

    spec = {
        "name": "phase", "seed": 0,
        "data": {"path": "builtin:lfw-faces", "image_size": 32},
        "model": {"family": "patch_lut", "width": 16, "depth": 1, "heads": 2, "dictionary_size": 8, "sample_steps": 2},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 4},
        "eval": {"every": 4, "n_gen": 32, "batch_size": 16, "features": "randcnn", "kid_subsets": 4},
        "storage": str(tmp_path / "sweeps"),
        "sweep": {"objective": {"metric": "fd_randcnn", "mode": "min"}, "sampler": {"type": "grid", "seed": 0},
                  "pruner": "none", "trials": 2, "max_concurrent": 2, "resources": {"cpus": 1},
                  "params": {"data.subset": {"type": "categorical", "choices": [4, 8]}}},
    }
    path = tmp_path / "phase.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_sweep(str(path), num_cpus=2)["completed"] == 2
    paths = write_report(locate_sweep(space=str(path)), log_to_mlflow=False)
    png = next(p for p in paths if p.name == "phase.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
    assert Image.open(png).size[0] > 1200  # two panels: against K, and against the objective
    with open(next(p for p in paths if p.name == "phase.csv")) as f:
        table = list(csv.DictReader(f))
    assert sorted(int(r["data.subset"]) for r in table) == [4, 8]
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'phase' / 'mlflow.db'}")
    for row in table:
        run = client.get_run(row["run_id"])
        assert run.data.params["data.subset"] == row["data.subset"]
        for key in ("fd_randcnn", "frac_memorized", "frac_spurious", "frac_generalized", "delta_m", "delta_s",
                    "delta_m_fallback", "delta_s_fallback", "null_frac_memorized", "null_frac_spurious"):
            assert float(row[key]) == run.data.metrics[key], key  # the calibration travels with the fractions


# ---------------------------------------------------------------------------- selection
def test_best_filters_on_frac_memorized_and_prints_the_three_fractions():
    from sweeper.results import ranking as best
    from sweeper.eval import sample_types
    from sweeper.store.trial_runs import TrialResult
    from sweeper.results.best import format_table
    from sweeper.results.ranking import rank

    assert best.FRACTIONS == sample_types.FRACTIONS

    def trial(name, fid, **metrics):
        return TrialResult(run_id=name, trial_id=name, run_name=name, status="completed",
                           metrics={"fid": fid, **metrics}, params={}, tags={})

    copier = trial("A", 10.0, frac_memorized=0.9, frac_spurious=0.05, frac_generalized=0.05)
    # frac_memorized is what counts where both are logged (memorized_frac is the 5 %-quantile rule)
    honest = trial("B", 20.0, frac_memorized=0.1, frac_spurious=0.3, frac_generalized=0.6, memorized_frac=0.9)
    older = trial("C", 30.0, memorized_frac=0.05)  # a sweep from before the sample types
    ranking = rank([copier, honest, older], "fid", "min", max_memorized=0.5)
    assert [t.trial_id for t in ranking.trials] == ["B", "C"] and ranking.too_memorized == 1
    lines = format_table(ranking).splitlines()
    assert lines[0].split()[4:8] == ["fid", "memorized", "spurious", "generalized"]
    assert lines[1].split()[4:8] == ["20", "0.1", "0.3", "0.6"]
    assert lines[2].split()[4:8] == ["30", "0.05", "-", "-"]
    assert "dropped for frac_memorized above the limit" in ranking.summary("s")


# ---------------------------------------------------------------------------- the calibration
def test_memorised_takes_precedence_over_spurious_for_copies_that_copy_each_other():
    rng = np.random.default_rng(5)
    train = rng.standard_normal((50, 32))
    copies = np.repeat(train[:10], 4, axis=0) + 0.01 * rng.standard_normal((40, 32))  # 4 copies of each of 10
    scattered = rng.standard_normal((40, 32))
    st = classify_samples(np.concatenate([copies, scattered]), train)
    assert (st.d_syn[:40] < st.delta_s.value).all()  # they are spurious too, by distance alone
    assert (st.labels[:40] == MEMORIZED).all() and st.metrics()["frac_spurious"] == 0.0
    assert st.metrics()["spurious_clusters"] == 0.0 and st.metrics()["largest_attractor_frac"] == 0.0


def test_attractors_are_counted_and_the_largest_share_is_of_all_samples():
    train, gen, truth = synthetic()
    m = classify_samples(gen, train).metrics()
    assert m["spurious_clusters"] == 3.0  # three new points, ten samples around each
    assert m["largest_attractor_frac"] == pytest.approx(10 / 100)


def test_the_fallback_labels_state_the_rule_they_use():
    train, gen, truth = synthetic()
    st = classify_samples(gen[truth == GENERALIZED], train)
    assert "a third of the folder's median leave-one-out distance" in st.delta_s.rule
    assert "5 % quantile of the folder's leave-one-out distances" in st.delta_m.rule


def test_two_modes_both_below_the_copy_scale_are_one_peak_of_copies():
    from sweeper.eval.sample_types import valley_threshold

    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(0.1, 0.01, 200), rng.normal(0.3, 0.01, 200)]).clip(0)  # a clear valley at 0.2
    assert valley_threshold(d, copy_scale=1.0, fallback=0.7, fallback_rule="r").value == pytest.approx(0.7)
    held = valley_threshold(d, copy_scale=1.0, fallback=0.7, fallback_rule="r")
    assert held.fallback and "both below the copy scale" in held.rule
    split = valley_threshold(d, copy_scale=0.2, fallback=0.7, fallback_rule="r")  # copies, then distinct images
    assert not split.fallback and 0.15 < split.value < 0.25


def _randcnn(images: torch.Tensor) -> np.ndarray:
    from sweeper.eval.features import build_extractor

    return build_extractor("randcnn", device="cpu")(images)


def test_one_tight_cluster_is_one_spurious_attractor_in_every_noise_seed(faces):
    """128 copies (+-2 grey levels) of one face that is not a training image, at K=8: all spurious,
    one attractor holding every sample, never generalised (the valley checks both modes)."""
    train, held = faces[:8], faces[8:]
    train_f, held_f = _randcnn(train), _randcnn(held)
    loo = None
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        copies = (held[:1].float().repeat(128, 1, 1, 1) + torch.randint(-2, 3, (128, 3, 32, 32), generator=g))
        gen_f = _randcnn(copies.clamp(0, 255).to(torch.uint8))
        st = classify_samples(gen_f, train_f, heldout=held_f, loo=loo)
        m = st.metrics()
        assert m["frac_spurious"] == 1.0 and m["frac_generalized"] == 0.0, (seed, m, st.delta_s.rule)
        assert m["spurious_clusters"] == 1.0 and m["largest_attractor_frac"] == 1.0, (seed, m)


@pytest.mark.parametrize("k", [4, 8, 16, 32, 64])
def test_real_held_out_faces_read_new_and_distinct_at_every_training_set_size(faces, k):
    """A perfect generaliser (36 real faces that are not training images) at each K: memorised
    <= 0.1 and spurious <= 0.05, because the thresholds come from the whole folder, not the K."""
    rows = subset_indices(64, k, seed=0)
    rest = np.setdiff1d(np.arange(100), rows)
    train_f, held_f = _randcnn(faces[rows]), _randcnn(faces[rest])
    samples = _randcnn(faces[64:])  # 36 faces, all held out
    m = classify_samples(samples, train_f, heldout=held_f).metrics()
    assert m["frac_memorized"] <= 0.1 and m["frac_spurious"] <= 0.05, (k, m)
    assert m["null_frac_memorized"] <= 0.1 and m["null_frac_spurious"] <= 0.05, (k, m)


def test_the_null_baseline_scores_held_out_images_against_the_samples_thresholds():
    train, gen, truth = synthetic()
    held = np.concatenate([train[:5] + 1e-3, np.random.default_rng(9).standard_normal((15, 64))])  # 5 copies
    st = classify_samples(gen, train, heldout=held)
    assert st.null["null_frac_memorized"] == pytest.approx(5 / 20)
    assert classify_samples(gen, train).null == {}  # no held-out images: no baseline


def test_attractors_join_by_single_linkage_below_delta_s_among_spurious_samples_only():
    from sweeper.eval.sample_types import attractor_ids

    x = np.array([[0.0], [0.4], [0.8], [5.0], [5.3], [0.6], [20.0]])
    labels = np.array([SPURIOUS, SPURIOUS, SPURIOUS, SPURIOUS, SPURIOUS, GENERALIZED, SPURIOUS])
    # 0 and 0.8 are 0.8 apart but chained through 0.4; the generalised 0.6 belongs to none
    assert attractor_ids(x, labels, delta_s=0.5).tolist() == [0, 0, 0, 1, 1, -1, 2]
    assert attractor_ids(x, labels, delta_s=0.35).tolist() == [0, 1, 2, 3, 3, -1, 4]

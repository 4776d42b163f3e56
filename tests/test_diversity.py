"""Diversity and k-NN precision / recall / density / coverage (sweeper.eval.diversity), checked
against a literal all-pairs reference and on cases whose answer is known; and in an evaluation:
a mean-face generator reads collapsed in pixels, training images read as varied as the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sweeper.eval.diversity import diversity, knn_radii, mean_pairwise_distance, prdc, spread_metrics
from sweeper.eval.evaluator import Evaluator
from sweeper.eval.guards import collapse_text, guard_tags
from sweeper.keys import COLLAPSED_TAG
from test_evaluation import ReplayGenerator, _cfg


def reference(train: np.ndarray, gen: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020 written out with loops over every pair (float64)."""
    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    n, m = len(train), len(gen)
    r = [sorted(dist(train[i], train[j]) for j in range(n) if j != i)[k - 1] for i in range(n)]
    s = [sorted(dist(gen[i], gen[j]) for j in range(m) if j != i)[k - 1] for i in range(m)]
    precision = np.mean([any(dist(gen[j], train[i]) < r[i] for i in range(n)) for j in range(m)])
    recall = np.mean([any(dist(train[i], gen[j]) < s[j] for j in range(m)) for i in range(n)])
    density = np.mean([sum(dist(gen[j], train[i]) < r[i] for i in range(n)) for j in range(m)]) / k
    coverage = np.mean([min(dist(gen[j], train[i]) for j in range(m)) < r[i] for i in range(n)])
    pairs_g = [dist(gen[i], gen[j]) for i in range(m) for j in range(i + 1, m)]
    pairs_t = [dist(train[i], train[j]) for i in range(n) for j in range(i + 1, n)]
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage,
            "diversity": np.mean(pairs_g) / np.mean(pairs_t)}


@pytest.mark.parametrize("k", [1, 3, 4])
def test_prdc_and_diversity_equal_the_literal_definition(k):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(23, 6))
    gen = np.concatenate([rng.normal(size=(12, 6)) * 0.6 + 0.3, rng.normal(size=(7, 6)) * 2.0])  # two regimes
    ref = reference(train, gen, k)
    got = prdc(train, gen, k)
    for name in ("precision", "recall", "density", "coverage"):
        assert got[name] == pytest.approx(ref[name], abs=1e-12), name
    assert diversity(gen, mean_pairwise_distance(train)) == pytest.approx(ref["diversity"], rel=1e-12)
    # none of the four is trivially 0 or 1 here, so a flipped comparison or a swapped role shows
    assert all(0 < ref[n] < 1 for n in ("precision", "recall", "coverage"))


def test_the_training_set_against_itself_reads_one_on_all_five():
    train = np.random.default_rng(0).normal(size=(40, 5))
    got = spread_metrics(train.copy(), train, k=5, splits=[])
    assert got == pytest.approx({"diversity": 1.0, "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0})


def test_one_image_repeated_has_no_diversity_no_recall_and_covers_one_ball():
    train = np.random.default_rng(1).normal(size=(30, 4))
    gen = np.repeat(train[3:4], 16, axis=0)
    got = spread_metrics(gen, train, k=1, splits=[])
    assert got["diversity"] == 0.0 and got["recall"] == 0.0
    assert got["coverage"] == pytest.approx(1 / 30)  # only its own ball holds it
    assert got["precision"] == 1.0  # it is a real image: perfect fidelity, which is why recall is needed


def test_diversity_is_the_ratio_of_mean_pairwise_distances():
    train = np.random.default_rng(2).normal(size=(50, 8))
    assert diversity(train * 0.5, mean_pairwise_distance(train)) == pytest.approx(0.5)
    assert diversity(train[:10] * 2.0, mean_pairwise_distance(train[:10])) == pytest.approx(2.0)


def test_knn_radii_are_the_kth_nearest_other_row():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_split_standard_errors_come_with_every_value():
    rng = np.random.default_rng(3)
    train, gen = rng.normal(size=(30, 4)), rng.normal(size=(40, 4))
    splits = [slice(i * 10, (i + 1) * 10) for i in range(4)]
    got = spread_metrics(gen, train, k=3, splits=splits, suffix="_px")
    for name in ("diversity_px", "precision_px", "recall_px", "density_px", "coverage_px"):
        per = [spread_metrics(gen[s], train, 3, [], "_px")[name] for s in splits]
        assert got[f"{name}_se"] == pytest.approx(np.std(per, ddof=1) / np.sqrt(4))
        assert [got[f"{name}_split/{i}"] for i in range(4)] == pytest.approx(per)


def test_an_evaluation_reads_a_mean_face_as_collapsed_and_real_faces_as_varied(faces, tmp_path):
    ev = Evaluator(_cfg(n_gen=48, batch_size=24, se_splits=4), faces[:40], str(tmp_path), out_dir=str(tmp_path))
    mean_face = faces[:40].float().mean(0, keepdim=True).round().to(torch.uint8)
    collapsed, _ = ev.evaluate(ReplayGenerator(mean_face.repeat(4, 1, 1, 1), noise=0.01), step=0)
    varied, _ = ev.evaluate(ReplayGenerator(faces[40:]), step=0)  # held-out faces: new and distinct
    assert collapsed["diversity_px"] < 0.1 and collapsed["recall_px"] == 0.0
    assert varied["diversity_px"] > 0.8 and varied["coverage_px"] > 0.5
    assert collapsed["diversity"] < varied["diversity"]  # the feature space sees it too, less sharply
    assert "diversity_px_se" in varied and "recall_se" in varied
    sweep = {"collapse": {"metric": "diversity_px", "min": 0.35}}
    assert guard_tags(collapsed, sweep)[COLLAPSED_TAG].startswith("diversity_px 0.0")
    assert guard_tags(varied, sweep)[COLLAPSED_TAG] == ""


@pytest.mark.parametrize("value,expected", [(0.34, "diversity_px 0.34 < min 0.35"), (0.35, ""), (0.9, ""),
                                            (None, None), (float("nan"), None)])
def test_the_collapse_rule_is_strictly_below_min(value, expected):
    metrics = {} if value is None else {"diversity_px": value}
    assert collapse_text(metrics, {"metric": "diversity_px", "min": 0.35}) == expected
    assert collapse_text(metrics, {"metric": "diversity_px", "min": None}) is None  # the guard switched off


def test_the_demo_spaces_one_step_sampler_collapses_and_its_four_step_sampler_does_not(tmp_path):
    """The demo's own family and config at its first evaluation (600 steps, lr 1e-3, 64 entries):
    one sampling step paints the mean face in every cell (diversity_px ~0.15 in the demo), four
    steps draw different faces (~0.5); the guard's 0.35 lies between, so the demo's winner is varied."""
    from pathlib import Path

    from sweeper.config.space import apply, load_spec
    from sweeper.run.trainer import Trainer

    base = load_spec(Path(__file__).resolve().parents[1] / "search_spaces/demo.yaml").run_config
    read = {}
    for steps in (1, 4):
        cfg = apply(base, {"model.sample_steps": steps, "model.lr": 1.0e-3, "model.dictionary_size": 64})
        cfg["train"].update(steps=600, checkpoint_every=600)
        cfg["eval"].update(every=600, features="randcnn", n_gen=48, grid_size=0, se_splits=0)
        got: dict = {}
        Trainer(cfg, str(tmp_path / f"steps{steps}"), progress=False).fit(on_eval=lambda s, m, a, c: got.update(m))
        read[steps] = got["diversity_px"]
    assert read[1] < 0.25 and read[4] > 0.45, read

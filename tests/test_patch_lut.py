"""Patch-LUT denoiser: the dictionary read, softmax vs tanh, the Gram penalty, the ablation, sampling."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from models import build_model, get_family
from models.patch_lut import gram_offdiag_mass, patchify, unpatchify
from sweeper.config import deep_merge
from sweeper.errors import SweeperError

FAM = get_family("patch_lut")


def build(**over):
    cfg = deep_merge({"family": "patch_lut", **FAM.DEFAULTS}, {**FAM.TINY, "dynamic_lut": False, **over})
    return build_model(cfg, 32, seed=0)


def test_patchify_and_unpatchify_are_inverse():
    x = torch.randn(2, 3, 32, 32)
    t = patchify(x, 8)
    assert t.shape == (2, 16, 192)
    assert torch.equal(t[0, 1], x[0, :, 0:8, 8:16].reshape(-1))  # raster order: token 1 is row 0, column 1
    assert torch.equal(unpatchify(t, 8, 32), x)


def test_softmax_patches_are_convex_combinations_of_the_dictionary():
    fam = build(weights="softmax")
    x, t = torch.randn(3, 3, 32, 32), torch.rand(3)
    with torch.no_grad():
        out, w = fam.net(x, t, return_weights=True)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(3, 16), atol=1e-6)
    assert torch.allclose(patchify(out, 8), w @ fam.net.dictionary, atol=1e-6)
    # inside the convex hull: every pixel lies between the dictionary's extremes at that pixel
    d = fam.net.dictionary
    p = patchify(out, 8)
    assert (p >= d.min(0).values - 1e-6).all() and (p <= d.max(0).values + 1e-6).all()


def test_tanh_weights_are_unnormalised_and_can_leave_the_convex_hull():
    fam = build(weights="tanh")
    with torch.no_grad():
        fam.net.to_weights.bias.fill_(3.0)  # every weight near +1: the sum of K entries, not their mean
        out, w = fam.net(torch.randn(2, 3, 32, 32), torch.rand(2), return_weights=True)
    assert (w.abs() <= 1).all() and not torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.allclose(patchify(out, 8), w @ fam.net.dictionary, atol=1e-5)
    d = fam.net.dictionary
    outside = (patchify(out, 8) > d.max(0).values + 1e-4) | (patchify(out, 8) < d.min(0).values - 1e-4)
    assert outside.any()


def test_gram_penalty_alone_lowers_the_off_diagonal_mass():
    fam = build(dictionary_size=16)
    d = fam.net.dictionary
    with torch.no_grad():  # start from correlated patterns (a shared component), as a trained LUT can be
        d.add_(torch.randn(1, d.shape[1]))
    before = float(gram_offdiag_mass(d))
    opt = torch.optim.Adam([d], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        gram_offdiag_mass(d).backward()
        opt.step()
    assert float(gram_offdiag_mass(d)) < 0.5 * before


def test_gram_penalty_enters_the_training_loss_only_when_set():
    torch.manual_seed(0)
    assert "loss_gram" in build(gram_penalty=0.5).train_step(torch.rand(2, 3, 32, 32) * 2 - 1, 0)
    assert "loss_gram" not in build(gram_penalty=0.0).train_step(torch.rand(2, 3, 32, 32) * 2 - 1, 0)


def test_dictionary_off_has_no_dictionary_and_predicts_pixels():
    fam = build(dictionary=False)
    names = [n for n, _ in fam.net.named_parameters()]
    assert not any("dictionary" in n or "to_weights" in n for n in names)
    assert fam.sample(2, seed=0).shape == (2, 3, 32, 32)
    assert fam.dictionary_usage(4, seed=0) == {} and fam.pictures("/nonexistent", 0, 0) == []


def test_dynamic_lut_adds_rank_one_patterns_per_colour_channel():
    fam = build(dynamic_lut=True, dynamic_patterns=1)
    x, t = torch.randn(1, 3, 32, 32), torch.rand(1)
    with torch.no_grad():
        with_dyn, w = fam.net(x, t, return_weights=True)
        static = w @ fam.net.dictionary
        extra = (patchify(with_dyn, 8) - static).reshape(1, 16, 3, 8, 8)
    ranks = torch.linalg.matrix_rank(extra.reshape(-1, 8, 8).double(), atol=1e-6)
    assert (ranks <= 1).all() and (ranks == 1).any()


def test_sampling_runs_sample_steps_denoiser_calls_from_noise(monkeypatch):
    fam = build(sample_steps=4)
    calls = []
    real = fam.ema.forward
    monkeypatch.setattr(fam.ema, "forward", lambda x, t, return_weights=False: calls.append(float(t[0])) or real(x, t, return_weights))
    fam.sample(2, seed=0)
    assert calls == [1.0, 0.75, 0.5, 0.25]


def test_training_lowers_the_denoising_loss(faces):
    fam = build(width=32, depth=2, heads=2, dictionary_size=32, lr=2e-3)
    x = faces[:16].float() / 127.5 - 1
    torch.manual_seed(0)
    first = sum(fam.losses(x)["loss_denoise"].item() for _ in range(8)) / 8
    for step in range(60):
        fam.train_step(x, step)
    torch.manual_seed(0)
    last = sum(fam.losses(x)["loss_denoise"].item() for _ in range(8)) / 8
    assert last < 0.8 * first


def test_dictionary_usage_and_pictures(tmp_path):
    fam = build(dictionary_size=8)
    u = fam.dictionary_usage(8, seed=0, batch=4)
    assert 1.0 <= u["dictionary_perplexity"] <= 8.0 + 1e-6 and 1 <= u["dictionary_active"] <= 8
    paths = fam.pictures(str(tmp_path), 40, 0)
    assert [os.path.basename(p) for p in paths] == ["dictionary_0000040.png", "dictionary_gram_0000040.png"]
    with Image.open(paths[0]) as im:
        assert im.size[0] >= 64 * 3  # 8 tiles of 8 px, upscaled, 3 per row
    with Image.open(paths[1]) as im:
        assert im.size == (256, 256)


@pytest.mark.parametrize("key,value,msg", [
    ("patch", 5, "model.patch: 5 must be a positive integer dividing the image size 32"),
    ("weights", "relu", "model.weights: 'relu': use softmax or tanh"),
    ("width", 15, r"model.width: must be a positive integer divisible by heads \(2\)"),
])
def test_bad_values_name_the_key(key, value, msg):
    cfg = deep_merge({"family": "patch_lut", **FAM.DEFAULTS}, {**FAM.TINY, key: value})
    with pytest.raises(SweeperError, match=msg):
        FAM.validate(cfg, 32)

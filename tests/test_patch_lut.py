"""Patch-LUT denoiser: the LUT read (static and dynamic entries), softmax vs tanh, the Gram penalty,
the training interpolation, the sampler, the usage metrics and the attractor check."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from models import build_model, get_family, noise
from models.patch_lut import USAGE_FLOOR, LUTRead, UsageTally, gram_offdiag_mass, patchify, unpatchify
from sweeper.errors import SweeperError
from sweeper.eval.registry import metrics_for
from sweeper.config.run_config import deep_merge

FAM = get_family("patch_lut")


def build(**over):
    cfg = deep_merge({"family": "patch_lut", **FAM.DEFAULTS}, {**FAM.TINY, "dynamic_lut": False, **over})
    return build_model(cfg, 32, seed=0)


def paint_with_entry(net, tile: torch.Tensor) -> torch.Tensor:
    """Make ``net`` a fixed predictor: every patch is dictionary entry 0 (= ``tile``), whatever
    x_t and t are. Returns the image it predicts."""
    with torch.no_grad():
        net.dictionary[0] = tile
        net.to_weights.weight.zero_()
        net.to_weights.bias.zero_()
        net.to_weights.bias[0] = 60.0  # softmax weight 1 - 1e-25 on entry 0
    return unpatchify(tile.expand(1, net.n_tokens, -1), net.p, net.size)


def record_calls(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_t, t) of every call of ``module`` from now on."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.register_forward_pre_hook(lambda m, args: calls.append((args[0].clone(), args[1].clone())))
    return calls


# ---------------------------------------------------------------------------- the LUT read
def test_patchify_and_unpatchify_are_inverse():
    x = torch.randn(2, 3, 32, 32)
    t = patchify(x, 8)
    assert t.shape == (2, 16, 192)
    assert torch.equal(t[0, 1], x[0, :, 0:8, 8:16].reshape(-1))  # raster order: token 1 is row 0, column 1
    assert torch.equal(unpatchify(t, 8, 32), x)


def test_softmax_patches_lie_in_the_convex_hull_of_static_and_dynamic_entries():
    fam = build(weights="softmax", dynamic_lut=True, dynamic_patterns=3)
    with torch.no_grad():
        r = fam.net(torch.randn(2, 3, 32, 32), torch.rand(2))
    k = fam.net.dictionary.shape[0]
    assert r.weights.shape == (2, 16, k + 3) and r.entries.shape == (2, 3, 192)
    assert (r.weights >= 0).all() and torch.allclose(r.weights.sum(-1), torch.ones(2, 16), atol=1e-6)
    for b in range(2):  # each image's LUT: the K static entries, then its own 3 dynamic ones
        lut = torch.cat([fam.net.dictionary, r.entries[b]])
        out = patchify(r.image, 8)[b]
        assert torch.allclose(out, r.weights[b] @ lut, atol=1e-5)
        assert (out >= lut.min(0).values - 1e-5).all() and (out <= lut.max(0).values + 1e-5).all()
    assert r.weights[..., k:].sum() > 0.1  # the dynamic entries do take part in the blend


def test_tanh_weights_are_unnormalised_and_can_leave_the_convex_hull():
    fam = build(weights="tanh")
    with torch.no_grad():
        fam.net.to_weights.bias.fill_(3.0)  # every weight near +1: the sum of K entries, not their mean
        r = fam.net(torch.randn(2, 3, 32, 32), torch.rand(2))
    w, d, out = r.weights, fam.net.dictionary, patchify(r.image, 8)
    assert (w.abs() <= 1).all() and not torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.allclose(out, w @ d, atol=1e-5)
    assert ((out > d.max(0).values + 1e-4) | (out < d.min(0).values - 1e-4)).any()


def test_dynamic_entries_are_per_image_rank_one_tiles_reached_only_through_their_weights():
    fam = build(dynamic_lut=True, dynamic_patterns=2)
    k, x, t = fam.net.dictionary.shape[0], torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        r = fam.net(x, t)
        ranks = torch.linalg.matrix_rank(r.entries.reshape(-1, 8, 8).double(), atol=1e-6)
        assert (ranks == 1).all()  # every colour channel of every entry: an outer product u v^T
        tiles = r.entries.reshape(-1, 8, 8)
        assert not torch.allclose(tiles, tiles.transpose(1, 2))  # of two vectors, not u u^T
        assert not torch.allclose(r.entries[0], r.entries[1])  # each image its own entries
        assert torch.allclose(r.dynamic, r.weights[..., k:] @ r.entries, atol=1e-6)
        fam.net.to_weights.bias[k:] = -60.0  # no weight on the dynamic entries: the static LUT alone
        off = fam.net(x, t)
    assert off.dynamic.abs().max() < 1e-12 and torch.allclose(patchify(off.image, 8), off.static, atol=1e-6)


def test_dictionary_off_has_no_dictionary_and_predicts_pixels():
    fam = build(dictionary=False)
    names = [n for n, _ in fam.net.named_parameters()]
    assert not any("dictionary" in n or "to_weights" in n for n in names)
    assert fam.sample(2, seed=0).shape == (2, 3, 32, 32)
    assert fam.dictionary_usage(4, seed=0) == {} and fam.pictures("/nonexistent", 0, 0) == []


def test_the_prediction_depends_on_t():
    fam = build()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = fam.net(x, torch.full((2,), 0.1)).image, fam.net(x, torch.full((2,), 0.9)).image
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


# ---------------------------------------------------------------------------- the loss
def test_the_denoising_loss_lerps_from_the_image_to_noise_and_scores_the_prediction_against_x0():
    fam = build()
    x0, eps = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 3, 32, 32)
    t = torch.tensor([0.0, 1.0, 0.25])
    calls = record_calls(fam.net)
    loss = fam.losses(x0, t=t, eps=eps)["loss_denoise"]
    (x_t, t_seen), = calls
    assert torch.equal(t_seen, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[1], eps[1])  # t = 0: the image; t = 1: noise
    assert torch.allclose(x_t[2], 0.75 * x0[2] + 0.25 * eps[2], atol=1e-6)
    with torch.no_grad():
        pred = fam.net(x_t, t).image
    assert torch.allclose(loss, F.mse_loss(pred, x0), rtol=1e-6)


def test_the_schedules_draw_t_as_documented():
    torch.manual_seed(0)
    u = build(schedule="uniform").draw_t(20000)
    ln = build(schedule="logit_normal").draw_t(20000)
    assert u.min() >= 0 and u.max() <= 1 and abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12**-0.5) < 0.01
    middle = float(((ln > 0.25) & (ln < 0.75)).float().mean())  # sigmoid(N(0,1)): P(|z| < log 3) = 0.728
    assert abs(middle - 0.728) < 0.01 and abs(float(((u > 0.25) & (u < 0.75)).float().mean()) - 0.5) < 0.01


def test_training_lowers_the_denoising_loss(faces):
    fam = build(width=32, depth=2, heads=2, dictionary_size=32, lr=2e-3)
    x = faces[:16].float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    t, eps = torch.rand(16, generator=g), torch.randn(x.shape, generator=g)
    with torch.no_grad():
        first = fam.losses(x, t=t, eps=eps)["loss_denoise"].item()
    for step in range(40):
        torch.manual_seed(step)
        fam.train_step(x, step)
    with torch.no_grad():
        last = fam.losses(x, t=t, eps=eps)["loss_denoise"].item()
    assert last < 0.8 * first


def test_gram_offdiag_mass_on_known_dictionaries():
    theta = 0.3
    two = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]]) * torch.tensor([[2.0], [0.5]])
    assert float(gram_offdiag_mass(two)) == pytest.approx(math.cos(theta) ** 2, rel=1e-6)  # scale-free
    assert float(gram_offdiag_mass(torch.eye(4, 6))) == pytest.approx(0.0, abs=1e-12)
    assert float(gram_offdiag_mass(torch.ones(3, 5))) == pytest.approx(1.0, rel=1e-6)
    mixed = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # one parallel pair of 3 x 2 ordered pairs
    assert float(gram_offdiag_mass(mixed)) == pytest.approx(2 / 6, rel=1e-6)


def test_gram_penalty_alone_lowers_the_off_diagonal_mass():
    fam = build(dictionary_size=16)
    d = fam.net.dictionary
    with torch.no_grad():  # start from correlated patterns (a shared component), as a trained LUT can be
        d.add_(torch.randn(1, d.shape[1]))
    before = float(gram_offdiag_mass(d.detach()))
    opt = torch.optim.Adam([d], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        gram_offdiag_mass(d).backward()
        opt.step()
    assert float(gram_offdiag_mass(d.detach())) < 0.5 * before


def _train_correlated(gram_penalty: float, faces) -> tuple[float, float, dict]:
    """(off-diagonal mass before, after 10 training steps, the first step's losses) from a
    dictionary with a shared component, the same start and batches for every penalty."""
    fam = build(dictionary_size=16, gram_penalty=gram_penalty, lr=3e-2)
    with torch.no_grad():
        fam.net.dictionary.add_(torch.randn(1, 192, generator=torch.Generator().manual_seed(1)))
    before, x, first = float(gram_offdiag_mass(fam.net.dictionary.detach())), faces[:4].float() / 127.5 - 1, {}
    for step in range(10):
        torch.manual_seed(step)
        losses = fam.train_step(x, step)
        first = first or losses
    return before, float(gram_offdiag_mass(fam.net.dictionary.detach())), first


def test_training_with_the_gram_penalty_lowers_the_off_diagonal_mass(faces):
    before, plain, losses0 = _train_correlated(0.0, faces)
    before_g, penalised, losses = _train_correlated(10.0, faces)
    assert before == before_g and "loss_gram" not in losses0
    assert losses["loss_gram"] == pytest.approx(10.0 * before, rel=1e-5)  # the term is penalty x the mass
    assert penalised < 0.8 * plain < 0.8 * before  # measured: 0.66 -> 0.55 without, 0.36 with


# ---------------------------------------------------------------------------- the sampler
def test_a_fixed_predictor_gives_x_t_on_the_lerp_path_at_every_sampling_step():
    fam = build(sample_steps=4)
    tile = torch.linspace(-1.6, 1.6, 192)  # partly outside [-1, 1]: the sampler clamps x_0
    x_star = paint_with_entry(fam.ema, tile).clamp(-1, 1)
    calls = record_calls(fam.ema)
    out = fam.sample(2, seed=7)
    start = noise((2, 3, 32, 32), 7)
    assert [float(t[0]) for _, t in calls] == [1.0, 0.75, 0.5, 0.25]
    for x_t, t in calls:  # every denoiser input is lerp(x*, the initial noise, t)
        assert torch.allclose(x_t, torch.lerp(x_star, start, float(t[0])), atol=1e-5)
    assert torch.allclose(out, x_star.expand(2, -1, -1, -1), atol=1e-6)


def test_denoising_from_a_later_start_follows_the_grid_below_it():
    fam = build(sample_steps=4)
    assert fam.sampling_times() == [1.0, 0.75, 0.5, 0.25]
    assert fam.sampling_times(0.5) == [0.5, 0.25] and fam.sampling_times(0.6) == [0.6, 0.5, 0.25]
    x_star = paint_with_entry(fam.ema, torch.full((192,), 0.3))
    calls = record_calls(fam.ema)
    x = torch.randn(1, 3, 32, 32)
    with fam.sampling(fam.ema):
        fam.denoise(torch.lerp(x_star, x, 0.6), t_start=0.6)
    for x_t, t in calls:
        assert torch.allclose(x_t, torch.lerp(x_star, x, float(t[0])), atol=1e-5)


# ---------------------------------------------------------------------------- measuring use
def read(weights, static=None, dynamic=None) -> LUTRead:
    w = torch.as_tensor(weights, dtype=torch.float64)[None]
    s = torch.ones(*w.shape[:2], 4) if static is None else torch.as_tensor(static, dtype=torch.float64)[None]
    d = None if dynamic is None else torch.as_tensor(dynamic, dtype=torch.float64)[None]
    return LUTRead(torch.zeros(1), w, s, d)


def usage(k, *reads) -> dict:
    tally = UsageTally(k)
    for r in reads:
        tally.add(r)
    return tally.metrics()


def test_usage_metrics_on_hand_set_weights():
    even = usage(8, read([[0.5, 0.5, 0, 0, 0, 0, 0, 0]] * 6))
    assert even["dictionary_blend_perplexity"] == pytest.approx(2) and even["dictionary_active"] == 2
    assert even["dictionary_usage_perplexity"] == pytest.approx(2) and even["dictionary_share"] == 1.0
    one = usage(8, read([[1, 0, 0, 0, 0, 0, 0, 0]] * 6))
    assert (one["dictionary_blend_perplexity"], one["dictionary_usage_perplexity"], one["dictionary_active"]) == \
        pytest.approx((1, 1, 1))
    # each patch one entry, but the patches use two different ones: blend 1, usage 2
    split = usage(4, read([[1, 0, 0, 0], [0, 1, 0, 0]] * 3))
    assert split["dictionary_blend_perplexity"] == pytest.approx(1) and split["dictionary_usage_perplexity"] == \
        pytest.approx(2) and split["dictionary_active"] == 2
    # the blend is averaged over every patch: one patch on one entry, one spread over four -> exp((0 + ln 4) / 2)
    mixed = usage(4, read([[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]))
    assert mixed["dictionary_blend_perplexity"] == pytest.approx(2)
    batches = usage(4, read([[1, 0, 0, 0]]), read([[0.25, 0.25, 0.25, 0.25]]))  # and over every batch
    assert batches["dictionary_blend_perplexity"] == pytest.approx(2)
    tanh = usage(2, read([[-0.5, 0.5]]))  # unnormalised weights count by |w|
    assert tanh["dictionary_blend_perplexity"] == pytest.approx(2) and tanh["dictionary_active"] == 2


def test_the_active_count_uses_a_floor_of_a_tenth_of_uniform():
    assert USAGE_FLOOR == 0.1
    shares = [0.5, 0.48, 0.012, 0.008, 0, 0, 0, 0, 0, 0]  # K = 10: the floor is 0.01
    assert usage(10, read([shares]))["dictionary_active"] == 3


def test_dynamic_entries_count_in_the_blend_and_in_the_share_not_in_the_usage():
    w = [0.1, 0.1, 0.4, 0.4]  # K = 2 static entries, then 2 dynamic ones
    m = usage(2, read([w], static=[[2.0, 0.0, 0.0, 0.0]], dynamic=[[1.0, 1.0, 0.0, 0.0]]))
    assert m["dictionary_blend_perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in w)))
    assert m["dictionary_usage_perplexity"] == pytest.approx(2) and m["dictionary_active"] == 2  # static, renormalised
    assert m["dictionary_share"] == pytest.approx(4 / 6)  # energies: static 4, dynamic 2 (squares, not |.|)
    none = usage(2, read([[0.5, 0.5, 0, 0]], static=[[0.0] * 4], dynamic=[[2.0] * 4]))
    assert none["dictionary_share"] == 0.0
    # summed over patches, not a mean of per-patch ratios: energies (1, 0) and (0, 3) -> 1 / 4
    two = usage(2, read([[0.5, 0.5, 0, 0]], [[1.0, 0, 0, 0]], [[0.0] * 4]),
                read([[0.5, 0.5, 0, 0]], [[0.0] * 4], [[1.0, 1.0, 1.0, 0]]))
    assert two["dictionary_share"] == pytest.approx(0.25)


def test_dictionary_usage_reads_the_last_sampling_step_of_every_batch():
    fam = build(dynamic_lut=True, dynamic_patterns=2, sample_steps=3)
    calls = record_calls(fam.ema)
    got = fam.dictionary_usage(8, seed=0, batch=4)
    last = [(x, t) for x, t in calls if float(t[0]) == pytest.approx(1 / 3)]
    assert len(calls) == 6 and len(last) == 2  # two batches of 4, three steps each
    assert not torch.equal(calls[0][0], calls[3][0])  # each batch from its own noise
    tally = UsageTally(fam.net.dictionary.shape[0])
    with torch.no_grad():
        for x, t in last:
            tally.add(fam.ema(x, t))
    assert got == pytest.approx(tally.metrics())
    assert 0.0 < got["dictionary_share"] < 1.0


def test_dictionary_share_is_one_without_dynamic_entries_and_near_zero_when_they_paint():
    assert build().dictionary_usage(4, seed=0)["dictionary_share"] == 1.0
    fam = build(dynamic_lut=True, dynamic_patterns=2)
    k = fam.net.dictionary.shape[0]
    with torch.no_grad():
        fam.ema.to_weights.weight.zero_()
        fam.ema.to_weights.bias[k:] = 60.0  # every patch: the mean of the image's two dynamic entries
    m = fam.dictionary_usage(4, seed=0)
    assert m["dictionary_share"] < 1e-6 and m["dictionary_blend_perplexity"] == pytest.approx(2, rel=1e-6)


def test_the_family_registers_its_use_and_attractor_metrics():
    names = {m.name: m for m in metrics_for("patch_lut")}
    assert {"dictionary_usage", "attractor_return"} <= set(names) and "dictionary_usage" not in \
        {m.name for m in metrics_for("moca_fastgan")}
    ctx = SimpleNamespace(model=build(dynamic_lut=True), cfg={"n_gen": 4, "batch_size": 4}, seed=0)
    assert set(names["dictionary_usage"].fn(ctx)) == {"dictionary_share", "dictionary_blend_perplexity",
                                                      "dictionary_usage_perplexity", "dictionary_active"}
    assert set(names["attractor_return"].fn(ctx)) == {"attractor_return_frac", "attractor_return_rms"}


# ---------------------------------------------------------------------------- the attractor check
class TwoAttractors(nn.Module):
    """A denoiser with two attractors: it predicts +0.8 everywhere when x_t's mean is positive,
    else -0.8 (basins split by the sign of the mean)."""

    def __init__(self):
        super().__init__()
        self.seen: list[float] = []

    def forward(self, x, t):
        self.seen.append(float(t[0]))
        sign = torch.where(x.mean((1, 2, 3), keepdim=True) > 0, 0.8, -0.8)
        return LUTRead(sign.expand_as(x).clone())


def test_attractor_return_on_a_denoiser_with_two_attractors():
    fam = build(sample_steps=4)
    fam.ema = TwoAttractors()
    near = fam.attractor_return(64, seed=0, batch=32, t0=0.5)
    assert fam.ema.seen == [1.0, 0.75, 0.5, 0.25, 0.5, 0.25] * 2  # per batch: a sample, then from t0 on
    assert near == {"attractor_return_frac": 1.0, "attractor_return_rms": 0.0}  # half-way noise keeps the basin
    fresh = fam.attractor_return(64, seed=0, batch=32, t0=1.0)  # full re-noise: a new sample, either basin
    assert 0.3 < fresh["attractor_return_frac"] < 0.7 and fresh["attractor_return_rms"] in (0.0, pytest.approx(1.6))


class KeepsItsInput(nn.Module):
    """A denoiser with no attractor: it predicts x_0 = x_t, so the sampler keeps what it is given."""

    def forward(self, x, t):
        return LUTRead(x.clone())


def test_attractor_return_of_a_denoiser_without_attractors_is_zero():
    fam = build(sample_steps=4)
    fam.ema = KeepsItsInput()
    m = fam.attractor_return(16, seed=0, batch=8, t0=0.5)
    assert m["attractor_return_frac"] == 0.0 and m["attractor_return_rms"] > 0.3


# ---------------------------------------------------------------------------- pictures and config
def test_pictures(tmp_path):
    fam = build(dictionary_size=8)
    paths = fam.pictures(str(tmp_path), 40, 0)
    assert [os.path.basename(p) for p in paths] == ["dictionary_0000040.png", "dictionary_gram_0000040.png"]
    with Image.open(paths[0]) as im:
        assert im.size[0] >= 64 * 3  # 8 tiles of 8 px, upscaled, 3 per row
    with Image.open(paths[1]) as im:
        assert im.size == (256, 256)


@pytest.mark.parametrize("over,msg", [
    ({"patch": 5}, "model.patch: 5 must be a positive integer dividing the image size 32"),
    ({"weights": "relu"}, "model.weights: 'relu': use softmax or tanh"),
    ({"width": 15}, r"model.width: must be a positive integer divisible by heads \(2\)"),
    ({"dictionary": False, "dynamic_lut": True}, "model.dynamic_lut: the dynamic entries live in the dictionary's LUT"),
])
def test_bad_values_name_the_key(over, msg):
    cfg = deep_merge({"family": "patch_lut", **FAM.DEFAULTS}, {**FAM.TINY, **over})
    with pytest.raises(SweeperError, match=msg):
        FAM.validate(cfg, 32)

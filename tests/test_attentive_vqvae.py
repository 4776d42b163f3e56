"""Attentive VQ-VAE: the quantiser and its losses, the pixel attention and its start, the AREN
levels and what reaches the decoder, the joint prior, the generation-ready rule, the evaluation
metrics (training and held-out), and the CPU space through a real sweep."""

from __future__ import annotations

import copy
import io
import itertools
import math
import re
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from sweeper.run.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from models import build_model, get_family  # noqa: E402
from models import attentive_vqvae as avq  # noqa: E402
from models.aren import ATTENTION_START_ROW_SUM, PixelAttention  # noqa: E402
from models.code_prior import from_sequence, to_sequence  # noqa: E402
from models.vector_quantizer import VectorQuantizer  # noqa: E402
from sweeper.config.run_config import deep_merge  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAM = get_family("attentive_vqvae")
SPACES = ("search_spaces/attentive_vqvae.yaml", "search_spaces/attentive_vqvae_cpu.yaml")
FAST_PRIOR = {"lr": 3e-2, "dropout": 0.0}  # a TINY prior that passes the readiness rule at its 20th step


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster than two
    spinning against other jobs. Restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_of(**over) -> dict:
    return deep_merge({"family": "attentive_vqvae", **FAM.DEFAULTS}, deep_merge(FAM.TINY, over))


def build(size: int = 32, seed: int = 0, **over):
    return build_model(cfg_of(**over), size, seed=seed)


def to_input(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


def train(fam, images: torch.Tensor, start: int, end: int, batch: int = 4) -> list[dict]:
    out = []
    for step in range(start, end):
        torch.manual_seed(step)
        idx = torch.randint(0, len(images), (batch,))
        out.append(fam.train_step(to_input(images[idx]), step))
    return out


def ready_family(faces: torch.Tensor):
    """A TINY two-level family trained on 40 faces until its prior passed the readiness rule."""
    fam = build(prior=FAST_PRIOR)
    train(fam, faces[:40], 0, FAM.TINY["prior_start_step"] + avq.READY_MIN_STEPS)
    assert fam.generation_ready, fam.readiness()
    return fam


def quantizer(update: str = "ema", restart: bool = False, patience: int = 2, decay: float = 0.9) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(8, 4, update, decay, 0.25, restart, patience)


# ---------------------------------------------------------------------------- the quantiser
def test_every_quantised_vector_is_exactly_its_nearest_codebook_entry():
    vq = quantizer().eval()
    z = torch.randn(2, 4, 5, 5) * 2
    q, idx, _ = vq(z)
    rows = q.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(rows, vq.embed[idx.flatten()])  # bit for bit, not approximately
    nearest = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), vq.embed).argmin(1)
    assert torch.equal(idx.flatten(), nearest)


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_straight_through_gradient_is_the_identity_and_never_reaches_the_codebook(update):
    vq = quantizer(update).eval()
    enc = nn.Conv2d(3, 4, 1)
    z = enc(torch.randn(2, 3, 4, 4))
    z.retain_grad()
    q, _, _ = vq(z)
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(z.grad, g)  # dq/dz is the identity
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert vq.embed.grad is None  # the decoder's gradient never moves an entry (only its own loss or EMA)


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_vq_loss_and_its_gradient_wrt_z_are_van_den_oords(update):
    """loss = beta mean((z - sg[e])^2) (+ mean((sg[z] - e)^2) for update: loss); d loss / dz =
    2 beta (z - e) / N, N = z.numel(): the commitment alone reaches z, with weight beta."""
    vq = quantizer(update).eval()
    z = (torch.randn(2, 4, 3, 5) * 2).requires_grad_(True)
    q, _, loss = vq(z)
    e, n, beta = q.detach(), z.numel(), vq.beta
    sq = float(((z.detach() - e) ** 2).sum()) / n
    assert float(loss.detach()) == pytest.approx(beta * sq + (sq if update == "loss" else 0.0), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * beta * (z.detach() - e) / n, rtol=1e-5, atol=1e-9)


def test_codebook_loss_gradient_pulls_each_chosen_entry_toward_its_vectors():
    """update: loss: d loss / d e_k = sum over the vectors z_i assigned to k of 2 (e_k - z_i) / N
    (the commitment term adds nothing to it); a gradient step moves each used entry toward the
    mean of its vectors and leaves unused entries where they are."""
    vq = quantizer("loss").eval()
    z = torch.randn(1, 4, 1, 6) * 2  # 6 vectors for 8 entries: some entries stay unused
    _, idx, loss = vq(z)
    loss.backward()
    flat, idx = z.permute(0, 2, 3, 1).reshape(-1, 4), idx.flatten()
    before = vq.embed.detach().clone()
    expect = torch.zeros_like(before).index_add_(0, idx, 2 * (before[idx] - flat) / z.numel())
    torch.testing.assert_close(vq.embed.grad, expect, rtol=1e-5, atol=1e-9)
    after = before - 1.0 * vq.embed.grad
    used = torch.bincount(idx, minlength=8) > 0
    assert used.sum() >= 2 and not used.all()
    for k in torch.nonzero(used).flatten().tolist():
        mean = flat[idx == k].mean(0)
        assert (after[k] - mean).norm() < (before[k] - mean).norm()
    assert torch.equal(after[~used], before[~used])


def test_ema_update_moves_an_entry_toward_the_mean_of_the_vectors_assigned_to_it():
    vq = quantizer(decay=0.9).train()
    e0 = vq.embed[0].clone()
    others = vq.embed[1:].clone()
    torch.manual_seed(1)
    vecs = e0 + 0.3 + 0.05 * torch.randn(6, 4)  # all nearest to entry 0
    z = vecs.view(1, 6, 1, 4).permute(0, 3, 1, 2)
    _, idx, _ = vq(z)
    assert (idx == 0).all()
    mean = vecs.mean(0)
    assert (vq.embed[0] - mean).norm() < (e0 - mean).norm()
    # the running mean: (0.9 * 1 * e0 + 0.1 * sum) / (0.9 * 1 + 0.1 * n), one pseudo-count at start
    expect = (0.9 * e0 + 0.1 * vecs.sum(0)) / (0.9 + 0.1 * 6)
    assert torch.allclose(vq.embed[0], expect, atol=1e-6)
    assert torch.equal(vq.embed[1:], others)  # unused entries keep their value
    assert not vq.embed.requires_grad  # EMA entries are not trained by gradient


def test_evaluation_mode_never_updates_the_codebook():
    vq = quantizer(restart=True, patience=1).eval()
    before = copy.deepcopy(vq.state_dict())
    for _ in range(3):
        vq(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_entries_unused_for_patience_steps_restart_on_encoder_outputs():
    vq = quantizer(restart=True, patience=2).train()
    e0 = vq.embed[0].clone()
    vecs = e0 + 0.01 * torch.randn(6, 4)
    z = vecs.view(1, 6, 1, 4).permute(0, 3, 1, 2)
    vq(z)
    untouched = vq.embed[1:].clone()
    assert torch.equal(vq.embed[1:], untouched)  # one step unused: not dead yet
    torch.manual_seed(0)
    vq(z)  # second unused step: every entry but 0 is dead
    for row in vq.embed[1:]:
        assert any(torch.allclose(row, v) for v in vecs), "a restarted entry is one of the batch's vectors"
    assert int(vq.last_used.min()) == int(vq.steps)
    kept = quantizer(restart=False).train()
    ref = kept.embed[1:].clone()
    for _ in range(3):
        kept(z)
    assert torch.equal(kept.embed[1:], ref)


def test_codebook_update_loss_trains_the_codebook_by_gradient(faces):
    fam = build(codebook_update="loss", dead_code_restart=False, adversarial_weight=0.0)
    book = fam.autoencoder.encoder.quantizers[0].embed
    assert book.requires_grad and any(book is p for g in fam.opt_ae.param_groups for p in g["params"])
    before = book.detach().clone()
    train(fam, faces, 0, 3)
    assert not torch.equal(before, book.detach())
    assert not build().autoencoder.encoder.quantizers[0].embed.requires_grad  # ema: not in the optimiser


def test_the_family_step_reports_and_backpropagates_every_levels_vq_loss(faces):
    """loss_vq is the sum over levels of beta * mean((z - e)^2), and it is part of what the
    encoder is trained on: another commitment weight, same seed and batch, another encoder."""
    x = to_input(faces[:4])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    fams = {beta: build(commitment=beta, adversarial_weight=0.0, dead_code_restart=False) for beta in (0.0, 1.0)}
    out = {}
    for beta, fam in fams.items():
        seen.clear()
        hooks = [vq.register_forward_hook(lambda m, inp, o: seen.append((inp[0].detach(), o[0].detach())))
                 for vq in fam.autoencoder.encoder.quantizers]
        out[beta] = fam.train_step(x, 0)
        for h in hooks:
            h.remove()
        assert len(seen) == 2  # both levels
        assert out[beta]["loss_vq"] == pytest.approx(sum(beta * float(((z - q) ** 2).mean()) for z, q in seen),
                                                     rel=1e-5, abs=1e-9)
    assert out[1.0]["loss_vq"] > 0 and out[0.0]["loss_vq"] == 0.0
    a, b = (dict(f.autoencoder.encoder.named_parameters()) for f in fams.values())
    assert not torch.equal(a["to_code.0.weight"], b["to_code.0.weight"])
    assert not torch.equal(a["base.0.weight"], b["base.0.weight"])  # the commitment reaches the first layer


# ---------------------------------------------------------------------------- the pixel attention
def attention_layer() -> tuple[PixelAttention, torch.Tensor]:
    torch.manual_seed(0)
    layer = PixelAttention(6, 3, 20)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.4)  # logits of a few units: no sigmoid saturates to exactly 0 or 1
    return layer, torch.randn(2, 6, 4, 5)


def test_attention_weights_are_a_sigmoid_with_unnormalised_rows():
    layer, x = attention_layer()
    w = layer.weights(x)
    assert w.shape == (2, 20, 20)
    assert (w > 0).all() and (w < 1).all()
    assert (w.sum(-1) - 1).abs().max() > 0.5  # rows are not a softmax's distributions
    a, b = layer.g1(x).flatten(2), layer.g2(x).flatten(2)
    i, j = 7, 13
    assert torch.allclose(w[1, i, j], torch.sigmoid(a[1, :, i] @ b[1, :, j]), atol=1e-6)
    out = layer(x)
    expect = x.flatten(2) + torch.einsum("bij,bcj->bci", w, x.flatten(2))  # x_i + sum_j W_ij x_j
    assert torch.allclose(out.flatten(2), expect, atol=1e-5)


@pytest.mark.parametrize("zeroed", ["g1", "g2"])
def test_zeroed_g1_or_g2_adds_half_the_sum_over_positions(zeroed):
    layer, x = attention_layer()
    conv = getattr(layer, zeroed)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
    expect = x + 0.5 * x.sum(dim=(2, 3), keepdim=True)  # W = sigmoid(0) = 1/2 everywhere
    assert torch.allclose(layer(x), expect, atol=1e-5)


@pytest.mark.parametrize("grid", [2, 8, 32])
def test_attention_rows_start_summing_to_the_start_value_whatever_the_features(grid):
    torch.manual_seed(grid)
    layer = PixelAttention(8, 4, grid * grid)
    x = torch.randn(2, 8, grid, grid) * 10 + 3  # large, with a strong mean: it must not matter
    rows = layer.weights(x).sum(-1)
    torch.testing.assert_close(rows, torch.full_like(rows, ATTENTION_START_ROW_SUM), rtol=1e-4, atol=0)
    layer(x).square().mean().backward()
    for g in (layer.g1, layer.g2):  # every filter learns from the first step (no zero-times-zero saddle)
        assert (g.weight.grad.flatten(1).abs().sum(1) > 0).all()


def shipped_model(space: str, levels: int = 3):
    """The space's own model section (widths, halvings, filters) with ``levels`` and attention on."""
    spec = yaml.safe_load((ROOT / space).read_text())
    size = spec["data"]["image_size"]
    cfg = deep_merge({"family": "attentive_vqvae", **FAM.DEFAULTS}, {**spec["model"], "levels": levels,
                                                                      "attention": True})
    FAM.validate(cfg, size)
    return build_model(cfg, size, seed=0), size


@pytest.mark.parametrize("space", SPACES)
def test_attention_starts_small_on_real_encoder_features_at_every_shipped_grid(space, faces):
    """||W x|| / ||x|| at initialisation, with the built-in faces through the space's real
    encoder, at every grid its levels use (256 px: 32x32, 16x16, 8x8; 32 px: 8x8, 4x4, 2x2)."""
    fam, size = shipped_model(space)
    x = F.interpolate(to_input(faces[:2]), size=(size, size), mode="bilinear", align_corners=False)
    ratios: dict[int, float] = {}

    def hook(layer, inp, out):
        v = inp[0].flatten(1)
        ratios[inp[0].shape[-1]] = float(((out.flatten(1) - v).norm(dim=1) / v.norm(dim=1)).max())

    layers = [m for m in fam.autoencoder.modules() if isinstance(m, PixelAttention)]
    hooks = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        fam.autoencoder.encoder(x)
    for h in hooks:
        h.remove()
    assert sorted(ratios) == sorted(g for g in fam.grids)
    assert max(ratios.values()) < 0.1, ratios


def test_attention_off_removes_the_parameters():
    on, off = build(levels=2, attention=True), build(levels=2, attention=False)
    assert not any(isinstance(m, PixelAttention) for m in off.autoencoder.modules())
    assert not any(".g1." in n or ".g2." in n for n, _ in off.autoencoder.named_parameters())
    w, f = FAM.TINY["width"], FAM.TINY["attention_filters"]
    per_layer = 2 * (w * f + f)  # g1 and g2: 1x1 convs with bias
    n_on = sum(p.numel() for p in on.autoencoder.parameters())
    n_off = sum(p.numel() for p in off.autoencoder.parameters())
    assert n_on - n_off == 2 * per_layer  # one layer per level


# ---------------------------------------------------------------------------- levels
@pytest.mark.parametrize("size,levels", list(itertools.product([32, 64], [1, 2, 3])))
def test_levels_build_and_train_in_both_phases(size, levels):
    fam = build(size, levels=levels, prior_start_step=2)
    x = torch.rand(2, 3, size, size) * 2 - 1
    losses = [fam.train_step(x, s) for s in range(3)]
    assert "loss_rec" in losses[0] and "loss_prior" in losses[2]
    assert all(math.isfinite(v) for d in losses for v in d.values())
    codes = fam.encode_codes(x)
    bottom = size // 2 ** FAM.TINY["downsample"]
    assert [tuple(c.shape) for c in codes] == [(2, bottom // 2**k, bottom // 2**k) for k in range(levels)]
    assert len(fam.autoencoder.encoder.quantizers) == levels
    assert fam.prior.length == sum((bottom // 2**k) ** 2 for k in range(levels))  # one joint sequence
    img = fam.sample(2, seed=0)
    assert img.shape == (2, 3, size, size) and img.abs().max() <= 1


def test_upper_level_quantised_output_is_resized_to_the_lower_grid():
    fam = build(levels=2)
    enc = fam.autoencoder.encoder
    seen = {}
    hook = enc.to_code[0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    codes = fam.encode_codes(torch.rand(2, 3, 32, 32) * 2 - 1)
    hook.remove()
    d = FAM.TINY["code_dim"]
    upper = enc.quantizers[1].embed[codes[1]].permute(0, 3, 1, 2)  # (2, d, 4, 4): the quantised level 2
    resized = seen["x"][:, -d:]  # what the 1x1 conv got beside level 1's output
    assert resized.shape[-2:] == codes[0].shape[-2:] == (8, 8)
    assert torch.equal(resized, F.interpolate(upper, size=(8, 8), mode="nearest"))
    assert torch.equal(resized[:, :, ::2, ::2], upper)  # each upper code covers a 2x2 block below


def test_decoder_reads_every_level_resized_to_the_bottom_grid_and_concatenated():
    fam = build(levels=3)
    seen = {}
    hook = fam.autoencoder.decoder.combine.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    codes = fam.encode_codes(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        fam.autoencoder.decode_codes(codes)
    hook.remove()
    quantizers = fam.autoencoder.encoder.quantizers
    maps = [F.interpolate(vq.embed[c].permute(0, 3, 1, 2), size=(8, 8), mode="nearest") for vq, c in zip(quantizers, codes)]
    assert torch.equal(seen["x"], torch.cat(maps, 1))  # (2, 3 d, 8, 8): bottom, level 2, level 3
    assert build(levels=1).autoencoder.decoder.combine is None  # one level: the bottom map alone


@pytest.mark.parametrize("levels", [2, 3])
def test_zeroing_the_upper_codes_changes_the_reconstruction(levels, faces):
    fam = build(levels=levels, adversarial_weight=0.0, lr=3e-3)
    train(fam, faces[:40], 0, 10)
    x = to_input(faces[:8])
    with torch.no_grad(), fam.sampling():
        qs, _, _ = fam.autoencoder.encoder(x)
        full = fam.autoencoder.decoder(qs)
        for k in range(1, levels):
            cut = fam.autoencoder.decoder([q if j != k else torch.zeros_like(q) for j, q in enumerate(qs)])
            assert (cut - full).abs().mean() > 0.05 * (full - full.mean()).abs().mean(), k
    # and what the model draws: the same bottom codes under other upper codes give other images
    _, codes = fam.generate(4, seed=1)
    other = [codes[0]] + [torch.roll(c, 1, dims=0) for c in codes[1:]]
    with torch.no_grad(), fam.sampling():
        assert not torch.allclose(fam.autoencoder.decode_codes(codes), fam.autoencoder.decode_codes(other))


def test_two_levels_report_more_bits_per_image_than_one():
    one, two = build(levels=1), build(levels=2)
    k = FAM.TINY["codebook_size"]
    assert one.code_bits() == {"code_bits_l1": 64 * math.log2(k)}  # 8x8 positions, log2 K bits each
    assert two.code_bits() == {"code_bits_l1": 64 * math.log2(k), "code_bits_l2": 16 * math.log2(k)}
    assert sum(two.code_bits().values()) > sum(one.code_bits().values())


def test_prior_bits_per_level_are_the_code_length_with_a_known_answer_for_a_uniform_prior(faces):
    """With the prior's head zeroed every code has probability 1/K: level k's code length is
    exactly its positions x log2 K bits, and prior_nll is log K."""
    fam = build(levels=3)
    with torch.no_grad():
        fam.prior.head.weight.zero_()
    out, _ = fam.code_report(faces[:10], batch=4)
    k = FAM.TINY["codebook_size"]
    for name, bits in fam.code_bits().items():
        assert out[name.replace("code_bits", "prior_bits")] == pytest.approx(bits, rel=1e-6)
    assert out["prior_nll"] == pytest.approx(math.log(k), rel=1e-6)
    assert set(fam.code_bits()) == {"code_bits_l1", "code_bits_l2", "code_bits_l3"}


# ---------------------------------------------------------------------------- the joint prior
def test_the_joint_sequence_holds_the_top_grid_first_and_round_trips():
    codes = [torch.randint(0, 16, (3, g, g)) for g in (8, 4, 2)]
    seq = to_sequence(codes)
    assert seq.shape == (3, 64 + 16 + 4)
    assert torch.equal(seq[:, :4], codes[2].flatten(1)) and torch.equal(seq[:, -64:], codes[0].flatten(1))
    assert all(torch.equal(a, b) for a, b in zip(from_sequence(seq, [8, 4, 2]), codes))
    prior = build(levels=3).prior
    assert prior.level.tolist() == [2] * 4 + [1] * 16 + [0] * 64


def test_the_prior_is_causal_and_the_bottom_grid_is_conditioned_on_the_upper_one():
    fam = build(levels=2)
    prior = fam.prior.eval()
    torch.manual_seed(0)
    seq = torch.randint(0, 16, (1, prior.length))
    i = 5  # a position of the upper (4x4) grid, which comes first
    changed = seq.clone()
    changed[0, i] = (seq[0, i] + 1) % 16
    with torch.no_grad():
        a, b = prior(seq), prior(changed)
    assert torch.allclose(a[:, : i + 1], b[:, : i + 1], atol=1e-6)  # nothing before or at i sees token i
    bottom = slice(16, prior.length)
    assert (a[:, bottom] - b[:, bottom]).abs().amax(-1).min() > 0  # every bottom position sees it


def test_before_the_prior_trains_sampled_codes_are_uniform_over_the_codebook():
    fam = build(codebook_size=16)
    assert fam.prior_steps == 0
    _, codes = fam.generate(64, seed=3)  # 64 images x (8x8 + 4x4) positions = 5120 draws
    for c in codes:
        counts = torch.bincount(c.flatten(), minlength=16).double()
        expected = c.numel() / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_once_trained_the_prior_decides_the_codes_of_every_level():
    fam = build(prior_start_step=0, prior={"lr": 3e-2, "dropout": 0.0})
    torch.manual_seed(0)
    img = torch.rand(1, 3, 32, 32).repeat(4, 1, 1, 1) * 2 - 1  # one image: one code sequence to learn
    target = [c[0] for c in fam.encode_codes(img)]
    for step in range(60):
        torch.manual_seed(step)
        fam.train_step(img, step)
    _, codes = fam.generate(8, seed=5)
    for c, t in zip(codes, target):
        assert (c == t).double().mean() > 0.9  # uniform codes would match 1 in 16


def test_cached_sampling_draws_from_the_full_forward_distribution():
    fam = build(levels=3)
    prior = fam.prior.eval()
    torch.manual_seed(0)
    u = torch.rand(4, prior.length)
    with torch.no_grad():
        codes = prior.generate(u, temperature=0.7)
        probs = torch.softmax(prior(codes).float() / 0.7, -1)  # all positions in one causal pass
    again = torch.searchsorted(probs.cumsum(-1), u[..., None], right=True)[..., 0].clamp_max(prior.codes - 1)
    assert torch.equal(codes, again)


# ---------------------------------------------------------------------------- generation-ready
def feed(fam, losses: list[float], codes: list[torch.Tensor]) -> list[bool]:
    """The readiness rule after each of ``losses`` (one prior step each, on ``codes``)."""
    out = []
    for loss in losses:
        fam.track_readiness(torch.tensor(loss), codes)
        out.append(fam.generation_ready)
    return out


def mixed_levels() -> list[torch.Tensor]:
    """Bottom codes half 0, half 1 (frequency entropy log 2 nats), upper codes all 0 (entropy 0):
    a context-free prior reaches (64 log 2 + 16 * 0) / 80 = 0.8 log 2 = 0.555 nats per code."""
    return [torch.arange(64).view(1, 8, 8) % 2, torch.zeros(1, 4, 4, dtype=torch.long)]


def test_ready_once_the_running_nll_is_a_margin_below_the_code_frequencies_entropy():
    """0.8 log 2 = 0.555 nats per code is what a context-free prior reaches here; the rule wants
    the running NLL (EMA, decay 0.9) at or below 0.505. Ten steps at 3.0, then 0: 3 * 0.9^j <= 0.505
    first at j = 17, i.e. the 27th prior step."""
    assert avq.READY_MIN_STEPS == 20 and avq.READY_MARGIN == 0.05 and avq.PRIOR_NLL_DECAY == 0.9
    fam = build()
    flags = feed(fam, [3.0] * 10 + [0.0] * 30, mixed_levels())
    assert flags.index(True) + 1 == 27 and fam.ready_at == 27
    assert fam.frequency_nll() == pytest.approx(0.8 * math.log(2))
    assert all(feed(fam, [5.0] * 30, mixed_levels()))  # once ready, it stays ready


def test_never_ready_before_the_minimum_prior_steps_nor_above_the_margin():
    fam = build()
    flags = feed(fam, [0.0] * 30, mixed_levels())
    assert flags.index(True) + 1 == avq.READY_MIN_STEPS  # a perfect loss from the first step: still 20 steps
    slow = build()
    assert not any(feed(slow, [0.8 * math.log(2) - 0.04] * 100, mixed_levels()))  # learned the frequencies only


def test_a_single_used_code_is_ready_once_the_prior_is_nearly_certain():
    """Frequency entropy 0 (a collapsed codebook) cannot be beaten; within 0.1 log K = 0.277
    nats of certainty (K = 16) the prior has nothing left to learn, so such a trial still gets scored."""
    assert avq.READY_CERTAIN == 0.1
    zeros = [torch.zeros(1, g, g, dtype=torch.long) for g in (8, 4)]
    assert feed(build(), [0.27] * 20, zeros)[-1]
    assert not any(feed(build(), [0.29] * 40, zeros))


def test_readiness_and_its_statistics_survive_a_checkpoint(faces):
    fam = build(prior=FAST_PRIOR)
    train(fam, faces[:40], 0, 25)  # 15 prior steps: not ready yet
    buf = io.BytesIO()
    torch.save(fam.state_dict(), buf)
    resumed = build(prior=FAST_PRIOR, seed=1)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert resumed.readiness() == fam.readiness() and not resumed.generation_ready
    assert torch.equal(resumed.code_counts, fam.code_counts) and int(fam.code_counts.sum()) == 15 * 4 * 80
    train(fam, faces[:40], 25, 35)
    train(resumed, faces[:40], 25, 35)
    assert fam.generation_ready and resumed.ready_at == fam.ready_at
    assert resumed.prior_nll_running == fam.prior_nll_running
    buf = io.BytesIO()
    torch.save(fam.state_dict(), buf)  # a checkpoint of a ready family resumes ready
    again = build(prior=FAST_PRIOR, seed=2)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert again.generation_ready and again.ready_at == fam.ready_at


def test_training_reaches_readiness_and_sampling_uses_the_prior_from_its_first_step(faces):
    fam = build(prior=FAST_PRIOR)
    start = FAM.TINY["prior_start_step"]
    train(fam, faces[:40], 0, start + 1)
    assert fam.prior_steps == 1 and not fam.generation_ready
    assert fam.cluster_assignments(4, seed=0) is None  # no cluster_perplexity of a prior that has not learned
    ready = ready_family(faces)
    assert ready.ready_at == avq.READY_MIN_STEPS
    assert ready.prior_nll_running <= ready.frequency_nll() - avq.READY_MARGIN
    images, assign, k = ready.cluster_assignments(4, seed=0)
    assert assign.shape == (4, 8, 8) and k == 16


# ---------------------------------------------------------------------------- data parallel
def _ddp_worker(rank: int, rdv: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=2)
    fam = build(seed=rank, prior_start_step=6, dead_code_patience=2)  # different init: sync must fix it
    fam.sync_from_rank0()
    for step in range(10):
        torch.manual_seed(1000 * rank + step)  # each rank its own half of the batch and its own RNG
        fam.train_step(torch.rand(2, 3, 32, 32) * 2 - 1, step)
    torch.save(fam.state_dict(), f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_codebooks_and_readiness(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "rank")), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("autoencoder", "prior", "discriminator"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part} differs between ranks at {differ[:4]}"
    q = a["autoencoder"]
    assert int(q["encoder.quantizers.0.steps"]) == 6  # six autoencoder steps, then the prior phase
    assert a["prior_steps"] == b["prior_steps"] == 4
    # the readiness statistics are the global batch's (all-reduced), so every rank agrees on them
    assert a["prior_nll_running"] == b["prior_nll_running"] and a["ready_at"] == b["ready_at"]
    assert torch.equal(a["code_counts"], b["code_counts"]) and int(a["code_counts"].sum()) == 4 * 2 * 2 * 80


# ---------------------------------------------------------------------------- evaluation
def evaluator(faces, tmp_path, **cfg):
    from sweeper.eval.evaluator import Evaluator

    return Evaluator({"n_gen": 16, "batch_size": 8, "features": "randcnn", "grid_size": 8, "kid_subsets": 10, **cfg},
                     faces[:40], storage=str(tmp_path / "store"), out_dir=str(tmp_path / "eval"),
                     heldout_images=faces[40:60])


def test_an_evaluation_before_ready_reports_no_generation_objective_and_one_after_does(faces, tmp_path):
    ev = evaluator(faces, tmp_path)
    fam = build(prior=FAST_PRIOR)
    train(fam, faces[:40], 0, FAM.TINY["prior_start_step"] + 5)  # the prior trains, but has not learned yet
    m, arts = ev.evaluate(fam, step=15)
    assert m["generation_ready"] == 0.0 and m["prior_steps"] == 5.0
    assert not {"fd_randcnn", "kd_randcnn", "cluster_perplexity", "memorized_frac"} & set(m)
    assert {"recon_mae", "recon_mae_heldout", "recon_fd_randcnn", "prior_nll", "prior_nll_heldout"} <= set(m)
    names = {Path(a).name for a in arts}
    assert "reconstructions_0000015.png" in names and not any(n.startswith(("samples", "clusters")) for n in names)
    ready = ready_family(faces)
    m2, arts2 = ev.evaluate(ready, step=30)
    assert m2["generation_ready"] == 1.0
    assert {"fd_randcnn", "kd_randcnn", "cluster_perplexity", "recon_fd_randcnn", "recon_mae_heldout"} <= set(m2)
    assert {"samples_0000030.png", "clusters_0000030.png"} <= {Path(a).name for a in arts2}


def direct_reconstructions(fam, u8: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), fam.sampling():
        qs, _, _ = fam.autoencoder.encoder(to_input(u8))
        return fam.autoencoder.decoder(qs).clamp(-1, 1)


def test_reconstruction_metrics_on_training_and_held_out_images_mean_what_they_say(faces, tmp_path):
    from sweeper.eval.distances import frechet_to_reference

    ev = evaluator(faces, tmp_path)
    fam = build(levels=2)
    train(fam, faces[:40], 0, 4)
    m, _ = ev.evaluate(fam, step=4)
    for images, suffix in ((faces[:40], ""), (faces[40:60], "_heldout")):
        rec = direct_reconstructions(fam, images)
        assert m["recon_mae" + suffix] == pytest.approx(float(((rec - to_input(images)).abs() / 2).mean()), rel=1e-4)
        codes = fam.encode_codes(to_input(images))
        assert m["active_codes" + suffix] == len(codes[0].unique())
        assert m["active_codes_l2" + suffix] == len(codes[1].unique())
        with torch.no_grad():
            per_code = fam.prior.eval().token_nll(to_sequence(codes))  # (n, 16 + 64): the upper grid first
        assert m["prior_nll" + suffix] == pytest.approx(float(per_code.mean()), rel=1e-4)
        upper, bottom = per_code.split([16, 64], dim=1)  # each level's code length, bits per image
        assert m["prior_bits_l2" + suffix] == pytest.approx(float(upper.sum(1).mean()) / math.log(2), rel=1e-4)
        assert m["prior_bits_l1" + suffix] == pytest.approx(float(bottom.sum(1).mean()) / math.log(2), rel=1e-4)
    assert m["recon_mae"] != m["recon_mae_heldout"]
    # recon_fd_randcnn: the reconstructions' features against the training set's reference
    rec_u8 = avq.to_u8(direct_reconstructions(fam, faces[:40]))
    expect = frechet_to_reference(ev.extractor(rec_u8), ev.reference().gaussian)
    assert m["recon_fd_randcnn"] == pytest.approx(expect, rel=1e-5)
    itself = frechet_to_reference(ev.extractor(faces[:40]), ev.reference().gaussian)
    assert abs(itself) < 1e-3 * expect  # the training images themselves are at distance 0


def test_training_lowers_reconstruction_error_then_the_prior_nll(faces):
    over = dict(width=16, code_dim=8, lr=2e-3, adversarial_weight=0.0, levels=1, prior_start_step=60,
                prior={"dim": 32, "lr": 3e-3, "dropout": 0.0})
    fam = build(**over)
    sub = faces[:32]
    first = fam.code_report(sub)[0]
    train(fam, sub, 0, 60, batch=8)
    mid = fam.code_report(sub)[0]
    train(fam, sub, 60, 100, batch=8)
    last = fam.code_report(sub)[0]
    assert mid["recon_mae"] < 0.8 * first["recon_mae"]
    assert last["recon_mae"] == mid["recon_mae"]  # frozen in the prior phase
    assert last["prior_nll"] < mid["prior_nll"] - 0.1


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("over,key", [
    ({"levels": 4}, "levels"),
    ({"downsample": 3, "levels": 3}, "downsample"),  # 32 px / 2^5 = 1x1 top grid
    ({"prior": {"dim": 30, "heads": 4}}, "prior.dim"),
    ({"codebook_update": "kmeans"}, "codebook_update"),
    ({"recon_loss": "lpips"}, "recon_loss"),
    ({"disc_layers": 4}, "disc_layers"),
    ({"attention": "yes"}, "attention"),
    ({"codebook_size": 1}, "codebook_size"),
])
def test_bad_values_name_the_key(over, key):
    with pytest.raises(SweeperError, match=rf"^model\.{re.escape(key)}: "):
        FAM.validate(cfg_of(**over), 32)


@pytest.mark.parametrize("space", SPACES)
def test_shipped_spaces_compare_the_papers_points_and_hold_out_a_fifth(space):
    from sweeper.config.space import apply, load_spec

    spec = load_spec(ROOT / space)
    cfg = spec.run_config
    params = spec.sweep["params"]
    # the paper's comparison: one level with attention vs several without, both in the space
    assert 1 in params["model.levels"]["choices"] and max(params["model.levels"]["choices"]) > 1
    assert set(params["model.attention"]["choices"]) == {True, False}
    # every categorical combination is a valid config (no trial fails on validation)
    cats = {k: v["choices"] for k, v in params.items() if v["type"] == "categorical"}
    for combo in itertools.product(*cats.values()):
        apply(cfg, dict(zip(cats, combo)))
    # the prior phase is long enough to pass the readiness rule several evaluations before the end
    prior_steps = cfg["train"]["steps"] - cfg["model"]["prior_start_step"]
    assert prior_steps >= 2 * cfg["eval"]["every"] and prior_steps >= 5 * avq.READY_MIN_STEPS
    assert cfg["data"]["subset"] is not None  # held-out images for the *_heldout metrics (the paper: 20 %)


# ---------------------------------------------------------------------------- a real sweep
def test_cpu_space_sweeps_end_to_end_judges_only_ready_evaluations_and_retrains_the_best(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sweeper.cli import main
    from sweeper.run.sweep import run_sweep
    from sweeper.search.study import open_storage

    space = ROOT / "search_spaces/attentive_vqvae_cpu.yaml"
    spec = yaml.safe_load(space.read_text())
    spec.update(name="avq", storage=str(tmp_path / "sweeps"))
    # The shipped space ranks by Inception FID (~10 s per 32 samples on a CPU core); the test runs
    # its machinery on the cheap randcnn features, the same space otherwise. CPU seconds: fewer
    # steps and trials (20 autoencoder steps: after 10 the codebooks are still collapsed onto one
    # code), and a fast prior: evaluations 10-30 come before its 20th step, so before generation is
    # ready; measured ready at 40, 50 or 60 depending on the trial. One trial at a time: every
    # trial after the first is judged against the completed ones (deterministic pruning).
    spec["eval"]["features"], spec["sweep"]["objective"] = "randcnn", {"metric": "fd_randcnn", "mode": "min"}
    # CPU-second trials draw nearly one image (diversity_px ~0.02): the collapse guard, tested where it
    # is the subject (test_constraints, test_diversity), would leave `sweeper best` nothing to rank
    spec["sweep"]["collapse"] = {"min": None}
    spec["model"].update(prior_start_step=20, prior={**spec["model"]["prior"], "lr": 3e-2})
    spec["train"].update(steps=60, checkpoint_every=10)
    spec["eval"].update(every=10, n_gen=32, grid_size=16)
    spec["sweep"].update(trials=3, max_concurrent=1, sampler={"type": "random", "seed": 0},
                         pruner={"type": "median", "warmup_steps": 0, "args": {"n_startup_trials": 1}})
    path = tmp_path / "avq.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_sweep(str(path), num_cpus=2)

    study = optuna.load_study(study_name="avq", storage=open_storage(str(tmp_path / "sweeps/avq/optuna.journal")))
    assert len(study.trials) == 3 and all(
        t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps/avq/mlflow.db'}")
    exp = client.get_experiment_by_name("avq")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "sweeper.trial_id" in r.data.tags]
    assert len(runs) == 3
    for r in runs:
        ready = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "generation_ready")}
        objective = {m.step for m in client.get_metric_history(r.info.run_id, "fd_randcnn")}
        assert ready[10] == ready[20] == ready[30] == 0.0 and ready[60] == 1.0  # not before the prior's 20th step
        assert objective == {s for s, v in ready.items() if v == 1.0}  # an objective exactly when ready
        for key in ("recon_mae_heldout", "recon_fd_randcnn", "prior_nll_heldout", "active_codes", "loss_prior"):
            assert client.get_metric_history(r.info.run_id, key), key
        arts = tmp_path / "sweeps/avq/mlartifacts" / r.info.run_id / "artifacts/eval/step_00000010"
        assert (arts / "reconstructions_0000010.png").is_file() and not list(arts.glob("samples_*"))
    for t in study.trials:  # every value Optuna saw, and every pruning decision, is from a ready evaluation
        assert t.intermediate_values and min(t.intermediate_values) >= 40
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["pruned_at_step"] >= 40 and "fd_randcnn" in t.user_attrs["prune_reason"]
    assert summary["completed"] == sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    capsys.readouterr()
    assert main(["best", "--space", str(path), "--out", "-"]) == 0
    best = tmp_path / "best.yaml"
    best.write_text(capsys.readouterr().out)
    assert yaml.safe_load(best.read_text())["model"]["family"] == "attentive_vqvae"
    out = tmp_path / "retrain"
    assert main(["train", str(best), "--steps", "10", "--out", str(out)]) == 0
    assert (out / "checkpoints/step_00000010.pt").is_file()

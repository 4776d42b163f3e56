"""Attentive VQ-VAE: the quantiser, the pixel attention, the AREN levels, the two phases, the
evaluation metrics, and the CPU space through a real sweep."""

from __future__ import annotations

import copy
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

from sweeper.sweep import bind_loopback

bind_loopback()  # before anything imports ray

from models import build_model, get_family  # noqa: E402
from models.attentive_vqvae import PixelAttention, VectorQuantizer  # noqa: E402
from sweeper.config import deep_merge  # noqa: E402
from sweeper.errors import SweeperError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAM = get_family("attentive_vqvae")
SPACES = ("search_spaces/attentive_vqvae.yaml", "search_spaces/attentive_vqvae_cpu.yaml")


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


def build(size: int = 32, **over):
    return build_model(cfg_of(**over), size, seed=0)


def to_input(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


def train(fam, images: torch.Tensor, start: int, end: int, batch: int = 4) -> list[dict]:
    out = []
    for step in range(start, end):
        torch.manual_seed(step)
        idx = torch.randint(0, len(images), (batch,))
        out.append(fam.train_step(to_input(images[idx]), step))
    return out


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


def test_straight_through_gradient_reaches_the_encoder():
    vq = quantizer().eval()
    enc = nn.Conv2d(3, 4, 1)
    z = enc(torch.randn(2, 3, 4, 4))
    z.retain_grad()
    q, _, _ = vq(z)
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(z.grad, g)  # dq/dz is the identity
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0


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
    book = fam.autoencoder.codebook
    assert book.requires_grad and any(book is p for g in fam.opt_ae.param_groups for p in g["params"])
    before = book.detach().clone()
    train(fam, faces, 0, 3)
    assert not torch.equal(before, book.detach())
    assert not build().autoencoder.codebook.requires_grad  # ema: not in the optimiser


# ---------------------------------------------------------------------------- the pixel attention
def attention_layer() -> tuple[PixelAttention, torch.Tensor]:
    torch.manual_seed(0)
    layer = PixelAttention(6, 3)
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


def test_attention_starts_near_the_identity():
    torch.manual_seed(0)
    layer = PixelAttention(8, 4)
    x = torch.randn(1, 8, 4, 4) * 0.1
    assert layer.weights(x).max() < 0.01


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


# ---------------------------------------------------------------------------- the two phases
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_prior_gets_no_gradient_before_prior_start_step(faces):
    fam = build(prior_start_step=4)
    before = snapshot(fam.prior)
    losses = train(fam, faces, 0, 4)
    assert all("loss_prior" not in d for d in losses) and fam.prior_steps == 0
    assert all(p.grad is None for p in fam.prior.parameters())
    assert same(before, snapshot(fam.prior))


def test_autoencoder_is_frozen_from_prior_start_step_on(faces):
    fam = build(prior_start_step=4)
    train(fam, faces, 0, 4)
    ae, disc, prior = snapshot(fam.autoencoder), snapshot(fam.discriminator), snapshot(fam.prior)
    losses = train(fam, faces, 4, 8)
    assert all(set(d) == {"loss_prior"} for d in losses) and fam.prior_steps == 4
    assert same(ae, snapshot(fam.autoencoder))  # weights, codebooks and their statistics
    assert same(disc, snapshot(fam.discriminator))
    assert not same(prior, snapshot(fam.prior))


def test_autoencoder_keeps_training_in_the_prior_phase_when_not_frozen(faces):
    fam = build(prior_start_step=2, freeze_autoencoder=False)
    train(fam, faces, 0, 2)
    ae = snapshot(fam.autoencoder)
    losses = train(fam, faces, 2, 4)
    assert {"loss_rec", "loss_prior"} <= set(losses[-1])
    assert not same(ae, snapshot(fam.autoencoder))


def test_before_the_prior_trains_sampled_codes_are_uniform_over_the_codebook():
    fam = build(codebook_size=16)
    assert not fam.prior_trained
    _, codes = fam.generate(64, seed=3)  # 64 images x 8x8 positions = 4096 draws
    counts = torch.bincount(codes.flatten(), minlength=16).double()
    expected = codes.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_once_trained_the_prior_decides_the_sampled_codes():
    fam = build(prior_start_step=0, prior={"lr": 3e-2, "dropout": 0.0})
    torch.manual_seed(0)
    img = torch.rand(1, 3, 32, 32).repeat(4, 1, 1, 1) * 2 - 1  # one image: one code sequence to learn
    target = fam.encode_codes(img)[0][0]
    for step in range(60):
        torch.manual_seed(step)
        fam.train_step(img, step)
    assert fam.prior_trained
    _, codes = fam.generate(8, seed=5)
    match = (codes == target).double().mean()
    assert match > 0.9  # uniform codes would match 1 in 16


def test_cached_sampling_draws_from_the_full_forward_distribution():
    fam = build()
    prior = fam.prior.eval()
    torch.manual_seed(0)
    u = torch.rand(4, prior.length)
    with torch.no_grad():
        codes = prior.generate(u, temperature=0.7)
        probs = torch.softmax(prior(codes).float() / 0.7, -1)  # all positions in one causal pass
    again = torch.searchsorted(probs.cumsum(-1), u[..., None], right=True)[..., 0].clamp_max(prior.codes - 1)
    assert torch.equal(codes, again)


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


def test_two_gloo_ranks_keep_identical_codebooks_through_ema_updates_and_restarts(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "rank")), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("autoencoder", "prior", "discriminator"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part} differs between ranks at {differ[:4]}"
    q = a["autoencoder"]
    assert int(q["encoder.quantizers.0.steps"]) == 6  # six autoencoder steps, then the prior phase
    assert a["prior_steps"] == b["prior_steps"] == 4


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_reports_code_metrics_marks_pre_prior_and_writes_pictures(faces, tmp_path):
    from sweeper.evaluation import Evaluator

    fam = build(prior_start_step=3)
    ev = Evaluator({"n_gen": 16, "batch_size": 8, "features": "randcnn", "grid_size": 8, "kid_subsets": 10},
                   faces[:40], storage=str(tmp_path / "store"), out_dir=str(tmp_path / "eval"))
    m, arts = ev.evaluate(fam, step=0)
    assert m["prior_trained"] == 0.0
    assert abs(m["prior_nll"] - math.log(16)) < 0.5  # an untrained prior is near uniform
    assert 1 <= m["active_codes"] <= 16 and 1 <= m["active_codes_l2"] <= 16
    assert 1 <= m["code_perplexity"] <= m["active_codes"] + 1e-9
    assert 0 < m["recon_mae"] < 1 and m["recon_psnr"] > 0
    assert {"fd_randcnn", "cluster_perplexity"} <= set(m)
    names = {Path(a).name for a in arts}
    assert {"reconstructions_0000000.png", "clusters_0000000.png", "samples_0000000.png"} <= names
    # the reconstruction MAE is the mean absolute pixel error in [0, 1] units
    with torch.no_grad(), fam.sampling():
        x = to_input(faces[:40])
        q, _, _ = fam.autoencoder.encoder(x)
        mae = float(((fam.autoencoder.decoder(q).clamp(-1, 1) - x).abs() / 2).mean())
    assert m["recon_mae"] == pytest.approx(mae, rel=1e-4)
    train(fam, faces, 0, 4)
    m2, _ = ev.evaluate(fam, step=4)
    assert m2["prior_trained"] == 1.0


def test_training_lowers_reconstruction_error_then_the_prior_nll(faces):
    over = dict(width=16, code_dim=8, lr=2e-3, adversarial_weight=0.0, levels=1, prior_start_step=60,
                prior={"dim": 32, "lr": 3e-3, "dropout": 0.0})
    fam = build(**over)
    sub = faces[:32]
    first = fam.code_metrics(sub)
    train(fam, sub, 0, 60, batch=8)
    mid = fam.code_metrics(sub)
    train(fam, sub, 60, 100, batch=8)
    last = fam.code_metrics(sub)
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
def test_shipped_spaces_judge_trials_only_after_the_prior_started(space):
    from sweeper.spec import apply, load_spec

    spec = load_spec(ROOT / space)
    cfg = spec.run_config
    start, every = cfg["model"]["prior_start_step"], cfg["eval"]["every"]
    warmup = spec.sweep["pruner"]["warmup_steps"]
    first_judged = math.ceil(warmup / every) * every
    assert first_judged > start  # the first evaluation the pruner sees has a trained prior
    params = spec.sweep["params"]
    # the paper's comparison: one level with attention vs several without, both in the space
    assert 1 in params["model.levels"]["choices"] and max(params["model.levels"]["choices"]) > 1
    assert set(params["model.attention"]["choices"]) == {True, False}
    # every categorical combination is a valid config (no trial fails on validation)
    cats = {k: v["choices"] for k, v in params.items() if v["type"] == "categorical"}
    for combo in itertools.product(*cats.values()):
        apply(cfg, dict(zip(cats, combo)))


# ---------------------------------------------------------------------------- a real sweep
def test_cpu_space_sweeps_end_to_end_prunes_after_the_prior_and_retrains_the_best(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sweeper.cli import main
    from sweeper.search import open_storage
    from sweeper.sweep import run_sweep

    space = ROOT / "search_spaces/attentive_vqvae_cpu.yaml"
    spec = yaml.safe_load(space.read_text())
    spec.update(name="avq", storage=str(tmp_path / "sweeps"))
    # The shipped space ranks by Inception FID (~10 s per 32 samples on a CPU core); the test runs
    # its machinery on the cheap randcnn features, the same space otherwise.
    spec["eval"]["features"], spec["sweep"]["objective"] = "randcnn", {"metric": "fd_randcnn", "mode": "min"}
    # CPU seconds: same shape as the shipped space (prior at 1/3 of the run, first judged
    # evaluation after it), fewer steps and trials. One trial at a time: every trial after the first
    # is judged at step 20 against the completed ones, so which trials are pruned is deterministic.
    spec["model"].update(prior_start_step=10)
    spec["train"].update(steps=30, checkpoint_every=10)
    spec["eval"].update(every=10, n_gen=32, grid_size=16)
    spec["sweep"].update(trials=3, max_concurrent=1, sampler={"type": "random", "seed": 0},
                         pruner={"type": "median", "warmup_steps": 20, "args": {"n_startup_trials": 1}})
    path = tmp_path / "avq.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_sweep(str(path), num_cpus=2)

    study = optuna.load_study(study_name="avq", storage=open_storage(str(tmp_path / "sweeps/avq/optuna.journal")))
    states = [t.state for t in study.trials]
    assert len(states) == 3 and all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                                     for s in states)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    for t in pruned:
        assert t.user_attrs["pruned_at_step"] == 20 and "fd_randcnn" in t.user_attrs["prune_reason"]
    assert summary["completed"] == 3 - len(pruned)

    client = MlflowClient(f"sqlite:///{tmp_path / 'sweeps/avq/mlflow.db'}")
    exp = client.get_experiment_by_name("avq")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "sweeper.trial_id" in r.data.tags]
    assert len(runs) == 3
    for r in runs:
        flag = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "prior_trained")}
        assert flag[10] == 0.0 and flag[20] == 1.0  # evaluation 10 is pre-prior, 20 is not
        for key in ("active_codes", "recon_psnr", "prior_nll", "cluster_perplexity", "loss_prior"):
            assert client.get_metric_history(r.info.run_id, key), key
        arts = tmp_path / "sweeps/avq/mlartifacts" / r.info.run_id / "artifacts/eval/step_00000010"
        assert (arts / "reconstructions_0000010.png").is_file()

    capsys.readouterr()
    assert main(["best", "--space", str(path), "--out", "-"]) == 0
    best = tmp_path / "best.yaml"
    best.write_text(capsys.readouterr().out)
    assert yaml.safe_load(best.read_text())["model"]["family"] == "attentive_vqvae"
    out = tmp_path / "retrain"
    assert main(["train", str(best), "--steps", "10", "--out", str(out)]) == 0
    assert (out / "checkpoints/step_00000010.pt").is_file()

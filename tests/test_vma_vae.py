"""VMA-VAE (models/vma_vae.py): addressing, the VIMCO estimator against an enumerated exact
gradient, the multi-sample bound, few-shot data memory, metrics, and the CPU space swept end to
end. The family contract (resume, sampling, gradients, validation) is tests/test_family_contract.py.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import pytest
import torch

from models import build_model, get_family
from models.vma_vae import (
    image_keys,
    log_mean_exp,
    score_function_surrogate,
    similarity,
    to_uint8,
    vimco_surrogate,
)
from sweeper.config import deep_merge
from sweeper.data import sample_batch
from sweeper.errors import SweeperError
from sweeper.trainer import step_seed

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core box two spinning threads are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_of(**over) -> dict:
    cls = get_family("vma_vae")
    return deep_merge(deep_merge({"family": "vma_vae", **cls.DEFAULTS}, cls.TINY), over)


def build(seed: int = 0, **over):
    cfg = cfg_of(**over)
    get_family("vma_vae").validate(cfg, SIZE)
    return build_model(cfg, SIZE, seed=seed)


def train(fam, faces: torch.Tensor, start: int, end: int, batch: int = 8) -> list[dict]:
    """The trainer's seeding and batching (sweeper.trainer.Trainer.fit), without the rest of the loop."""
    out = []
    for step in range(start, end):
        torch.manual_seed(step_seed(0, step, 0))
        out.append(fam.train_step(sample_batch(faces, batch, 0, step, True), step))
    return out


def as_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


# ---------------------------------------------------------------------------- addressing
@pytest.mark.parametrize("kind", ["normalized_inner", "inner", "cosine"])
def test_address_posterior_sums_to_one_and_follows_the_similarity_formula(kind):
    e_mem = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])  # ||e_a|| = 1, 2, 5
    e_q = torch.tensor([[2.0, 1.0], [-1.0, 0.5]])
    q = torch.softmax(similarity(e_mem, e_q, kind), 1)
    for i, eq in enumerate(e_q.tolist()):
        s = []
        for ea in e_mem.tolist():
            dot = ea[0] * eq[0] + ea[1] * eq[1]
            na, nq = math.hypot(*ea), math.hypot(*eq)
            s.append({"normalized_inner": dot / na, "inner": dot, "cosine": dot / (na * nq)}[kind])
        expected = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
        assert q[i].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("kind", ["normalized_inner", "inner", "cosine"])
def test_the_familys_address_distributions_sum_to_one_over_the_memory(kind, faces):
    fam = build(similarity=kind)
    memory, x = as_float(faces[:6]), as_float(faces[6:9])
    log_q, log_p = fam.address_log_probs(memory, x)
    assert log_q.shape == (3, 6)
    assert torch.allclose(log_q.exp().sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(1), atol=1e-5)
    e_mem, e_q = fam.net.embed_memory(memory), fam.net.embed_query(x)  # q(a|x) = softmax S(h(m_a), h_q(x))
    assert torch.allclose(log_q, torch.log_softmax(similarity(e_mem, e_q, kind), 1), atol=1e-5)


def test_a_flat_prior_is_exactly_one_over_the_memory_size(faces):
    fam = build(prior="flat")
    memory = as_float(faces[:7])
    assert fam.net.prior_query is None
    assert torch.equal(fam.prior_probs(memory), torch.full((7,), 1.0 / 7))
    _, log_p = fam.address_log_probs(memory, as_float(faces[7:9]))
    assert torch.allclose(log_p, torch.full((1, 7), -math.log(7)))


# ---------------------------------------------------------------------------- the estimator
def _enumerable_problem(faces):
    """|M| = 4, K = 5, two targets, z's noise eps fixed: log w_k = T[b, k, a_k] + log p(a_k) -
    log q(a_k|x_b), where T (the continuous part) does not depend on the addressing parameters.
    With eps fixed, E over the addresses is a finite sum over 4^5 configurations."""
    fam = build(embed_dim=8, samples=5)
    with torch.no_grad():  # a non-uniform q(a|x) and p(a), pixel scale 1: log w spreads over a few nats
        fam.net.log_sigma.fill_(0.0)
        for p in fam.net.embed_memory.parameters():
            p.mul_(2.0)
        for p in fam.net.embed_query.parameters():
            p.mul_(2.0)
        fam.net.prior_query.mul_(3.0)
    M, B, K, zd = 4, 2, 5, fam.cfg["z_dim"]
    memory, x = as_float(faces[:M]), as_float(faces[M:M + B])
    eps = torch.randn(B, K, zd, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = lambda t: t.expand(B, K, M, *t.shape[3:]).reshape(-1, *t.shape[3:])  # noqa: E731
        log_px, log_pz, log_qz = fam.net.continuous_terms(rows(x[:, None, None]), rows(memory[None, None]),
                                                          rows(eps[:, :, None]))
    T = (log_px + log_pz - log_qz).view(B, K, M).double()
    s_q, s_p = fam.net.address_scores(memory, x)
    return fam, T, s_q.double(), s_p.double()


def _exact_gradient(fam, T, s_q, s_p) -> torch.Tensor:
    B, K, M = T.shape
    configs = torch.tensor(list(itertools.product(range(M), repeat=K)))  # (M^K, K)
    log_q, log_p = torch.log_softmax(s_q, 1), torch.log_softmax(s_p, 0)
    log_w = T[:, torch.arange(K), configs] + log_p[configs] - log_q[:, configs]  # (B, M^K, K)
    expected = (log_q[:, configs].sum(2).exp() * log_mean_exp(log_w, 2)).sum()
    grads = torch.autograd.grad(expected, fam.net.addressing_parameters(), retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _estimates(T, s_q, s_p, n: int, surrogate, seed: int = 1) -> torch.Tensor:
    """n independent estimates, each as its gradient w.r.t. the scores (n, B*M + M)."""
    B, K, M = T.shape
    sq = s_q.detach().expand(n, B, M).clone().requires_grad_(True)
    sp = s_p.detach().expand(n, M).clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(sq, 2), torch.log_softmax(sp, 1)
    a = torch.multinomial(log_q.detach().exp().reshape(-1, M), K, replacement=True,
                          generator=torch.Generator().manual_seed(seed)).view(n, B, K)
    log_q_a = log_q.gather(2, a)
    log_w = T[None].expand(n, B, K, M).gather(3, a[..., None])[..., 0] + log_p[:, None].expand(n, B, M).gather(2, a) - log_q_a
    _, sur = surrogate(log_w.reshape(n * B, K), log_q_a.reshape(n * B, K))
    g_q, g_p = torch.autograd.grad(sur.sum(), [sq, sp])
    return torch.cat([g_q.reshape(n, -1), g_p], 1)


def _scores_jacobian(fam, s_q, s_p) -> torch.Tensor:
    """d scores / d addressing parameters: an estimate's parameter gradient is (its score gradient) @ J,
    because the addressing parameters reach log w only through the scores."""
    params = fam.net.addressing_parameters()
    rows = []
    for s in torch.cat([s_q.reshape(-1), s_p]):
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, params, retain_graph=True)]))
    return torch.stack(rows).double()


N_ESTIMATES = 100_000


def _mean_and_spread(G: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean parameter gradient of the estimates, and their total variance tr Cov(G J)."""
    return G.mean(0) @ J, float((J @ J.t() * torch.cov(G.t())).sum())


@pytest.mark.parametrize("baseline", ["geometric", "arithmetic"])
def test_vimco_mean_gradient_matches_the_exact_gradient_enumerated_over_addresses(faces, baseline):
    """Tolerance: the mean of 100k VIMCO estimates lies within 4 standard errors (the norm of the
    mean's error has expectation ~1 SE for an unbiased estimator) and within 2 % of the exact
    gradient; a biased estimator (no learning signal for the addresses) is > 4 SE off."""
    fam, T, s_q, s_p = _enumerable_problem(faces)
    exact, J = _exact_gradient(fam, T, s_q, s_p), _scores_jacobian(fam, s_q, s_p)
    mean, var = _mean_and_spread(_estimates(T, s_q, s_p, N_ESTIMATES, lambda w, q: vimco_surrogate(w, q, baseline)), J)
    se = math.sqrt(var / N_ESTIMATES)
    err = float((mean - exact).norm())
    assert err <= 4 * se and err <= 0.02 * float(exact.norm()), (err, se, float(exact.norm()))
    biased, _ = _mean_and_spread(_estimates(T, s_q, s_p, N_ESTIMATES, lambda w, q: (log_mean_exp(w),) * 2), J)
    assert float((biased - exact).norm()) > 4 * se


def test_vimco_has_lower_variance_than_the_plain_score_function_estimator(faces):
    fam, T, s_q, s_p = _enumerable_problem(faces)
    J = _scores_jacobian(fam, s_q, s_p)
    _, var_vimco = _mean_and_spread(_estimates(T, s_q, s_p, 20_000, vimco_surrogate), J)
    _, var_plain = _mean_and_spread(_estimates(T, s_q, s_p, 20_000, score_function_surrogate), J)
    assert var_vimco < 0.01 * var_plain, (var_vimco, var_plain)


def test_multi_sample_bound_is_non_decreasing_in_k(faces):
    """For a fixed model, E[L_K] grows with K: averaged over 50 repeats on 4 images, each step of
    K = 1, 2, 4, 8 gains at least -3 standard errors, and L_8 is above L_1 by more than 3."""
    fam = build(memory={"size": 8})
    train(fam, faces, 0, 10)
    x, memory = as_float(faces[:4]), as_float(faces[20:28])
    with torch.no_grad():
        log_w, _, _ = fam.log_weights(x.repeat(50, 1, 1, 1), memory, 8, torch.Generator().manual_seed(0))
    bounds = {k: log_mean_exp(log_w[:, :k].double()) for k in (1, 2, 4, 8)}  # nested samples: paired
    for lo, hi in [(1, 2), (2, 4), (4, 8)]:
        d = bounds[hi] - bounds[lo]
        assert float(d.mean()) > -3 * float(d.std()) / math.sqrt(len(d)), (lo, hi, float(d.mean()))
    d = bounds[8] - bounds[1]
    assert float(d.mean()) > 3 * float(d.std()) / math.sqrt(len(d))


# ---------------------------------------------------------------------------- data memory
def test_data_memory_never_holds_an_image_of_the_minibatch(faces):
    fam = build(memory={"source": "data", "size": 16, "pool_size": 100})
    sizes = []
    for step in range(30):
        torch.manual_seed(step_seed(0, step, 0))
        batch = sample_batch(faces, 8, 0, step, True)
        fam.train_step(batch, step)
        mem, targets = to_uint8(fam.last_memory), to_uint8(fam.last_targets)
        assert set(image_keys(mem)).isdisjoint(image_keys(targets))  # keys: equal up to mirroring
        for m in mem:  # and pixel by pixel, mirror images included
            assert not any(torch.equal(m, t) or torch.equal(m, t.flip(-1)) for t in targets)
        if step > 0:  # from the pool: no image of the whole minibatch
            assert set(image_keys(mem)).isdisjoint(image_keys(to_uint8(batch))) and len(targets) == 8
        sizes.append(len(mem))
    assert sizes[0] == 4 and sizes[-1] == 16  # the first batch is split 4 + 4; then a full draw from the pool
    assert len(fam.pool) == len(set(image_keys(fam.pool))) == 100  # every face once, mirrors deduplicated


def test_the_pool_keeps_at_most_pool_size_images_first_in_first_out(faces):
    fam = build(memory={"source": "data", "size": 2, "pool_size": 10})
    fam._remember(faces[:8])
    fam._remember(torch.cat([faces[:2].flip(-1), faces[8:12]]))  # mirrors of known images are not new
    assert len(fam.pool) == 10 and fam.pool_next == 2
    assert torch.equal(fam.pool[:2], faces[10:12]) and torch.equal(fam.pool[2:], faces[2:10])


def test_sampling_draws_the_data_memory_from_the_seed(faces):
    fam = build(memory={"source": "data", "size": 4, "pool_size": 100})
    train(fam, faces, 0, 5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    m1, keys1 = fam.memory_for(g1)
    m2, keys2 = fam.memory_for(g2)
    assert torch.equal(m1, m2) and keys1 == keys2 and len(keys1) == 4
    assert keys1 != fam.memory_for(torch.Generator().manual_seed(4))[1]
    x, entries = fam.sample_with_addresses(8, seed=3, rows=4)
    assert x.shape == (8, 3, SIZE, SIZE) and float(x.abs().max()) <= 1.0
    assert torch.equal(entries[0], entries[3])  # 4 samples from one address per row
    assert set(image_keys(to_uint8(entries))) <= set(fam.pool_keys.tolist())  # entries are training images


# ---------------------------------------------------------------------------- other sources and K
def test_learned_memory_is_trained_and_resumes_bit_identically(faces):
    straight = build(memory={"source": "learned", "size": 6})
    start = straight.net.memory.detach().clone()
    train(straight, faces, 0, 20)
    assert not torch.equal(start, straight.net.memory)
    first = build(memory={"source": "learned", "size": 6})
    train(first, faces, 0, 10)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = build(seed=5, memory={"source": "learned", "size": 6})
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    train(resumed, faces, 10, 20)
    assert torch.equal(straight.net.memory, resumed.net.memory)
    assert torch.equal(straight.sample(4, seed=1), resumed.sample(4, seed=1))


def test_one_sample_trains_the_addressing_with_a_running_mean_baseline(faces):
    fam = build(samples=1)
    before = [p.detach().clone() for p in fam.net.addressing_parameters()]
    losses = train(fam, faces, 0, 6)
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert fam.baseline_set and math.isfinite(float(fam.baseline))
    assert all(not torch.equal(b, p) for b, p in zip(before, fam.net.addressing_parameters()))
    assert fam.state_dict()["baseline"] == fam.baseline


@pytest.mark.parametrize("key,value", [("memory.source", "disk"), ("similarity", "l2"), ("prior", "uniform"),
                                       ("vimco_baseline", "mean"), ("sample_mode", "mode")])
def test_an_unknown_choice_is_rejected_naming_its_key(key, value):
    cfg = cfg_of()
    node, *path = cfg, *key.split(".")
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(SweeperError, match=rf"^model\.{key}: '{value}': use "):
        get_family("vma_vae").validate(cfg, SIZE)


def test_a_memory_larger_than_its_pool_is_rejected():
    with pytest.raises(SweeperError, match=r"^model\.memory\.size: 32 is more than memory\.pool_size 16"):
        get_family("vma_vae").validate(cfg_of(memory={"size": 32, "pool_size": 16}), SIZE)


def _ddp_rank(rank: int, port: int, faces: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fam = build(seed=rank, samples=1, memory={"source": "data", "size": 4, "pool_size": 100})
    fam.sync_from_rank0()
    for step in range(6):
        torch.manual_seed(step_seed(0, step, rank))  # each rank its own draws, as the trainer seeds them
        fam.train_step(sample_batch(faces, 8, 0, step, True, rank, 2), step)
    torch.save(fam.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_pools_weights_and_baseline(faces, tmp_path, closed_port):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(closed_port, faces, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(a["pool"]) > 8 and torch.equal(a["pool"], b["pool"]) and torch.equal(a["pool_keys"], b["pool_keys"])
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert a["baseline_set"] and torch.equal(a["baseline"], b["baseline"])


# ---------------------------------------------------------------------------- metrics and pictures
def test_evaluation_reports_the_bound_address_kl_and_memory_use_with_pictures(faces, tmp_path):
    from sweeper.evaluation import Evaluator

    fam = build(memory={"source": "data", "size": 8, "pool_size": 100})
    train(fam, faces, 0, 15)
    ev = Evaluator({"n_gen": 16, "batch_size": 8, "features": "randcnn", "grid_size": 8}, faces,
                   storage=str(tmp_path / "store"), out_dir=str(tmp_path / "eval"))
    metrics, artifacts = ev.evaluate(fam, step=15)
    assert {"nll_k4", "address_kl", "address_entropy", "z_kl", "memory_used", "memory_used_frac"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["address_entropy"] <= math.log(8) + 1e-5 and metrics["address_kl"] >= -1e-6
    assert 1 <= metrics["memory_used"] <= 8 and metrics["memory_used_frac"] == metrics["memory_used"] / 8
    names = {Path(a).name for a in artifacts}
    assert {"memory_samples_0000015.png", "address_lookups_0000015.png"} <= names
    again, _ = ev.evaluate(fam, step=15)
    assert again == metrics  # seeded: the same memory draw, addresses and noise every evaluation


def test_evaluation_hides_each_image_from_a_memory_that_holds_it(faces):
    fam = build(memory={"source": "data", "size": 100, "pool_size": 100})
    train(fam, faces, 0, 20)
    assert len(fam.pool) == 100
    report = fam.memory_report(faces[:10], seed=0)
    memory, keys = fam.memory_for(torch.Generator().manual_seed(0))
    assert len(keys) == 100  # M holds every face, so each target's own face is in it ...
    x = as_float(faces[:10])
    from models.vma_vae import _own_image_mask

    mask = _own_image_mask(image_keys(faces[:10]), keys, "cpu")
    assert mask.sum(1).tolist() == [1] * 10  # ... and exactly that entry is hidden from it
    log_q, _ = fam.address_log_probs(memory, x, mask)
    assert torch.all(log_q[mask] == -math.inf) and torch.all(log_q[~mask] > -math.inf)
    assert all(math.isfinite(v) for v in report.values())


# ---------------------------------------------------------------------------- the CPU space end to end
def test_cpu_space_sweeps_prunes_ranks_and_retrains_the_best(tmp_path):
    import optuna
    import yaml

    from sweeper.sweep import bind_loopback

    bind_loopback()  # before anything imports ray
    from sweeper.cli import main
    from sweeper.config import load_config
    from sweeper.search import open_storage
    from sweeper.sweep import run_sweep

    # The shipped space ranks by Inception FID (~10 s per 32 samples on a CPU core); the test runs
    # its machinery on the cheap randcnn features, the same space otherwise.
    raw = yaml.safe_load((ROOT / "search_spaces/vma_vae_cpu.yaml").read_text())
    raw["storage"] = str(tmp_path / "sweeps")
    raw["eval"]["features"], raw["sweep"]["objective"] = "randcnn", {"metric": "fd_randcnn", "mode": "min"}
    spec = tmp_path / "space.yaml"
    spec.write_text(yaml.safe_dump(raw))
    summary = run_sweep(str(spec), num_cpus=2)
    name = raw["name"]
    study = optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "sweeps" / name / "optuna.journal")))
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1, states
    assert summary["completed"] >= 1 and summary["completed"] + summary["pruned"] == len(study.trials)

    assert main(["best", "--space", str(spec), "--out", str(tmp_path / "best")]) == 0
    best = load_config(tmp_path / "best/1.yaml")
    assert best["model"]["family"] == "vma_vae"
    out = tmp_path / "retrain"
    assert main(["train", str(tmp_path / "best/1.yaml"), "--steps", "10", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoints" / "step_00000010.pt", map_location="cpu", weights_only=False)
    last = state["history"][-1]
    assert last["step"] == 10 and math.isfinite(last["fd_randcnn"]) and math.isfinite(last["address_kl"])

"""Specification tests of the MoCA layer (models/moca.py) against shared/MOCA.md.

The oracle is the literal, per-position reference in ``tests/moca_reference.py`` (float64 Python
loops); the layer is compared with it on small shapes, and on properties where exact values are
not pinned down by the spec (k-means).
"""

from __future__ import annotations

import math

import pytest
import torch

from models.moca import MoCA

try:  # tests/ may or may not become a package
    from . import moca_reference as ref
except ImportError:  # pragma: no cover - depends on how pytest imports this file
    import moca_reference as ref

# float32 layer against the float64 reference
ATOL, RTOL = 2e-5, 1e-4
# smallest nearest/second-nearest distance gap the test data may have: below it, float32 and float64
# may legitimately pick different clusters, and the test would test nothing
MIN_GAP = 1e-4


def make(c=4, dim=8, M=3, T=4, momentum=0.6, W=0, memory=True, lam=1.0, seed=0, kmeans_iters=10, torch_seed=None):
    torch.manual_seed(seed if torch_seed is None else torch_seed)
    layer = MoCA(
        channels=c,
        dim=dim,
        clusters=M,
        memory_size=T,
        momentum=momentum,
        warmup_steps=W,
        memory=memory,
        write_rate=lam,
        kmeans_iters=kmeans_iters,
        seed=seed,
    )
    cfg = ref.Config(clusters=M, memory_size=T, dim=dim, momentum=momentum, warmup_steps=W, memory=memory, write_rate=lam)
    return layer, cfg


def inputs(n, c, h, w, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + seed)
    return (scale * torch.randn(n, c, h, w, generator=g)).to(dtype)


def set_gamma(layer, value):
    with torch.no_grad():
        layer.gamma.fill_(value)


def nudge_phi(layer, seed, scale=0.3):
    """What an optimiser step does to phi: phi moves, phi_k does not."""
    g = torch.Generator().manual_seed(5000 + seed)
    with torch.no_grad():
        layer.phi.weight.add_(scale * torch.randn(layer.phi.weight.shape, generator=g).to(layer.phi.weight.dtype))


def close(actual, expected, atol=ATOL, rtol=RTOL, msg=""):
    torch.testing.assert_close(actual.detach().to(torch.float64), expected.detach().to(torch.float64), atol=atol, rtol=rtol, msg=msg or None)


def w2(conv):
    return conv.weight.detach().reshape(conv.weight.shape[0], conv.weight.shape[1])


def snapshot(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"state_dict entry {k!r} differs"


def check_write(layer, cfg, A, step_note=""):
    """One training forward of the layer against reference forward + reference write."""
    st = ref.state_from_layer(layer)
    expected_y = ref.forward(st, cfg, A)
    wr = ref.train_step_write(st, cfg, A)
    if cfg.memory and wr.key_assign:
        assert wr.min_gap > MIN_GAP, f"near tie in the key assignment {step_note}: pick other test data"
    layer.train()
    y = layer(A)
    close(y, expected_y.y, msg=f"output {step_note}")
    ns = wr.state
    close(layer.memory, ns.memory, msg=f"memory P {step_note}")
    close(layer.centres, ns.centres, msg=f"centres K {step_note}")
    close(w2(layer.phi_k), ns.phi_k, msg=f"phi_k {step_note}")
    assert torch.equal(layer.rng_state, ns.rng_state), f"generator state after the write {step_note}"
    assert int(layer.forwards) == ns.forwards, step_note
    return wr


# ---------------------------------------------------------------------------------------------
# forward


FORWARD_CASES = {
    # N = 32 rows, about 11 keys per cluster > T = 4
    "M3_T4_fewer_slots_than_keys": dict(n=2, c=4, dim=8, h=4, w=4, M=3, T=4),
    # N = 30 rows, h != w (catches a transposed row order), about 15 keys per cluster < T = 24
    "M2_T24_more_slots_than_keys": dict(n=2, c=4, dim=8, h=3, w=5, M=2, T=24),
    "M1_one_pool": dict(n=1, c=3, dim=6, h=4, w=3, M=1, T=6),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES), ids=list(FORWARD_CASES))
def test_batched_forward_matches_literal_reference(case):
    p = FORWARD_CASES[case]
    layer, cfg = make(c=p["c"], dim=p["dim"], M=p["M"], T=p["T"])
    set_gamma(layer, 0.7)
    # fill the memory with a few training writes first
    for step in range(3):
        nudge_phi(layer, step)
        layer(inputs(p["n"], p["c"], p["h"], p["w"], seed=step))
    A = inputs(p["n"], p["c"], p["h"], p["w"], seed=99)
    st = ref.state_from_layer(layer)
    expected = ref.forward(st, cfg, A)
    assert expected.min_gap > MIN_GAP, "near tie in the test data: pick another seed"
    assert expected.h_m.abs().max() > 1e-3, "the memory path contributes nothing: the test would be vacuous"
    assert not torch.allclose(expected.y, A.double()), "output is the identity: the test would be vacuous"

    layer.eval()
    y_eval = layer(A)
    close(y_eval, expected.y, msg="eval-mode output")
    assert torch.equal(layer.last_assign, expected.assign), "cluster choice (eval)"
    assert layer.last_assign.shape == (p["n"], p["h"], p["w"]) and layer.last_assign.dtype == torch.long

    layer.train()
    y_train = layer(A)  # computed before this forward's write
    close(y_train, expected.y, msg="train-mode output")
    assert torch.equal(layer.last_assign, expected.assign), "cluster choice (train)"
    assert y_train.shape == A.shape and y_train.dtype == A.dtype


# ---------------------------------------------------------------------------------------------
# memory write


WRITE_CASES = {
    "M3_T4_replace": dict(n=2, c=4, dim=8, h=4, w=4, M=3, T=4, lam=1.0, momentum=0.6),
    "M3_T4_blend_half": dict(n=2, c=4, dim=8, h=4, w=4, M=3, T=4, lam=0.5, momentum=0.6),
    "M2_T24_more_slots_than_keys": dict(n=2, c=4, dim=8, h=3, w=5, M=2, T=24, lam=1.0, momentum=0.8),
    "M4_T3_batch3_non_square": dict(n=3, c=3, dim=5, h=2, w=3, M=4, T=3, lam=1.0, momentum=0.0),
}


@pytest.mark.parametrize("case", list(WRITE_CASES), ids=list(WRITE_CASES))
def test_memory_write_matches_literal_reference(case):
    p = WRITE_CASES[case]
    layer, cfg = make(c=p["c"], dim=p["dim"], M=p["M"], T=p["T"], lam=p["lam"], momentum=p["momentum"])
    set_gamma(layer, 0.5)
    before = snapshot(layer)
    for step in range(4):
        nudge_phi(layer, step)
        A = inputs(p["n"], p["c"], p["h"], p["w"], seed=10 + step)
        check_write(layer, cfg, A, step_note=f"(step {step})")
    assert not torch.equal(layer.memory, before["memory"])
    assert not torch.equal(layer.rng_state, before["rng_state"])
    assert int(layer.forwards) == 4


def test_warmup_write_matches_literal_reference():
    # N = 32 keys > M*T = 8 slots (keep the first M*T by r), then N = 12 < M*T = 24
    for n, h, w, M, T in [(2, 4, 4, 2, 4), (1, 3, 4, 3, 8)]:
        layer, cfg = make(c=4, dim=6, M=M, T=T, W=3, lam=1.0, momentum=0.6)
        set_gamma(layer, 0.8)
        for step in range(3):
            nudge_phi(layer, step)
            A = inputs(n, 4, h, w, seed=20 + step)
            st = ref.state_from_layer(layer)
            # during warm-up the output is the self-attention path only
            sa_only = ref.forward(st, cfg, A, use_memory=False)
            with_mem = ref.forward(st, cfg, A, use_memory=True)
            assert not torch.allclose(sa_only.y, with_mem.y, atol=1e-3), "vacuous: memory read changes nothing"
            wr = check_write(layer, cfg, A, step_note=f"(warm-up step {step}, n={n}, M={M}, T={T})")
            assert wr.key_assign == []  # warm-up write: one pool regardless of cluster
        assert int(layer.forwards) == 3
    # with lam = 0.5 as well
    layer, cfg = make(c=4, dim=6, M=2, T=4, W=2, lam=0.5)
    for step in range(2):
        nudge_phi(layer, step)
        check_write(layer, cfg, inputs(2, 4, 3, 3, seed=30 + step), step_note=f"(warm-up lam=0.5 step {step})")


def _two_blob_memory(T, dim, n_a, n_b, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(dim, generator=g)
    e = e / e.norm()
    a = 5.0 * e + 0.1 * torch.randn(n_a, dim, generator=g)
    b = -5.0 * e + 0.1 * torch.randn(n_b, dim, generator=g)
    vecs = torch.cat([a, b])
    label = torch.tensor([0] * n_a + [1] * n_b)
    perm = torch.randperm(n_a + n_b, generator=g)
    vecs, label = vecs[perm], label[perm]
    return vecs.reshape(2, T, dim), label.reshape(2, T)


def _index_in(v, bank, atol=1e-6):
    """Index of a row of ``bank`` equal to v (within atol), or -1."""
    d = (bank - v).abs().max(dim=1).values
    j = int(torch.argmin(d))
    return j if float(d[j]) <= atol else -1


def test_kmeans_after_warmup_properties():
    """Forward W (training) clusters the memory by k-means before computing its output.

    write_rate = 0 makes the writes no-ops, so the memory after forward W is exactly what k-means
    left. The memory handed to k-means is two well separated blobs of unequal size (10 and 6 of
    16 vectors, T = 8), so the clustering is unambiguous: one block takes a subset of the big blob,
    the other the small blob's members (resampled up to T).
    """
    T, dim, W = 8, 4, 2
    layer, cfg = make(c=4, dim=dim, M=2, T=T, W=W, lam=0.0)
    set_gamma(layer, 0.6)
    for step in range(W):
        layer(inputs(1, 4, 3, 3, seed=40 + step))
    assert int(layer.forwards) == W
    blobs, label = _two_blob_memory(T, dim, n_a=10, n_b=6, seed=3)
    with torch.no_grad():
        layer.memory.copy_(blobs)
        layer.centres.copy_(blobs.mean(1))
    pre = blobs.reshape(-1, dim).clone()
    pre_label = label.reshape(-1)

    A = inputs(2, 4, 3, 3, seed=50)
    sa_only = ref.forward(ref.state_from_layer(layer), cfg, A, use_memory=False)
    y = layer(A)
    assert int(layer.forwards) == W + 1

    P, K = layer.memory.detach(), layer.centres.detach()
    # K is the block means
    close(K, P.mean(1), atol=1e-6, rtol=1e-6, msg="K == P.mean(1)")
    # every memory vector came from the pre-k-means memory, and each block is one blob
    blob_of_block = []
    for i in range(2):
        idx = [_index_in(P[i, t], pre) for t in range(T)]
        assert all(j >= 0 for j in idx), f"block {i} holds a vector that was not in the memory before k-means"
        labels = {int(pre_label[j]) for j in idx}
        assert len(labels) == 1, f"block {i} mixes the two blobs: k-means did not separate them"
        blob_of_block.append(labels.pop())
        if blob_of_block[-1] == 0:  # the big blob (10 members > T): a subset, no repeats
            assert len(set(idx)) == T, "a cluster with more than T members keeps T distinct members"
    assert sorted(blob_of_block) == [0, 1], "both blobs must own a block"
    # the output of forward W reads this memory (the writes were no-ops)
    expected = ref.forward(ref.state_from_layer(layer), cfg, A, use_memory=True)
    assert expected.min_gap > MIN_GAP
    close(y, expected.y, msg="forward W output reads the k-means memory")
    assert not torch.allclose(y.double(), sa_only.y, atol=1e-3), "forward W must include the memory read"
    assert torch.equal(layer.last_assign, expected.assign)


def test_kmeans_forward_with_replacement_writes_only_keys_over_kmeans_memory():
    """With lam = 1, forward W = k-means + read + normal write. A twin loaded from the same
    state with write_rate = 0 runs the same k-means; the two memories then differ only at slots
    that received one of forward W's keys, and both outputs are the same."""
    T, dim, W, M = 8, 4, 3, 3
    layer, cfg = make(c=4, dim=dim, M=M, T=T, W=W, lam=1.0)
    set_gamma(layer, 0.6)
    for step in range(W):
        nudge_phi(layer, step)
        layer(inputs(2, 4, 3, 3, seed=60 + step))
    twin, _ = make(c=4, dim=dim, M=M, T=T, W=W, lam=0.0, seed=0)
    twin.load_state_dict(layer.state_dict())
    pre = layer.memory.detach().reshape(-1, dim).clone()
    A = inputs(1, 4, 2, 3, seed=70)  # N = 6 keys
    keys = ref.keys_of(ref.state_from_layer(layer), A).float()
    y = layer(A)
    y_twin = twin(A)
    assert torch.equal(y, y_twin), "the write rate must not change k-means or the read"
    P_twin = twin.memory.detach()
    close(twin.centres, P_twin.mean(1), atol=1e-6, rtol=1e-6)
    for v in P_twin.reshape(-1, dim):
        assert _index_in(v, pre) >= 0, "k-means refilled a block with a vector not in the memory"
    P = layer.memory.detach()
    changed = 0
    for i in range(M):
        for t in range(T):
            if not torch.equal(P[i, t], P_twin[i, t]):
                changed += 1
                assert _index_in(P[i, t], keys, atol=1e-5) >= 0, "a changed slot must hold a key of forward W"
    assert 0 < changed <= keys.shape[0]
    close(layer.centres, P.mean(1), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# simple invariants


def test_gamma_zero_makes_layer_identity():
    layer, _ = make(c=4, dim=8, M=3, T=4)
    assert layer.gamma.detach().item() == 0.0 and layer.gamma.shape == (1,)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        A = inputs(2, 4, 4, 4, seed=1)
        assert torch.equal(layer(A), A), mode


def test_eval_mode_leaves_every_buffer_unchanged():
    for W, steps in [(0, 2), (3, 1)]:  # after warm-up, and in the middle of it
        layer, _ = make(c=4, dim=8, M=3, T=4, W=W)
        set_gamma(layer, 0.9)
        for step in range(steps):
            nudge_phi(layer, step)
            layer(inputs(2, 4, 3, 3, seed=step))
        nudge_phi(layer, 77)  # phi != phi_k, so a momentum update would show
        layer.eval()
        before = snapshot(layer)
        A = inputs(2, 4, 3, 3, seed=80)
        y1 = layer(A)
        y2 = layer(A)
        assert torch.equal(y1, y2), "two evaluations of the same checkpoint must agree"
        assert_same_state(before, snapshot(layer))
        assert int(layer.forwards) == steps


def test_momentum_zero_copies_phi_after_one_step():
    layer, _ = make(c=4, dim=8, M=3, T=4, momentum=0.0)
    assert torch.equal(layer.phi_k.weight, layer.phi.weight), "phi_k starts equal to phi"
    nudge_phi(layer, 1)
    assert not torch.equal(layer.phi_k.weight, layer.phi.weight)
    layer(inputs(2, 4, 3, 3, seed=1))
    assert torch.equal(layer.phi_k.weight, layer.phi.weight)


def test_momentum_update_is_exact():
    layer, _ = make(c=4, dim=8, M=3, T=4, momentum=0.6)
    nudge_phi(layer, 2)
    old_k = layer.phi_k.weight.detach().clone()
    phi = layer.phi.weight.detach().clone()
    layer(inputs(2, 4, 3, 3, seed=2))
    torch.testing.assert_close(layer.phi_k.weight.detach(), 0.6 * old_k + 0.4 * phi, atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.phi.weight.detach(), phi), "the forward must not touch phi"
    assert not layer.phi_k.weight.requires_grad


def test_gradients_reach_theta_phi_psi_out_gamma_and_never_memory():
    layer, _ = make(c=4, dim=8, M=3, T=4)
    names = {n for n, _ in layer.named_parameters()}
    assert "memory" not in names and "centres" not in names
    assert not layer.memory.requires_grad and not layer.centres.requires_grad
    assert not layer.phi_k.weight.requires_grad
    for step in range(2):  # memory filled
        layer(inputs(2, 4, 3, 3, seed=step))
    R = inputs(2, 4, 3, 3, seed=90)

    # gamma == 0: the output is the identity, yet gamma receives a gradient
    A = inputs(2, 4, 3, 3, seed=91).requires_grad_(True)
    (layer(A) * R).sum().backward()
    assert layer.gamma.grad is not None and float(layer.gamma.grad.abs().sum()) > 0

    layer.zero_grad(set_to_none=True)
    set_gamma(layer, 0.5)
    A = inputs(2, 4, 3, 3, seed=92).requires_grad_(True)
    y = layer(A)
    assert not layer.memory.requires_grad and layer.memory.grad_fn is None, "the write built an autograd graph"
    assert not layer.centres.requires_grad and layer.centres.grad_fn is None
    (y * R).sum().backward()
    for mod in ("theta", "phi", "psi", "out"):
        g = getattr(layer, mod).weight.grad
        assert g is not None and float(g.abs().sum()) > 0, f"{mod} gets no gradient"
    assert float(layer.gamma.grad.abs().sum()) > 0
    assert layer.phi_k.weight.grad is None
    assert layer.memory.grad is None and layer.centres.grad is None
    assert A.grad is not None and float(A.grad.abs().sum()) > 0


def test_state_dict_round_trip_reproduces_outputs_bit_for_bit():
    # resume in the middle of warm-up, so k-means (forward W) also happens after the resume
    layer, _ = make(c=4, dim=6, M=3, T=4, W=2, seed=0)
    set_gamma(layer, 0.7)
    nudge_phi(layer, 0)
    layer(inputs(2, 4, 3, 3, seed=0))
    sd = layer.state_dict()
    for key in ("memory", "centres", "rng_state", "forwards", "phi_k.weight", "gamma"):
        assert key in sd, f"{key} missing from state_dict"
    fresh, _ = make(c=4, dim=6, M=3, T=4, W=2, seed=123)  # different init everywhere
    assert not torch.equal(fresh.theta.weight, layer.theta.weight)
    fresh.load_state_dict(sd)
    assert_same_state(snapshot(layer), snapshot(fresh))
    for step in range(1, 6):
        nudge_phi(layer, step)
        nudge_phi(fresh, step)
        A = inputs(2, 4, 3, 3, seed=step)
        y1, y2 = layer(A), fresh(A)
        assert torch.equal(y1, y2), f"output differs after resume (step {step})"
        assert torch.equal(layer.last_assign, fresh.last_assign)
        assert_same_state(snapshot(layer), snapshot(fresh))
    assert int(fresh.forwards) == 6


def test_one_cluster_works():
    layer, cfg = make(c=4, dim=6, M=1, T=5)
    set_gamma(layer, 0.8)
    for step in range(3):
        nudge_phi(layer, step)
        A = inputs(2, 4, 3, 3, seed=step)
        wr = check_write(layer, cfg, A, step_note=f"(M=1 step {step})")
        assert set(wr.key_assign) == {0}
        assert torch.equal(layer.last_assign, torch.zeros(2, 3, 3, dtype=torch.long))
    assert layer.memory.shape == (1, 5, 6) and layer.centres.shape == (1, 6)
    close(layer.centres, layer.memory.mean(1), atol=1e-6, rtol=1e-6)


def test_memory_off_is_self_attention_only():
    layer, cfg = make(c=4, dim=6, M=3, T=4, memory=False)
    set_gamma(layer, 0.8)
    before = snapshot(layer)
    for step in range(3):
        nudge_phi(layer, step)
        A = inputs(2, 4, 3, 4, seed=step)
        expected = ref.forward(ref.state_from_layer(layer), cfg, A, use_memory=False)
        close(layer(A), expected.y, msg=f"memory=False output (train, step {step})")
    layer.eval()
    A = inputs(2, 4, 3, 4, seed=9)
    expected = ref.forward(ref.state_from_layer(layer), cfg, A, use_memory=False)
    close(layer(A), expected.y, msg="memory=False output (eval)")
    after = snapshot(layer)
    for key in ("memory", "centres"):
        if key in before:
            assert torch.equal(before[key], after[key]), f"memory=False wrote {key}"


def test_deterministic_for_a_seed_on_cpu():
    runs = []
    for _ in range(2):
        layer, _ = make(c=4, dim=6, M=3, T=4, W=2, seed=5)  # passes through k-means at forward 2
        set_gamma(layer, 0.7)
        outs = []
        for step in range(5):
            nudge_phi(layer, step)
            outs.append(layer(inputs(2, 4, 3, 3, seed=step)))
        runs.append((outs, snapshot(layer), layer.last_assign.clone()))
    (o1, s1, a1), (o2, s2, a2) = runs
    for step, (x, y) in enumerate(zip(o1, o2)):
        assert torch.equal(x, y), f"step {step}"
    assert_same_state(s1, s2)
    assert torch.equal(a1, a2)


def test_memory_initialisation_comes_from_the_layer_seed():
    a, _ = make(c=4, dim=6, M=3, T=4, seed=1, torch_seed=0)
    b, _ = make(c=4, dim=6, M=3, T=4, seed=2, torch_seed=0)
    c, _ = make(c=4, dim=6, M=3, T=4, seed=1, torch_seed=42)
    assert not torch.equal(a.memory, b.memory), "the layer seed must seed the memory"
    assert torch.equal(a.memory, c.memory), "the memory initialisation must not depend on the global RNG"
    assert torch.equal(a.rng_state, c.rng_state)
    close(a.centres, a.memory.mean(1), atol=1e-6, rtol=1e-6)


def test_no_hw_by_hw_tensor_is_kept():
    n, c, h, w = 2, 8, 16, 16
    hw = h * w
    layer, _ = make(c=c, dim=8, M=4, T=8)
    set_gamma(layer, 0.5)
    layer.train()
    A = inputs(n, c, h, w, seed=3).requires_grad_(True)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(A)
    y.sum().backward()  # the graph is usable
    assert saved, "nothing was saved for backward: the hook saw no graph"
    too_big = [s for s in saved if math.prod(s) / n >= hw * hw]
    assert not too_big, f"tensors of (hw x hw) size per image saved for backward: {too_big}; all saved: {saved}"


def test_layer_has_no_hard_coded_device_or_dtype():
    layer, cfg = make(c=4, dim=6, M=3, T=4)
    set_gamma(layer, 0.6)
    layer.double()
    assert layer.memory.dtype == torch.float64 and layer.centres.dtype == torch.float64
    assert layer.phi_k.weight.dtype == torch.float64 and layer.gamma.dtype == torch.float64
    assert layer.rng_state.dtype == torch.uint8 and layer.forwards.dtype == torch.long
    for step in range(2):
        nudge_phi(layer, step)
        A = inputs(2, 4, 3, 3, seed=step, dtype=torch.float64)
        st = ref.state_from_layer(layer)
        exp_y = ref.forward(st, cfg, A)
        wr = ref.train_step_write(st, cfg, A)
        y = layer(A)
        assert y.dtype == torch.float64
        close(y, exp_y.y, atol=1e-10, rtol=1e-10, msg="float64 output")
        close(layer.memory, wr.state.memory, atol=1e-10, rtol=1e-10, msg="float64 write")
        close(layer.centres, wr.state.centres, atol=1e-10, rtol=1e-10)
        assert torch.equal(layer.rng_state, wr.state.rng_state)
    layer.eval()
    A = inputs(2, 4, 3, 3, seed=7, dtype=torch.float64)
    y_before = layer(A)
    moved = layer.to("cpu").to(torch.device("cpu"))
    assert moved is layer
    assert torch.equal(layer(A), y_before)
    layer.float()
    assert layer.memory.dtype == torch.float32
    assert layer(A.float()).dtype == torch.float32


def test_float64_layer_keeps_float64_values_through_kmeans():
    """k-means refills blocks with members of the memory: in a float64 layer they are the
    float64 vectors themselves, not float32 roundings of them."""
    layer, _ = make(c=4, dim=4, M=2, T=8, W=1, lam=0.0)
    layer.double()
    layer(inputs(1, 4, 2, 2, seed=0, dtype=torch.float64))  # the one warm-up forward
    blobs, _ = _two_blob_memory(8, 4, n_a=10, n_b=6, seed=3)
    blobs = blobs.double() + 1e-9 * torch.arange(64, dtype=torch.float64).reshape(2, 8, 4)  # not float32-representable
    with torch.no_grad():
        layer.memory.copy_(blobs)
        layer.centres.copy_(blobs.mean(1))
    pre = blobs.reshape(-1, 4)
    layer(inputs(1, 4, 2, 2, seed=1, dtype=torch.float64))  # forward W: k-means
    assert layer.memory.dtype == torch.float64
    for v in layer.memory.reshape(-1, 4):
        assert _index_in(v, pre, atol=0.0) >= 0, "k-means wrote a vector that is not exactly a memory vector"

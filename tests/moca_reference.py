"""A literal, slow reference of the MoCA layer (shared/MOCA.md; the paper's Algorithm 1).

Written independently of ``models/moca.py`` so the tests can compare the batched layer against
it. Everything here is per position, per cluster and per key in plain Python loops, in float64,
so that it reads like the algorithm and not like the layer:

- :func:`forward` — for every position (b, y, x): q = theta a; nearest centre by squared
  Euclidean distance (first index on a tie); scores over that cluster's T prototypes (no
  scaling); softmax; weighted sum of prototypes (h_m). Self-attention over the positions of the
  same image with keys phi a, values psi a, no scaling (h_s). H = h_m + h_s (h_s alone during
  warm-up or with memory off); output = gamma * O H + a.
- :func:`train_step_write` — the training-mode memory write of MOCA.md and the random-draw
  protocol (normal write or warm-up write), then the momentum update of phi_k, then the
  generator state and the forward count. It does not do the k-means of forward W.

The state comes from a layer via :func:`state_from_layer` (weights copied, converted to float64);
the configuration is passed explicitly by the test (it is what the test built the layer with).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch


@dataclass
class Config:
    clusters: int
    memory_size: int
    dim: int
    momentum: float = 0.6
    warmup_steps: int = 0
    memory: bool = True
    write_rate: float = 1.0


@dataclass
class State:
    theta: torch.Tensor  # (dim, c)
    phi: torch.Tensor  # (dim, c)
    psi: torch.Tensor  # (dim, c)
    out: torch.Tensor  # (c, dim)
    phi_k: torch.Tensor  # (dim, c)
    gamma: float
    memory: torch.Tensor  # (M, T, dim)
    centres: torch.Tensor  # (M, dim)
    rng_state: torch.Tensor  # uint8
    forwards: int

    def clone(self) -> "State":
        return copy.deepcopy(self)


def _w(conv: torch.nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    return w.reshape(w.shape[0], w.shape[1]).to(torch.float64).clone()


def _buf(layer, name: str) -> torch.Tensor:
    t = getattr(layer, name, None)
    return torch.zeros(0) if t is None else t.detach().to(torch.float64).clone()


def state_from_layer(layer) -> State:
    """Copy everything the algorithm needs from a layer (float64 copies; rng state as is)."""
    return State(
        theta=_w(layer.theta),
        phi=_w(layer.phi),
        psi=_w(layer.psi),
        out=_w(layer.out),
        phi_k=_w(layer.phi_k),
        gamma=float(layer.gamma.detach().reshape(-1)[0]),
        memory=_buf(layer, "memory"),
        centres=_buf(layer, "centres"),
        rng_state=layer.rng_state.detach().clone(),
        forwards=int(layer.forwards),
    )


# ---------------------------------------------------------------------------------------------
# small literal helpers


def _matvec(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """w (r x c) times vector a (c): a 1x1 convolution at one position, written out."""
    rows = []
    for r in range(w.shape[0]):
        acc = 0.0
        for j in range(w.shape[1]):
            acc += float(w[r, j]) * float(a[j])
        rows.append(acc)
    return torch.tensor(rows, dtype=torch.float64)


def _dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.dot(u, v))


def _sqdist(u: torch.Tensor, v: torch.Tensor) -> float:
    d = u - v
    return float(torch.dot(d, d))


def _softmax(scores: list[float]) -> list[float]:
    mx = max(scores)
    e = [math.exp(s - mx) for s in scores]
    z = sum(e)
    return [x / z for x in e]


def _nearest(centres: torch.Tensor, v: torch.Tensor) -> tuple[int, float]:
    """Index of the nearest centre (first on a tie) and the gap to the second nearest."""
    best, best_d, second_d = 0, math.inf, math.inf
    for m in range(centres.shape[0]):
        d = _sqdist(centres[m], v)
        if d < best_d:
            best, best_d, second_d = m, d, best_d
        elif d < second_d:
            second_d = d
    return best, second_d - best_d


def positions(n: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """Row order of MOCA.md: row = b*h*w + y*w + x."""
    return [(b, y, x) for b in range(n) for y in range(h) for x in range(w)]


# ---------------------------------------------------------------------------------------------
# forward


@dataclass
class ForwardResult:
    y: torch.Tensor  # (n, c, h, w) float64
    assign: torch.Tensor  # (n, h, w) long (-1 where the memory is not read)
    min_gap: float  # smallest gap between nearest and second-nearest centre over all queries
    h_m: torch.Tensor  # (N, dim)
    h_s: torch.Tensor  # (N, dim)


def forward(state: State, cfg: Config, A: torch.Tensor, use_memory: bool | None = None) -> ForwardResult:
    """Algorithm 1, one position at a time.

    ``use_memory`` defaults to the rule of MOCA.md: the memory path is read unless memory is off
    or the layer is still in warm-up (forwards < W).
    """
    if use_memory is None:
        use_memory = cfg.memory and not (cfg.warmup_steps > 0 and state.forwards < cfg.warmup_steps)
    A = A.detach().to(torch.float64)
    n, c, h, w = A.shape
    T = cfg.memory_size
    rows = positions(n, h, w)
    N = len(rows)

    q = [_matvec(state.theta, A[b, :, y, x]) for (b, y, x) in rows]
    k = [_matvec(state.phi, A[b, :, y, x]) for (b, y, x) in rows]
    v = [_matvec(state.psi, A[b, :, y, x]) for (b, y, x) in rows]

    # memory read: winner-take-all cluster, softmax over its T prototypes
    h_m = torch.zeros(N, state.theta.shape[0], dtype=torch.float64)
    assign = torch.full((n, h, w), -1, dtype=torch.long)
    min_gap = math.inf
    if use_memory:
        for row, (b, y, x) in enumerate(rows):
            i, gap = _nearest(state.centres, q[row])
            min_gap = min(min_gap, gap)
            assign[b, y, x] = i
            scores = [_dot(state.memory[i, t], q[row]) for t in range(T)]
            beta = _softmax(scores)
            acc = torch.zeros(state.theta.shape[0], dtype=torch.float64)
            for t in range(T):
                acc = acc + beta[t] * state.memory[i, t]
            h_m[row] = acc

    # self-attention over the positions of the same image (no scaling)
    h_s = torch.zeros(N, state.theta.shape[0], dtype=torch.float64)
    hw = h * w
    for row, (b, y, x) in enumerate(rows):
        same = range(b * hw, (b + 1) * hw)
        scores = [_dot(q[row], k[j]) for j in same]
        a = _softmax(scores)
        acc = torch.zeros(state.theta.shape[0], dtype=torch.float64)
        for weight, j in zip(a, same):
            acc = acc + weight * v[j]
        h_s[row] = acc

    out = torch.empty_like(A)
    for row, (b, y, x) in enumerate(rows):
        H = h_m[row] + h_s[row] if use_memory else h_s[row]
        o = _matvec(state.out, H)
        out[b, :, y, x] = state.gamma * o + A[b, :, y, x]
    return ForwardResult(y=out, assign=assign, min_gap=min_gap, h_m=h_m, h_s=h_s)


# ---------------------------------------------------------------------------------------------
# memory write (training mode, after the forward)


@dataclass
class WriteResult:
    state: State
    key_assign: list[int]  # cluster of each key (normal write) or [] (warm-up write)
    min_gap: float  # smallest nearest/second-nearest gap among the keys (inf for warm-up)
    keys: torch.Tensor  # (N, dim) float64


def train_step_write(state: State, cfg: Config, A: torch.Tensor, keys_override: torch.Tensor | None = None) -> WriteResult:
    """Everything a training forward does to the layer's state, after computing its output.

    Must not be called for the forward where forwards == W > 0 (that one runs k-means first).
    ``keys_override`` (N x dim) replaces phi_k(A), for data-parallel keys gathered from all ranks.
    """
    assert not (cfg.warmup_steps > 0 and state.forwards == cfg.warmup_steps), "k-means forward"
    s_new = state.clone()
    if not cfg.memory:
        raise ValueError("the reference write is for memory=True layers")
    A = A.detach().to(torch.float64)
    n, c, h, w = A.shape
    M, T, dim = s_new.memory.shape
    lam = cfg.write_rate

    g = torch.Generator(device="cpu")
    g.set_state(state.rng_state.clone())

    if keys_override is None:
        keys = torch.stack([_matvec(state.phi_k, A[b, :, y, x]) for (b, y, x) in positions(n, h, w)])
    else:
        keys = keys_override.detach().to(torch.float64)
    N = keys.shape[0]

    warm = cfg.warmup_steps > 0 and state.forwards < cfg.warmup_steps
    key_assign: list[int] = []
    min_gap = math.inf
    if warm:
        r = torch.rand(N, generator=g)
        s = torch.rand(M * T, generator=g)
        order = sorted(range(N), key=lambda row: (float(r[row]), row))
        kept = order[: min(N, M * T)]
        slots = sorted(range(M * T), key=lambda t: (float(s[t]), t))
        for j, row in enumerate(kept):
            flat = slots[j]
            i, t = flat // T, flat % T
            s_new.memory[i, t] = (1.0 - lam) * s_new.memory[i, t] + lam * keys[row]
    else:
        for row in range(N):
            i, gap = _nearest(state.centres, keys[row])  # centres before this write
            key_assign.append(i)
            min_gap = min(min_gap, gap)
        r = torch.rand(N, generator=g)
        s = torch.rand(M, T, generator=g)
        for i in range(M):
            members = [row for row in range(N) if key_assign[row] == i]
            members.sort(key=lambda row: (float(r[row]), row))
            kept = members[: min(len(members), T)]
            slots = sorted(range(T), key=lambda t: (float(s[i, t]), t))
            for j, row in enumerate(kept):
                t = slots[j]
                s_new.memory[i, t] = (1.0 - lam) * s_new.memory[i, t] + lam * keys[row]

    # centres: mean of each cluster's T prototypes
    for i in range(M):
        acc = torch.zeros(dim, dtype=torch.float64)
        for t in range(T):
            acc = acc + s_new.memory[i, t]
        s_new.centres[i] = acc / T

    # momentum key encoder (MoCo convention)
    m = cfg.momentum
    s_new.phi_k = m * state.phi_k + (1.0 - m) * state.phi

    s_new.rng_state = g.get_state()
    s_new.forwards = state.forwards + 1
    return WriteResult(state=s_new, key_assign=key_assign, min_gap=min_gap, keys=keys)


def keys_of(state: State, A: torch.Tensor) -> torch.Tensor:
    """phi_k(A) as rows in (b, y, x) order, float64."""
    A = A.detach().to(torch.float64)
    n, c, h, w = A.shape
    return torch.stack([_matvec(state.phi_k, A[b, :, y, x]) for (b, y, x) in positions(n, h, w)])

"""MoCA: Memory Concept Attention (Li et al., few-shot image generation with prototype memory).

The exact behaviour is pinned down in shared/MOCA.md; tests/moca_reference.py is the literal,
loop-by-loop oracle this batched layer is held to.

    layer = MoCA(channels=64, dim=128, clusters=10, memory_size=100, momentum=0.6, seed=0)
    y = layer(feat)                 # (n, c, h, w) -> (n, c, h, w); training mode also writes memory

Differences from the official release, all deliberate: the momentum encoder, memory, centres and
the layer's random-generator state are in ``state_dict``; eval mode never writes memory; no device
is hard-coded; the self-attention path is ``scaled_dot_product_attention`` (no (hw x hw) map kept);
all clusters are handled in one batched computation; under data parallelism every rank writes the
same keys into the same slots, so the memory bank stays identical across workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _nearest_centre(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """argmin_m ||K_m - x||^2 for every row of x (ties to the lower index, as argmin does)."""
    # ||K||^2 - 2 x.K has the same argmin as the full distance and needs no (N, M, dim) tensor.
    d = (centres * centres).sum(1)[None, :] - 2.0 * (x @ centres.t())
    return d.argmin(1)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows from every data-parallel rank, concatenated in rank order (a no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


class MoCA(nn.Module):
    """Prototype-memory attention inserted between two generator blocks."""

    def __init__(
        self,
        channels: int,
        dim: int = 128,
        clusters: int = 10,
        memory_size: int = 100,
        momentum: float = 0.6,
        warmup_steps: int = 0,
        memory: bool = True,
        write_rate: float = 1.0,
        kmeans_iters: int = 10,
        seed: int = 0,
    ):
        super().__init__()
        self.channels, self.dim = channels, dim
        self.clusters, self.memory_size = clusters, memory_size
        self.momentum, self.warmup_steps = float(momentum), int(warmup_steps)
        self.use_memory, self.write_rate, self.kmeans_iters = bool(memory), float(write_rate), kmeans_iters

        self.theta = nn.Conv2d(channels, dim, 1, bias=False)
        self.phi = nn.Conv2d(channels, dim, 1, bias=False)
        self.psi = nn.Conv2d(channels, dim, 1, bias=False)
        self.out = nn.Conv2d(dim, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))
        # The key encoder for memory writes: a momentum copy of phi, never trained by gradients.
        self.phi_k = nn.Conv2d(channels, dim, 1, bias=False)
        self.phi_k.weight.data.copy_(self.phi.weight.data)
        self.phi_k.weight.requires_grad_(False)

        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        # Seeded random start; with warm-up the memory is overwritten by real keys anyway.
        mem = torch.randn(clusters, memory_size, dim, generator=g)
        self.register_buffer("memory", mem)
        self.register_buffer("centres", mem.mean(1))
        self.register_buffer("rng_state", g.get_state())
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))
        self.last_assign: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, dim={self.dim}, clusters={self.clusters}, "
            f"memory_size={self.memory_size}, momentum={self.momentum}, warmup_steps={self.warmup_steps}, "
            f"memory={self.use_memory}"
        )

    # ------------------------------------------------------------------ forward
    def in_warmup(self) -> bool:
        return self.use_memory and int(self.forwards) < self.warmup_steps

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        n, c, h, w = a.shape
        if self.training and self.use_memory and self.warmup_steps > 0 and int(self.forwards) == self.warmup_steps:
            self._form_clusters()

        q_map = self.theta(a)  # (n, dim, h, w)
        q_img = q_map.flatten(2).transpose(1, 2)  # (n, hw, dim)
        k_img = self.phi(a).flatten(2).transpose(1, 2)
        v_img = self.psi(a).flatten(2).transpose(1, 2)
        # Self-attention over the image's own positions; the paper uses no 1/sqrt(d) scaling.
        # Contiguous inputs matter: with a strided last dimension SDPA silently falls back to the
        # math kernel, which keeps the (hw x hw) softmax map for backward.
        h_s = F.scaled_dot_product_attention(
            q_img[:, None].contiguous(), k_img[:, None].contiguous(), v_img[:, None].contiguous(), scale=1.0
        )[:, 0]

        hidden = h_s
        if self.use_memory:
            q = q_img.reshape(n * h * w, self.dim)
            assign = _nearest_centre(q.detach(), self.centres.to(q.dtype))
            self.last_assign = assign.view(n, h, w)
            if not self.in_warmup():
                hidden = hidden + self._read_memory(q, assign).view(n, h * w, self.dim)
        else:
            self.last_assign = None

        hid_map = hidden.transpose(1, 2).reshape(n, self.dim, h, w)
        y = self.gamma * self.out(hid_map) + a

        if self.training and self.use_memory:
            self._write(a)
        elif self.training:
            self.forwards += 1
        return y

    def _read_memory(self, q: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """beta = softmax(P_i q) over the chosen cluster's T prototypes; h_m = beta^T P_i.

        All clusters in one batched computation, without scoring rows against other clusters'
        prototypes: rows are sorted by cluster and packed into an (M, L, dim) block (L = the
        largest cluster's row count, padding rows are zero and discarded), then two batched
        matmuls with the (M, T, dim) bank. Scoring every row against all M*T prototypes and
        masking would cost M times the work and memory; gathering P_i per row would build an
        (N, T, dim) tensor.
        """
        m, t = self.clusters, self.memory_size
        # A copy: the write after this forward changes the bank in place, and backward needs the
        # values this read used. It is a buffer, so no gradient reaches it.
        bank = self.memory.to(q.dtype, copy=True)  # (M, T, dim)
        order = torch.argsort(assign, stable=True)
        cl = assign[order]
        counts = torch.bincount(assign, minlength=m)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(q.shape[0], device=q.device) - starts[cl]  # row's place in its cluster
        width = int(counts.max())
        packed = q.new_zeros(m, width, self.dim).index_put((cl, slot), q[order])
        beta = torch.softmax(torch.bmm(packed, bank.transpose(1, 2)), dim=2)  # (M, L, T)
        read = torch.bmm(beta, bank)[cl, slot]  # back to sorted rows
        return torch.empty_like(read).index_copy(0, order, read)

    # ------------------------------------------------------------------ memory write
    @torch.no_grad()
    def _write(self, a: torch.Tensor) -> None:
        keys = self.phi_k(a).flatten(2).transpose(1, 2).reshape(-1, self.dim).to(self.memory.dtype)
        keys = _gather_rows(keys)  # every rank writes the same keys, in rank order
        g = torch.Generator(device="cpu")
        g.set_state(self.rng_state.cpu())
        m, t = self.clusters, self.memory_size
        mem = self.memory.view(m * t, self.dim)
        if self.in_warmup():
            # Warm-up: random slots anywhere in the bank, regardless of cluster.
            r = torch.rand(keys.shape[0], generator=g)
            s = torch.rand(m * t, generator=g)
            order = torch.argsort(r)[: m * t]
            slots = torch.argsort(s)[: order.numel()].to(mem.device)
            self._blend(mem, slots, keys[order.to(keys.device)])
        else:
            cl = _nearest_centre(keys, self.centres.to(keys.dtype))
            r = torch.rand(keys.shape[0], generator=g)
            s = torch.rand(m, t, generator=g)
            # Sort keys by (cluster, r): a key's rank inside its cluster decides whether it is
            # kept (rank < T, a uniform random subset) and which slot it takes (perm_i[rank]).
            r = r.to(keys.device)
            order = torch.argsort(cl.double() + r.double() * 0.5)  # r in [0,1): stays within its cluster
            cl_sorted = cl[order]
            counts = torch.bincount(cl, minlength=m)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=keys.device) - starts[cl_sorted]
            kept = rank < t
            perm = torch.argsort(s, dim=1).to(keys.device)  # (M, T) random slot order per cluster
            ci, ri = cl_sorted[kept], rank[kept]
            slots = ci * t + perm[ci, ri]
            self._blend(mem, slots.to(mem.device), keys[order[kept]])
        self.centres.copy_(self.memory.mean(1))
        # MoCo's convention: m = 0 makes phi_k a plain copy of phi (the "no momentum" ablation).
        self.phi_k.weight.mul_(self.momentum).add_(self.phi.weight.detach(), alpha=1.0 - self.momentum)
        self.rng_state.copy_(g.get_state())
        self.forwards += 1

    def _blend(self, mem: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        lam = self.write_rate
        keys = keys.to(mem.dtype)
        if lam == 1.0:
            mem[slots] = keys
        else:
            mem[slots] = (1.0 - lam) * mem[slots] + lam * keys

    # ------------------------------------------------------------------ warm-up -> clusters
    @torch.no_grad()
    def _form_clusters(self) -> None:
        """k-means over the M*T warm-up vectors, then each cluster's block holds its members."""
        g = torch.Generator(device="cpu")
        g.set_state(self.rng_state.cpu())
        m, t = self.clusters, self.memory_size
        x = self.memory.reshape(m * t, self.dim).cpu()
        centres = x[torch.randperm(m * t, generator=g)[:m]].clone()
        for _ in range(self.kmeans_iters):
            lab = _nearest_centre(x, centres)
            sums = torch.zeros_like(centres).index_add_(0, lab, x)
            cnt = torch.bincount(lab, minlength=m).float()
            centres = torch.where(cnt[:, None] > 0, sums / cnt.clamp(min=1)[:, None], centres)
        lab = _nearest_centre(x, centres)
        new = torch.empty(m, t, self.dim, dtype=x.dtype)
        # A one-off event at step W, so a loop over clusters is fine here (never in the hot path).
        for i in range(m):
            members = x[lab == i]
            if members.shape[0] >= t:
                new[i] = members[torch.randperm(members.shape[0], generator=g)[:t]]
            elif members.shape[0] > 0:
                new[i] = members[torch.randint(members.shape[0], (t,), generator=g)]
            else:
                new[i] = torch.randn(t, self.dim, generator=g, dtype=x.dtype) * x.std()
        self.memory.copy_(new.to(self.memory))
        self.centres.copy_(self.memory.mean(1))
        self.rng_state.copy_(g.get_state())

"""The vector quantiser of a VQ-VAE (van den Oord et al. 2017): nearest codebook entry, the
straight-through estimator, the commitment loss, and the codebook's update (EMA or loss), with
dead-code restarts that stay identical across data-parallel ranks.

    vq = VectorQuantizer(size=512, dim=64, update="ema", decay=0.99, beta=0.25, restart=True, patience=100)
    q, idx, loss = vq(z)   # z (B, D, h, w): q is exactly the chosen entries, dq/dz the identity

The attentive VQ-VAE (``models/attentive_vqvae.py``) has one per AREN level.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import distributed


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per latent vector, the straight-through estimator, commitment loss.

    The loss is ``beta * mean((z - sg[e])^2)`` over every element of z (its gradient with respect
    to z is ``2 beta (z - e) / N``, N = z.numel()), plus for ``update: loss`` the codebook loss
    ``mean((sg[z] - e)^2)`` (gradient ``2 (e - z) / N`` on each chosen entry, nothing on z).
    ``update: ema``: entries are running means of the vectors assigned to them (no gradient; the
    codebook is a no-grad parameter). With ``restart``, an entry no latent vector chose for
    ``patience`` training steps is moved onto a random encoder output of the current batch (a
    dead-code restart). All updates happen in training mode only; evaluation and sampling never
    change the codebook.
    """

    def __init__(self, size: int, dim: int, update: str, decay: float, beta: float, restart: bool, patience: int):
        super().__init__()
        self.size, self.dim, self.update, self.decay, self.beta = size, dim, update, decay, beta
        self.restart, self.patience = restart, patience
        self.embed = nn.Parameter(torch.randn(size, dim), requires_grad=update == "loss")
        if update == "ema":
            # One pseudo-assignment of each entry to itself: an unused entry keeps its value
            # (embed_sum / cluster_size stays e), a used one moves toward its vectors' mean.
            self.register_buffer("cluster_size", torch.ones(size))
            self.register_buffer("embed_sum", self.embed.detach().clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        e = self.embed.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> their entries as a (B, D, h, w) map."""
        return self.embed[idx].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (quantised z with straight-through gradient, indices (B, h, w), loss)."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32 under bf16 autocast too
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
            idx = self.nearest(flat.detach())
            e = self.embed.float()[idx]
            loss = self.beta * F.mse_loss(flat, e.detach())  # commitment: moves the encoder only
            if self.update == "loss":
                loss = loss + F.mse_loss(e, flat.detach())  # codebook loss: moves the entries only
            if self.training and torch.is_grad_enabled():
                self.learn(flat.detach(), idx)
        e_map = e.detach().view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        # sg[e] + (z - sg[z]): the value is exactly the entry (z - z is exactly 0), the gradient is
        # z's alone (the straight-through estimator); z + sg[e - z] would round away from the entry.
        return e_map + (z - z.detach()), idx.view(b, h, w), loss

    @torch.no_grad()
    def learn(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """One training step's codebook statistics: usage, the EMA means, dead-code restarts."""
        counts = torch.bincount(idx, minlength=self.size).float()
        sums = torch.zeros(self.size, self.dim, device=flat.device).index_add_(0, idx, flat) \
            if self.update == "ema" else None
        if distributed():  # every rank sees the whole global batch's statistics: codebooks stay identical
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.steps += 1
        used = counts > 0
        self.last_used[used] = self.steps
        if self.update == "ema":
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self.embed.data[used] = self.embed_sum[used] / self.cluster_size[used, None]
        if self.restart:
            self.restart_dead(flat)

    @torch.no_grad()
    def restart_dead(self, flat: torch.Tensor) -> None:
        """Entries unused for ``patience`` steps move onto random vectors of the batch (rank 0's)."""
        dead = (self.steps - self.last_used) >= self.patience
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        new = flat[torch.randint(0, len(flat), (n_dead,), device=flat.device)]  # global RNG: seeded per step
        if distributed():
            dist.broadcast(new, 0)
        self.embed.data[dead] = new.to(self.embed.dtype)
        self.last_used[dead] = self.steps
        if self.update == "ema":
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = new

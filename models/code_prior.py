"""The prior that makes a VQ-VAE a generator: an autoregressive transformer over the codes of
every level, one joint sequence (the top level's grid in raster order first, the bottom's last),
so each level is drawn conditioned on every level above it.

    prior = CodePrior(codes=512, level_lengths=[64, 16], dim=256, layers=8, heads=8, dropout=0.1)
    seq = to_sequence([bottom_codes, upper_codes])   # (B, 16 + 64): the upper grid first
    loss = prior.nll(seq)                            # nats per code
    seq = prior.generate(torch.rand(B, 80), temperature=1.0)
    bottom, upper = from_sequence(seq, [8, 4])
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def to_sequence(codes: list[torch.Tensor]) -> torch.Tensor:
    """Indices per level, bottom first ((B, g_k, g_k) each) -> (B, T): top level first, each in raster order."""
    return torch.cat([c.flatten(1) for c in reversed(codes)], 1)


def from_sequence(seq: torch.Tensor, grids: list[int]) -> list[torch.Tensor]:
    """The inverse of :func:`to_sequence`; ``grids`` are the sides per level, bottom first."""
    parts = torch.split(seq, [g * g for g in reversed(grids)], dim=1)
    return [p.reshape(len(seq), g, g) for p, g in zip(reversed(parts), grids)]


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal attention; ``cache`` holds keys/values for sampling."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # one new position: it may look at every cached one
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=cache is None)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CodePrior(nn.Module):
    """An autoregressive transformer over the joint code sequence of all levels.

    ``level_lengths``: positions per level, bottom first (the sequence holds them top first).
    Input at position t: a start token (t = 0) or the embedding of token t-1, plus a learned
    position; output: logits over the K codes of position t's own codebook. Each level has its own
    K token embeddings (level l's code c is token l K + c); they are the output head's rows (weight
    tying, as GPT-2), so every row learns even for codes the data never uses. With one level it is
    a prior over the bottom grid.
    """

    def __init__(self, codes: int, level_lengths: list[int], dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.codes, self.n_levels = codes, len(level_lengths)
        self.length = sum(level_lengths)
        level = torch.cat([torch.full((n,), lvl, dtype=torch.long)
                           for lvl, n in reversed(list(enumerate(level_lengths)))])
        self.register_buffer("level", level, persistent=False)  # (T,): codebook level of each position
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(self.length, dim) * 0.02)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codes * self.n_levels, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self.drop = nn.Dropout(dropout)

    def level_logits(self, h: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T', dim) at positions of codebook ``level`` (T',) -> (B, T', K) logits."""
        logits = self.head(self.ln(h)).view(*h.shape[:2], self.n_levels, self.codes)
        return logits.gather(2, level.view(1, -1, 1, 1).expand(h.shape[0], -1, 1, self.codes)).squeeze(2)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) (each in its level's 0..K-1) -> logits (B, T, K) predicting each from the ones before it."""
        b, t = codes.shape
        tokens = codes + self.codes * self.level[:t]
        x = torch.cat([self.start.expand(b, 1, -1), F.embedding(tokens[:, :-1], self.head.weight)], 1)
        x = self.drop(x + self.pos[:t])
        for blk in self.blocks:
            x = blk(x)
        return self.level_logits(x, self.level[:t])

    def token_nll(self, codes: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each code (B, T), in nats."""
        logits = self(codes).float()
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")

    def nll(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats."""
        return self.token_nll(codes).mean()

    def generate(self, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
        """Codes (B, T) drawn position by position (keys and values cached); ``uniforms`` (B, T) in
        [0, 1) pick each code by inverting the cumulative distribution, so the caller's seed fixes
        every draw on any device."""
        b, t_len = uniforms.shape
        caches: list[dict] = [{} for _ in self.blocks]
        x = (self.start + self.pos[0]).expand(b, 1, -1)
        out = []
        for t in range(t_len):
            h = x
            for blk, cache in zip(self.blocks, caches):
                h = blk(h, cache)
            logits = self.level_logits(h[:, -1:], self.level[t : t + 1])[:, 0]
            probs = torch.softmax(logits.float() / temperature, -1)
            code = torch.searchsorted(probs.cumsum(-1), uniforms[:, t : t + 1].contiguous(), right=True)
            code = code.clamp_max(self.codes - 1)
            out.append(code)
            if t + 1 < t_len:
                x = F.embedding(code + self.codes * self.level[t], self.head.weight) + self.pos[t + 1]
        return torch.cat(out, 1)

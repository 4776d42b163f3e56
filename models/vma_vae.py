"""VMA-VAE: Variational Memory Addressing in a VAE (Bornschein et al., NeurIPS 2017).

    fam = build_model({"family": "vma_vae", **VMAVAE.TINY}, image_size=32)
    losses = fam.train_step(real, step=0)  # real: (n, 3, 32, 32) in [-1, 1]
    img = fam.sample(4, seed=0)            # a ~ p(a|M), z ~ p(z|m_a), x = decoder mean
    img = fam.sample(4, seed=0, memory=exemplars)   # the same from a memory of your choosing
    report = fam.memory_report(heldout_u8, seed=0)  # nll_k<K>, bpd_k<K>, address_mi, ... in nats

The generative model is a mixture over memory entries, p(x|M) = sum_a p(a|M) int p(z|m_a)
p(x|z, m_a) dz: sample an address, read the entry, let a conditional VAE with the entry as
context produce x. The address is a discrete latent with its own posterior q(a|x), proportional to
exp S(m_a, x). Training maximises the K-sample bound L_K with VIMCO gradients for the address
(Mnih & Rezende 2016); K = 1 falls back to REINFORCE with a running-mean baseline. Pixels are
8-bit values under a discretised logistic, so L_K is a bound on the log probability of the
image file's values: the reported ``nll_k<K>`` is in nats per image, >= 0 in expectation.

Memory (``memory.source``): ``learned`` is a parameter tensor of ``memory.size`` images trained by
the gradient of the bound; ``data`` holds raw training images. The family only sees minibatches,
so it keeps a pool of the distinct training images it has seen (up to mirroring, FIFO beyond
``memory.pool_size``) in its state; before each update M is a uniform draw of ``memory.size``
pool images that are not in the minibatch (targets disjoint from M; *not* the paper's
class-matched episodes, the family sees no labels). On the very first step the pool holds only
the batch itself, so the batch is split instead. ``memory.size: 0`` is a plain VAE;
``baseline_vae: true`` trains one beside the memory model on the same targets, so every
evaluation reports the memory's gain on the same images. ``fewshot.path`` fills M with exemplars
of classes unseen in training (models/vma_fewshot.py).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from models import ModelFamily, cpu_generator, distributed, noise, register_model
from models.vma_bound import (
    address_kl,
    bits_per_dim,
    bound_summary,
    log_mean_exp,
    score_function_surrogate,
    similarity,
    vimco_surrogate,
)
from models.vma_fewshot import FewShotSet, check_sizes, fewshot_report, fewshot_tiles
from models.vma_nets import VMANet, rows_per_forward
from sweeper.eval.registry import register_metric

SIMILARITIES = ("normalized_inner", "inner", "cosine")


# ============================================================================ memory images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 as a PNG holds them (sweeper.eval.features.quantize's arithmetic):
    exact for images that came from uint8 as ``u / 127.5 - 1``."""
    return x.detach().float().add(1).mul(0.5).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # the same operations as sweeper.store.data.sample_batch


def image_keys(u8: torch.Tensor) -> list[int]:
    """One 63-bit content key per uint8 image, the same for an image and its mirror image
    (the trainer flips batches at random): two keys are equal iff the images are the same
    training image, up to a hash collision."""
    arr = u8.detach().cpu().contiguous().numpy()
    out = []
    for img in arr:
        a = hashlib.blake2b(img.tobytes(), digest_size=8).digest()
        b = hashlib.blake2b(np.ascontiguousarray(img[..., ::-1]).tobytes(), digest_size=8).digest()
        out.append(int.from_bytes(min(a, b), "little") >> 1)
    return out


def own_image_mask(keys: list[int], mem_keys: list[int] | None, device) -> torch.Tensor | None:
    """(B, M) True where a memory entry is the target's own image (or its mirror); None when the
    memory's entries have no keys (a learned memory)."""
    if mem_keys is None:
        return None
    mask = (torch.tensor(keys)[:, None] == torch.tensor(mem_keys)[None]).to(device)
    return mask & ~mask.all(1, keepdim=True)  # a memory that is only the target itself stays visible


# ============================================================================ the family
@register_model("vma_vae")
class VMAVAE(ModelFamily):
    DEFAULTS: dict[str, Any] = {
        "width": 64,  # feature maps of every conv layer (the paper's Omniglot nets: 48 or 64)
        "hidden": 256,  # hidden units of the MLP after each pyramid
        "z_dim": 64,  # |z| (the paper's Omniglot)
        "embed_dim": 128,  # |e|, the matching space of h and h_q (the paper's)
        "memory": {
            "source": "data",  # data: raw training images, disjoint from the targets | learned: a parameter
            "size": 64,  # |M|; 0: no memory, a plain VAE
            "pool_size": 512,  # data: distinct training images kept to draw M from (FIFO)
        },
        "similarity": "normalized_inner",  # <e_a, e_q> / ||e_a|| (Eq. 5) | inner | cosine
        "prior": "learned",  # p(a) from a learned query e_p | flat: 1/|M|
        "samples": 4,  # K posterior samples per target (the paper's); 1: REINFORCE + running-mean baseline
        "vimco_baseline": "geometric",  # leave-one-out: geometric (Mnih & Rezende) | arithmetic (Eq. 8)
        "score_baseline_decay": 0.9,  # K = 1 only: decay of the running-mean baseline
        "sample_mode": "mean",  # sampling: decoder mean | sample (mean + pixel noise)
        "lr": 3.0e-4,  # Adam (the paper's best of 1e-4, 3e-4)
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,  # L2 on everything but M (the paper's regularised Omniglot model: 3e-4)
        "baseline_vae": False,  # also train a plain VAE (memory.size 0, same nets) on the same targets
        "eval_samples": 1000,  # K of every reported bound (nll_k<K>; the paper's Table 1): one value per sweep
        "eval_images": 256,  # images per reported bound (a seeded draw): one value per sweep
        "fewshot": {
            "path": None,  # a folder of class folders unseen in training (builtin:digits/evaluation); null: off
            "classes": 2,  # C: classes in each memory (the target's and C - 1 others, or C others)
            "shots": [1, 2, 4],  # exemplars per class: |M| = C x shots
            "targets": 4,  # held-out targets per class
        },
    }
    # the reported bounds' K, their images, and the few-shot protocol: one value per sweep
    SWEEP_FIXED = ("eval_samples", "eval_images", "fewshot")
    LOSSES = ("nll_bound", "recon_nll", "kl_z", "kl_a", "plain_vae_nll_bound")  # what train_step returns (checked in tests/test_family_contract.py)
    HEADLINE = ("nll_k1000", "memory_gain_k1000", "address_mi")  # the bound at the default K, the memory's gain
    TINY: dict[str, Any] = {
        "width": 4, "hidden": 8, "z_dim": 4, "embed_dim": 4, "samples": 3, "baseline_vae": True,
        "memory": {"source": "data", "size": 2, "pool_size": 16}, "eval_samples": 4, "eval_images": 16,
    }

    # ------------------------------------------------------------------ config
    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:
        super().validate(cfg, image_size)
        cls._validate_counts(cfg)
        cls._validate_choices(cfg)
        cls._validate_fewshot(cfg["fewshot"], image_size)

    @classmethod
    def _count(cls, key: str, value: Any, low: int = 1) -> None:
        cls.need(isinstance(value, int) and not isinstance(value, bool) and value >= low, key,
                 f"must be an integer >= {low}, got {value!r}")

    @classmethod
    def _validate_counts(cls, cfg: dict[str, Any]) -> None:
        need, mem = cls.need, cfg["memory"]
        for key in ("width", "hidden", "z_dim", "embed_dim", "samples", "eval_samples", "eval_images"):
            cls._count(key, cfg[key])
        cls._count("memory.size", mem["size"], low=0)
        cls._count("memory.pool_size", mem["pool_size"])
        need(mem["source"] != "data" or mem["size"] <= mem["pool_size"], "memory.size",
             f"{mem['size']} is more than memory.pool_size {mem['pool_size']}, the images M is drawn from; "
             f"raise memory.pool_size")
        need(isinstance(cfg["baseline_vae"], bool), "baseline_vae", f"use true or false, got {cfg['baseline_vae']!r}")
        need(not (cfg["baseline_vae"] and mem["size"] == 0), "baseline_vae",
             "the model is already a plain VAE (memory.size 0); set baseline_vae: false")

    @classmethod
    def _validate_choices(cls, cfg: dict[str, Any]) -> None:
        need = cls.need
        need(cfg["memory"]["source"] in ("data", "learned"), "memory.source",
             f"{cfg['memory']['source']!r}: use data or learned")
        need(cfg["similarity"] in SIMILARITIES, "similarity", f"{cfg['similarity']!r}: use one of {', '.join(SIMILARITIES)}")
        need(cfg["prior"] in ("learned", "flat"), "prior", f"{cfg['prior']!r}: use learned or flat")
        need(cfg["vimco_baseline"] in ("geometric", "arithmetic"), "vimco_baseline",
             f"{cfg['vimco_baseline']!r}: use geometric or arithmetic")
        need(0 <= cfg["score_baseline_decay"] < 1, "score_baseline_decay",
             f"must be in [0, 1), got {cfg['score_baseline_decay']}")
        need(cfg["sample_mode"] in ("mean", "sample"), "sample_mode", f"{cfg['sample_mode']!r}: use mean or sample")
        need(cfg["lr"] > 0, "lr", f"must be > 0, got {cfg['lr']}")
        need(isinstance(cfg["betas"], list) and len(cfg["betas"]) == 2 and all(0 <= b < 1 for b in cfg["betas"]),
             "betas", f"must be two numbers in [0, 1), got {cfg['betas']!r}")
        need(cfg["weight_decay"] >= 0, "weight_decay", f"must be >= 0, got {cfg['weight_decay']}")

    @classmethod
    def _validate_fewshot(cls, fs: dict[str, Any], image_size: int) -> None:
        cls._count("fewshot.classes", fs["classes"])
        cls._count("fewshot.targets", fs["targets"])
        shots = fs["shots"]
        cls.need(isinstance(shots, list) and shots and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                           for s in shots),
                 "fewshot.shots", f"must be a list of integers >= 1 (exemplars per class), got {shots!r}")
        if fs["path"] is None:
            return
        cls.need(isinstance(fs["path"], str), "fewshot.path", f"a folder of class folders or null, got {fs['path']!r}")
        from sweeper.store.data import list_images, resolve_data_path

        folder = resolve_data_path(fs["path"])
        cls.need(folder.is_dir(), "fewshot.path", f"{folder} is not a folder; point it at a folder of class folders")
        classes: dict[str, int] = {}
        for f in list_images(folder):
            key = f.parent.relative_to(folder).as_posix()
            classes[key] = classes.get(key, 0) + 1
        check_sizes(list(classes.values()) or [0], fs["classes"], shots, fs["targets"], str(folder))

    # ------------------------------------------------------------------ construction
    def __init__(self, cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu",
                 precision: str = "fp32"):
        super().__init__(cfg, image_size, seed, device, precision)
        self.K, self.source = cfg["samples"], cfg["memory"]["source"]
        self.memory_size, self.pool_size = cfg["memory"]["size"], cfg["memory"]["pool_size"]
        torch.manual_seed(seed)
        self.net = VMANet(cfg, image_size).to(self.device)
        self.opt = self._adam(self.net)
        self.plain = self.plain_opt = None  # the memory-off baseline, trained on the same targets
        if cfg["baseline_vae"]:
            plain_cfg = copy.deepcopy(cfg)
            plain_cfg["memory"]["size"] = 0
            self.plain = VMANet(plain_cfg, image_size).to(self.device)
            self.plain_opt = self._adam(self.plain)
        # data memory: distinct training images seen so far, their keys, the next FIFO slot
        self.pool = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=self.device)
        self.pool_keys = torch.empty(0, dtype=torch.long)
        self.pool_next = 0
        self.baseline = torch.zeros(())  # K = 1: running mean of the bound
        self.baseline_set = False
        self.last_memory = self.last_targets = None  # what the last train_step read and modelled
        self._fewshot: FewShotSet | None = None

    def _adam(self, net: VMANet) -> torch.optim.Optimizer:
        rest = [p for n, p in net.named_parameters() if n != "memory"]
        groups = [{"params": rest, "weight_decay": self.cfg["weight_decay"]}]
        if net.memory is not None:
            groups.append({"params": [net.memory], "weight_decay": 0.0})
        return torch.optim.Adam(groups, lr=self.cfg["lr"], betas=tuple(self.cfg["betas"]))

    def networks(self) -> dict[str, nn.Module]:
        return {"vae": self.net, **({"plain_vae": self.plain} if self.plain is not None else {})}

    # ------------------------------------------------------------------ addressing
    def address_log_probs(self, memory: torch.Tensor | None, x: torch.Tensor, mask: torch.Tensor | None = None,
                          e_mem: torch.Tensor | None = None, net: VMANet | None = None):
        """log q(a|x) (B, M) and log p(a) (B or 1, M). ``mask`` (B, M), True where an entry is
        hidden from that target (the metrics hide a target's own image). Without a memory: one
        certain address, (B, 1) and (1, 1) zeros."""
        net = net or self.net
        if not net.has_memory:
            return x.new_zeros(len(x), 1), x.new_zeros(1, 1)
        s_q, s_p = net.address_scores(memory, x, e_mem)
        if mask is not None:
            s_q = s_q.masked_fill(mask, -math.inf)
        log_q = torch.log_softmax(s_q, 1)
        if s_p is None:  # flat: 1 / (number of entries the target sees)
            visible = torch.ones_like(s_q[:1], dtype=torch.bool) if mask is None else ~mask
            return log_q, torch.where(visible, -torch.log(visible.sum(1, keepdim=True).float()), -math.inf)
        s_p = s_p[None] if mask is None else s_p[None].masked_fill(mask, -math.inf)
        return log_q, torch.log_softmax(s_p, 1)

    def prior_probs(self, memory: torch.Tensor) -> torch.Tensor:
        """p(a) over the entries of ``memory`` (exactly 1/|M| with ``prior: flat``)."""
        M = memory.shape[0]
        if self.net.prior_query is None:
            return torch.full((M,), 1.0 / M, device=memory.device)
        with torch.no_grad():
            e_mem = self.net.embed_entries(memory)
            return torch.softmax(similarity(e_mem, self.net.prior_query[None], self.net.similarity)[0], 0)

    # ------------------------------------------------------------------ the bound
    def draw_addresses(self, probs: torch.Tensor, K: int, gen: torch.Generator | None) -> torch.Tensor:
        """K addresses per row of ``probs`` (B, M), a_k ~ q(a|x): torch's RNG, or ``gen``."""
        if gen is None:
            return torch.multinomial(probs, K, replacement=True)
        return torch.multinomial(probs.cpu(), K, replacement=True, generator=gen).to(self.device)

    def draw_z_noise(self, rows: int, gen: torch.Generator | None) -> torch.Tensor:
        """eps ~ N(0, I) for z = mu + sigma * eps (the reparameterisation): torch's RNG, or ``gen``."""
        if gen is None:
            return torch.randn(rows, self.cfg["z_dim"], device=self.device)
        return noise((rows, self.cfg["z_dim"]), gen, self.device)

    def log_weights(self, x: torch.Tensor, memory: torch.Tensor | None, K: int, gen: torch.Generator | None = None,
                    mask: torch.Tensor | None = None, net: VMANet | None = None, e_mem: torch.Tensor | None = None):
        """log w (B, K) of K samples a_k ~ q(a|x), z_k ~ q(z|x, m_a), their log q(a_k|x) (B, K),
        and the parts the metrics report. log w = log p(a) + log P(x|z, m_a) + log p(z|m_a)
        - log q(z|x, m_a) - log q(a|x)."""
        net = net or self.net
        B = x.shape[0]
        with self.autocast():
            log_q, log_p = self.address_log_probs(memory, x, mask, e_mem, net)
            a = self.draw_addresses(log_q.detach().exp(), K, gen) if net.has_memory else \
                torch.zeros(B, K, dtype=torch.long, device=x.device)
            eps = self.draw_z_noise(B * K, gen)
            rows = memory[a.reshape(-1)] if net.has_memory else None
            log_px, log_pz, log_qz = net.continuous_terms(x.repeat_interleave(K, 0), rows, eps)
        log_q_a = log_q.gather(1, a)
        log_w = log_p.expand(B, -1).gather(1, a) + (log_px + log_pz - log_qz).view(B, K) - log_q_a
        return log_w, log_q_a, {"a": a, "log_q": log_q, "log_p": log_p, "log_px": log_px.view(B, K),
                                "kl_z": (log_qz - log_pz).view(B, K)}

    def _surrogate(self, log_w: torch.Tensor, log_q_a: torch.Tensor):
        """(L_K, surrogate) of the memory model: VIMCO (K > 1) or REINFORCE with the running mean."""
        if self.K > 1:
            return vimco_surrogate(log_w, log_q_a, self.cfg["vimco_baseline"])
        if not self.baseline_set:
            self.baseline, self.baseline_set = _mean_over_ranks(log_w.detach().mean()).cpu(), True
        bound, surrogate = score_function_surrogate(log_w, log_q_a, self.baseline.to(self.device))
        d = self.cfg["score_baseline_decay"]
        self.baseline = d * self.baseline + (1 - d) * _mean_over_ranks(bound.detach().mean()).cpu()
        return bound, surrogate

    # ------------------------------------------------------------------ training
    def train_step(self, batch: torch.Tensor, step: int = 0) -> dict[str, float]:
        """One Adam update on -L_K with VIMCO's address gradient (K = 1: REINFORCE, running-mean
        baseline), and one of the plain VAE (IWAE's bound, no address) on the same targets."""
        memory, targets = self._training_memory(batch.to(self.device))
        if targets is None:  # a lone image and an empty pool: nothing to model it against yet
            return {}
        log_w, log_q_a, parts = self.log_weights(targets, memory, self.K)
        bound, surrogate = self._surrogate(log_w, log_q_a)
        loss = -surrogate.mean()
        losses = {"nll_bound": -bound.mean().item(), "kl_a": address_kl(parts["log_q"], parts["log_p"]).mean().item(),
                  "kl_z": parts["kl_z"].mean().item(), "recon_nll": -parts["log_px"].mean().item()}
        if self.plain is not None:
            plain_bound = log_mean_exp(self.log_weights(targets, None, self.K, net=self.plain)[0])
            loss = loss - plain_bound.mean()  # disjoint parameters: one backward serves both
            losses["plain_vae_nll_bound"] = -plain_bound.mean().item()
        opts = [o for o in (self.opt, self.plain_opt) if o is not None]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(*self.networks().values())
        for o in opts:
            o.step()
        self.last_memory = None if memory is None else memory.detach()
        self.last_targets = targets.detach()
        return losses

    def _training_memory(self, batch: torch.Tensor):
        """(M, targets) for a minibatch: learned M and the whole batch, or (data) a draw from the
        pool disjoint from the batch, the batch split in two while the pool has nothing else."""
        if not self.net.has_memory:
            return None, batch
        if self.source == "learned":
            return self.net.memory, batch
        u8 = to_uint8(batch)
        self._remember(_all_gathered(u8))
        keys = image_keys(u8)
        batch_keys = set(keys)
        eligible = [i for i, k in enumerate(self.pool_keys.tolist()) if k not in batch_keys]
        if eligible:
            pick = torch.randperm(len(eligible))[: self.memory_size]  # torch's RNG: seeded per step
            idx = torch.tensor(eligible)[pick].to(self.device)
            return to_float(self.pool[idx]), batch
        n_mem = min(self.memory_size, batch.shape[0] // 2)
        mem_keys = set(keys[:n_mem])
        rest = [i for i in range(n_mem, batch.shape[0]) if keys[i] not in mem_keys]
        if n_mem == 0 or not rest:
            return None, None
        return batch[:n_mem], batch[torch.tensor(rest, device=self.device)]

    def _remember(self, u8: torch.Tensor) -> None:
        """Add the distinct images of a batch to the pool (FIFO once it holds pool_size)."""
        known = set(self.pool_keys.tolist())
        for img, key in zip(u8, image_keys(u8)):
            if key in known:
                continue
            known.add(key)
            if len(self.pool) < self.pool_size:
                self.pool = torch.cat([self.pool, img[None].to(self.device)])
                self.pool_keys = torch.cat([self.pool_keys, torch.tensor([key])])
            else:
                known.discard(int(self.pool_keys[self.pool_next]))
                self.pool[self.pool_next] = img
                self.pool_keys[self.pool_next] = key
                self.pool_next = (self.pool_next + 1) % self.pool_size

    # ------------------------------------------------------------------ sampling
    def memory_for(self, gen: torch.Generator) -> tuple[torch.Tensor | None, list[int] | None]:
        """M for sampling and the metrics, and its entries' image keys (data memory): the learned
        memory, or a draw of memory.size pool images from ``gen``; before any training batch the
        data memory is one blank image. (None, None) for a plain VAE."""
        if not self.net.has_memory:
            return None, None
        if self.source == "learned":
            return self.net.memory, None
        if len(self.pool) == 0:
            return torch.zeros(1, 3, self.image_size, self.image_size, device=self.device), [-1]
        idx = torch.randperm(len(self.pool), generator=gen)[: self.memory_size]
        return to_float(self.pool[idx.to(self.device)]), self.pool_keys[idx].tolist()

    def as_memory(self, images: torch.Tensor) -> torch.Tensor:
        """A memory given by the caller: uint8 images, or floats in [-1, 1], (M, 3, S, S)."""
        return (to_float(images) if images.dtype == torch.uint8 else images).to(self.device)

    @staticmethod
    def as_uint8(x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x)

    def sample(self, n: int, seed, memory: torch.Tensor | None = None) -> torch.Tensor:
        """a ~ p(a|M), z ~ p(z|m_a), x = decoder mean (``sample_mode: sample`` adds pixel noise).
        ``memory``: draw from these entries (uint8 or [-1, 1] images) instead of the family's M."""
        return self.sample_with_addresses(n, seed, memory=memory)[0]

    def sample_with_addresses(self, n: int, seed, rows: int = 1, memory: torch.Tensor | None = None):
        """(images, the memory entries they came from, None for a plain VAE): ``n // rows``
        addresses drawn from p(a), each used for ``rows`` samples with different z."""
        gen = cpu_generator(seed)
        with self.sampling(self.net, seed=gen):
            entries = None
            if self.net.has_memory:
                memory = self.memory_for(gen)[0] if memory is None else self.as_memory(memory)
                a = torch.multinomial(self.prior_probs(memory).cpu(), max(1, -(-n // rows)), replacement=True,
                                      generator=gen).repeat_interleave(rows)[:n].to(self.device)
                entries = memory[a]
            return self._generate(entries, n, gen), None if entries is None else entries.detach().clamp(-1, 1)

    def generate_from_entries(self, entries: torch.Tensor, per_entry: int, seed) -> torch.Tensor:
        """``per_entry`` samples x ~ p(x|z, m), z ~ p(z|m), from each given entry m (rows in order)."""
        gen = cpu_generator(seed)
        with self.sampling(self.net, seed=gen):
            m = self.as_memory(entries).repeat_interleave(per_entry, 0) if self.net.has_memory else None
            return self._generate(m, len(entries) * per_entry, gen)

    def _generate(self, m: torch.Tensor | None, n: int, gen: torch.Generator) -> torch.Tensor:
        z = noise((n, self.cfg["z_dim"]), gen, self.device)
        pixel = None
        if self.cfg["sample_mode"] == "sample":  # standard logistic noise, logit(u)
            u = torch.rand((n, 3, self.image_size, self.image_size), generator=gen).clamp(1e-6, 1 - 1e-6)
            pixel = (u.log() - (-u).log1p()).to(self.device)
        with self.autocast():
            return self.net.generate(m, z, pixel).float()

    # ------------------------------------------------------------------ metrics
    def posterior_samples(self, u8: torch.Tensor, memory: torch.Tensor | None, mem_keys: list[int] | None,
                          K: int, gen: torch.Generator, net: VMANet | None = None) -> dict[str, torch.Tensor]:
        """K posterior samples for each uint8 image, each target's own image hidden from M:
        ``log_w``, ``log_px``, ``kl_z`` (n, K) and ``log_q``, ``log_p`` (n, M), as float64 on the
        CPU. Call inside ``sampling``; the draws come from ``gen``."""
        net = net or self.net
        e_mem = net.embed_entries(memory) if net.has_memory else None  # h(M) once, not once per chunk
        parts = []
        for chunk in u8.split(max(1, rows_per_forward(self.device) // K)):
            mask = own_image_mask(image_keys(chunk), mem_keys, self.device) if net.has_memory else None
            log_w, _, p = self.log_weights(to_float(chunk.to(self.device)), memory, K, gen, mask, net, e_mem)
            parts.append({"log_w": log_w, "log_px": p["log_px"], "kl_z": p["kl_z"], "log_q": p["log_q"],
                          "log_p": p["log_p"].expand(len(chunk), -1)})
        return {k: torch.cat([p[k] for p in parts]).double().cpu() for k in parts[0]}

    def memory_report(self, images: torch.Tensor, seed: int, suffix: str = "",
                      memory: torch.Tensor | None = None) -> dict[str, float]:
        """The bound and the address statistics on a seeded draw of at most eval_images of the
        uint8 ``images``, with M from ``memory_for(seed)`` (or the ``memory`` given) and each
        target's own image hidden from it (vma_bound.bound_summary lists the values), plus the
        plain VAE's bound on the same images and the memory's gain over it, when it is trained.
        The images are drawn before M, and the plain VAE's draws start where M's would: it sees
        the draws a family with ``memory.size: 0`` and its weights would see."""
        gen = cpu_generator(seed)
        K, dims = self.cfg["eval_samples"], images[0].numel()
        with self.sampling(seed=gen):
            u8 = images[torch.randperm(len(images), generator=gen)[: self.cfg["eval_images"]]]
            after_pick = gen.get_state()
            if memory is None:
                memory, mem_keys = self.memory_for(gen)
            else:
                mem_keys = image_keys(memory) if memory.dtype == torch.uint8 else None
                memory = self.as_memory(memory)
            out = bound_summary(self.posterior_samples(u8, memory, mem_keys, K, gen), K, dims)
            if self.plain is not None:
                s = self.posterior_samples(u8, None, None, K, torch.Generator().set_state(after_pick), self.plain)
                nll = float(-log_mean_exp(s["log_w"]).mean())
                out.update({f"plain_vae_nll_k{K}": nll, f"plain_vae_bpd_k{K}": bits_per_dim(nll, dims),
                            f"memory_gain_k{K}": nll - out[f"nll_k{K}"]})
        return {k + suffix: v for k, v in out.items()}

    def image_bounds(self, u8: torch.Tensor, memory_u8: torch.Tensor | None, gen: torch.Generator,
                     net: VMANet | None = None) -> torch.Tensor:
        """L_K (K = eval_samples) of each uint8 image with the uint8 memory given (targets' own
        images hidden), float64 (n,)."""
        net = net or self.net
        with self.sampling():
            memory = self.as_memory(memory_u8) if net.has_memory else None
            keys = image_keys(memory_u8) if net.has_memory else None
            s = self.posterior_samples(u8, memory, keys, self.cfg["eval_samples"], gen, net)
        return log_mean_exp(s["log_w"])

    def fewshot_set(self) -> FewShotSet:
        if self._fewshot is None:
            self._fewshot = FewShotSet.load(self.cfg["fewshot"]["path"], self.image_size)
        return self._fewshot

    def lookups(self, images: torch.Tensor, seed: int, n: int = 6, top: int = 5) -> tuple[torch.Tensor, int]:
        """(uint8 tiles, tiles per row) for a picture: each of ``n`` images, then its ``top``
        entries by q(a|x)."""
        gen = cpu_generator(seed)
        with self.sampling(self.net, seed=gen):
            memory, mem_keys = self.memory_for(gen)
            u8 = images[torch.randperm(len(images), generator=gen)[:n]]
            log_q, _ = self.address_log_probs(memory, to_float(u8.to(self.device)),
                                              own_image_mask(image_keys(u8), mem_keys, self.device))
            best = log_q.topk(min(top, memory.shape[0]), 1).indices
            rows = [torch.cat([u8[i: i + 1].to(self.device), to_uint8(memory[best[i]])]) for i in range(len(u8))]
        return torch.cat(rows).cpu(), 1 + best.shape[1]

    def pictures(self, out_dir: str, step: int, seed: int) -> list[str]:
        """``memory_samples_<step>.png``: rows of a memory entry drawn from p(a), then 7 samples
        generated from it (different z), as the paper's Figure 4A. None for a plain VAE."""
        if not self.net.has_memory:
            return []
        from sweeper.eval.pictures import save_grid

        x, m = self.sample_with_addresses(6 * 7, seed, rows=7)
        tiles = torch.cat([torch.cat([m[i: i + 1], x[i: i + 7]]) for i in range(0, len(x), 7)])
        return [save_grid(to_uint8(tiles).cpu(), os.path.join(out_dir, f"memory_samples_{step:07d}.png"), nrow=8)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "pool": self.pool.cpu().clone(),
              "pool_keys": self.pool_keys.clone(), "pool_next": self.pool_next,
              "baseline": self.baseline.clone(), "baseline_set": self.baseline_set}
        if self.plain is not None:
            sd.update(plain=self.plain.state_dict(), plain_opt=self.plain_opt.state_dict())
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.load_state_dict(sd["net"])
        self.opt.load_state_dict(sd["opt"])
        if self.plain is not None:
            self.plain.load_state_dict(sd["plain"])
            self.plain_opt.load_state_dict(sd["plain_opt"])
        self.pool = sd["pool"].to(self.device)
        self.pool_keys, self.pool_next = sd["pool_keys"].clone(), int(sd["pool_next"])
        self.baseline, self.baseline_set = sd["baseline"].clone(), bool(sd["baseline_set"])


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over data-parallel ranks (every rank keeps the same K = 1 baseline)."""
    if not distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _all_gathered(u8: torch.Tensor) -> torch.Tensor:
    """Every data-parallel rank's batch, in rank order, so every rank's pool stays identical."""
    if not distributed():
        return u8
    parts = [torch.empty_like(u8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, u8.contiguous())
    return torch.cat(parts)


@register_metric("vma_memory", family="vma_vae", reports=(
    "nll_k*", "bpd_k*", "memory_gain_k*", "plain_vae_*", "address_*", "entries_effectively_used*", "recon_nll*",
    "z_kl*", "fewshot_*"))
def vma_memory_metric(ctx) -> dict[str, float]:
    """The bound and the memory's use on the training images and (``*_heldout``) on the images
    the evaluation holds back, the few-shot curve when ``fewshot.path`` is set, and pictures:
    ``address_lookups_<step>.png`` (training images beside the entries q(a|x) ranks highest) and
    ``fewshot_samples_<step>.png`` (exemplars of unseen classes beside samples generated from them)."""
    from sweeper.eval.pictures import save_grid

    fam = ctx.model
    out = fam.memory_report(ctx.real_images, ctx.seed)
    held = ctx.heldout_images
    if held is not None and len(held):
        out.update(fam.memory_report(held, ctx.seed, suffix="_heldout"))
    if fam.net.has_memory:
        tiles, per_row = fam.lookups(ctx.real_images, ctx.seed)
        ctx.add_artifact(save_grid(tiles, ctx.path("address_lookups"), nrow=per_row))
    if fam.cfg["fewshot"]["path"]:
        fs = fam.fewshot_set()
        out.update(fewshot_report(fam, fs, ctx.seed))
        ctx.add_artifact(save_grid(fewshot_tiles(fam, fs, ctx.seed), ctx.path("fewshot_samples"), nrow=8))
    return out

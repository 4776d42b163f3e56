"""Few-shot generation from a chosen memory: the VMA-VAE's analogue of the paper's Fig. 5 and Table 1.

    fs = FewShotSet.load("builtin:digits/evaluation", image_size=32)   # classes unseen in training
    ep = episodes(fs.labels, classes=2, shots=[1, 4], targets=4, seed=1234)
    ep.related[4][c]     # indices of M for class c's targets: 4 exemplars of c and of 1 other class
    ep.unrelated[4][c]   # the same size, 4 exemplars of each of 2 classes other than c

For every class c of the folder, ``targets`` images are held back as targets and the rest are
exemplars. A *related* memory holds ``shots`` exemplars of c and of ``classes - 1`` other classes;
an *unrelated* one holds ``shots`` exemplars of ``classes`` classes other than c. Both have
|M| = classes x shots and share the ``classes - 1`` confounding classes, so they differ only in
whether the target's own class is present. The confounders are a seeded draw per class and the
exemplars of a class the first ones of one seeded permutation, so the memories for 1, 2, 4 shots
are nested and every trial of a sweep sees the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sweeper.errors import SweeperError


@dataclass
class FewShotSet:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # (N,) class index
    names: list[str]  # class folder names

    @classmethod
    def load(cls, path: str, image_size: int) -> "FewShotSet":
        from sweeper.store.data import load_labelled_images

        images, labels, names = load_labelled_images(path, image_size)
        return cls(images, labels, names)


@dataclass
class Episodes:
    targets: dict[int, torch.Tensor]  # class -> indices of its targets
    related: dict[int, dict[int, torch.Tensor]]  # shots -> class -> indices of M
    unrelated: dict[int, dict[int, torch.Tensor]]


def check_sizes(counts: list[int], classes: int, shots: list[int], targets: int, where: str) -> None:
    """One line naming what a folder lacks for the few-shot evaluation (images per class, classes)."""
    if len(counts) < classes + 1:
        raise SweeperError(f"model.fewshot.classes: {classes} classes per memory need {classes + 1} classes in "
                           f"{where} (an unrelated memory leaves the target's out), it has {len(counts)}; "
                           f"lower model.fewshot.classes or add class folders")
    need = targets + max(shots)
    if min(counts) < need:
        raise SweeperError(f"model.fewshot.shots: a class of {where} has {min(counts)} images, fewer than "
                           f"fewshot.targets + max(fewshot.shots) = {need}; lower them or add images")


def episodes(labels: torch.Tensor, classes: int, shots: list[int], targets: int, seed: int) -> Episodes:
    gen = torch.Generator().manual_seed(int(seed))
    n_cls = int(labels.max()) + 1
    check_sizes(torch.bincount(labels, minlength=n_cls).tolist(), classes, shots, targets, "the few-shot folder")
    order = {}
    for c in range(n_cls):
        idx = torch.nonzero(labels == c)[:, 0]
        order[c] = idx[torch.randperm(len(idx), generator=gen)]
    out = Episodes({c: order[c][:targets] for c in range(n_cls)}, {n: {} for n in shots}, {n: {} for n in shots})
    for c in range(n_cls):
        others = [k for k in torch.randperm(n_cls, generator=gen).tolist() if k != c]
        for n in shots:
            out.related[n][c] = torch.cat([order[k][targets:targets + n] for k in [c] + others[:classes - 1]])
            out.unrelated[n][c] = torch.cat([order[k][targets:targets + n] for k in others[:classes]])
    return out


def fewshot_report(fam, fs: FewShotSet, seed: int) -> dict[str, float]:
    """The held-out bound (nats per image) of every target with a related and an unrelated memory
    of each size, ``fewshot_nll_k<K>_m<|M|>_related`` / ``_unrelated``, and the plain VAE's on the
    same targets, ``fewshot_plain_vae_nll_k<K>`` (the paper's C = 0 point), when it is trained."""
    cfg = fam.cfg["fewshot"]
    ep = episodes(fs.labels, cfg["classes"], cfg["shots"], cfg["targets"], seed)
    K = fam.cfg["eval_samples"]
    n_targets = sum(len(t) for t in ep.targets.values())
    out = {}
    for n in cfg["shots"]:
        for kind, memories in (("related", ep.related[n]), ("unrelated", ep.unrelated[n])):
            gen = torch.Generator().manual_seed(int(seed))  # the same stream for every memory
            total = sum(float(fam.image_bounds(fs.images[ep.targets[c]], fs.images[memories[c]], gen).sum())
                        for c in ep.targets)
            out[f"fewshot_nll_k{K}_m{cfg['classes'] * n}_{kind}"] = -total / n_targets
    if fam.plain is not None:
        every = torch.cat(list(ep.targets.values()))
        gen = torch.Generator().manual_seed(int(seed))
        out[f"fewshot_plain_vae_nll_k{K}"] = -float(fam.image_bounds(fs.images[every], None, gen, fam.plain).mean())
    return out


def fewshot_tiles(fam, fs: FewShotSet, seed: int, per_entry: int = 7, rows: int = 6) -> torch.Tensor:
    """uint8 tiles for a picture: per row one exemplar of a class unseen in training (the memory
    entry), then ``per_entry`` samples generated from it (the paper's Fig. 4A)."""
    ep = episodes(fs.labels, fam.cfg["fewshot"]["classes"], fam.cfg["fewshot"]["shots"],
                  fam.cfg["fewshot"]["targets"], seed)
    first = [ep.related[fam.cfg["fewshot"]["shots"][0]][c][0] for c in sorted(ep.targets)][:rows]
    entries = fs.images[torch.stack(first)]
    x = fam.generate_from_entries(entries, per_entry, seed)
    tiles = [torch.cat([entries[i: i + 1], fam.as_uint8(x[i * per_entry:(i + 1) * per_entry]).cpu()])
             for i in range(len(entries))]
    return torch.cat(tiles)

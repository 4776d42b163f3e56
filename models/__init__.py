"""Model families, registered by name.

A family is one file in this folder that decorates a class with ``@register_model("name")``;
``sweeper/`` only ever calls :func:`build_model` and the :class:`ModelFamily` interface below,
so adding a family is one new file plus one search-space YAML.

>>> from models import build_model
>>> fam = build_model({"family": "moca_fastgan", "width": 0.125}, image_size=32, seed=0)
>>> losses = fam.train_step(real_images_in_minus1_1)          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from sweeper.errors import SweeperError

_REGISTRY: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.family_name = name
        return cls

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def families() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str) -> type:
    _load_all()
    if name not in _REGISTRY:
        raise SweeperError(
            f"model.family: unknown model family {name!r}; registered families: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def build_model(model_cfg: dict[str, Any], image_size: int, seed: int = 0, device: Any = "cpu", **train_kw: Any):
    """Build a model family from its config section (``model:`` in a config YAML)."""
    cls = get_family(model_cfg.get("family", ""))
    return cls(model_cfg, image_size=image_size, seed=seed, device=device, **train_kw)


class ModelFamily:
    """What the trainer and evaluator rely on. Subclasses fill these in.

    - ``DEFAULTS``: the family's config keys with defaults (nested dicts allowed). The config loader
      rejects keys not listed here.
    - ``validate(cfg, image_size)``: classmethod; raises SweeperError naming the key for a bad value.
    - ``generator_ema``: nn.Module, ``generator_ema(z) -> images in [-1, 1]``, shape (n, 3, S, S).
      It may also offer ``cluster_assignments(z) -> (images, assign (n, h, w) long, n_clusters)``
      or return None from it when the model has no clusters.
    - ``z_dim``: latent width.
    - ``train_step(real) -> dict[str, float]``: one G and D update on a batch in [-1, 1].
    - ``state_dict()`` / ``load_state_dict(sd)``: everything needed to resume bit for bit.
    """

    family_name: str = ""
    DEFAULTS: dict[str, Any] = {}
    z_dim: int = 0

    @classmethod
    def validate(cls, cfg: dict[str, Any], image_size: int) -> None:  # pragma: no cover - interface
        return None

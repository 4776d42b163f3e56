"""The family contract, checked for every registered family (a new family is covered by registering it).

Each family is built from its ``TINY`` overrides at 32 px on real faces. The checks are what
``sweeper/`` relies on: shapes and range, deterministic sampling from a seed (common random
numbers across trials), sampling that changes no state, a bit-identical resume, gradients that
reach every trainable parameter, and config validation that names the key.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from models import ModelFamily, build_model, external_families, families, get_family
from sweeper.config.run_config import deep_merge, resolve
from sweeper.store.data import sample_batch
from sweeper.errors import SweeperError
from sweeper.run.trainer import step_seed

SIZE, BATCH, SEED = 32, 4, 3
HALF = 20  # 20 + 20 steps == 40 steps; TINY configs put any phase switch inside the first 40 steps


def model_cfg(name: str) -> dict:
    cls = get_family(name)
    return deep_merge({"family": name, **cls.DEFAULTS}, cls.TINY)


def build(name: str, seed: int = SEED) -> ModelFamily:
    return build_model(model_cfg(name), SIZE, seed=seed)


def train(fam: ModelFamily, images: torch.Tensor, start: int, end: int) -> None:
    """The trainer's seeding and batching, without the rest of the loop."""
    for step in range(start, end):
        torch.manual_seed(step_seed(SEED, step, 0))
        losses = fam.train_step(sample_batch(images, BATCH, SEED, step, True, 0, 1), step)
        assert all(isinstance(v, float) for v in losses.values()), losses


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) state dict, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}.{i}"))
    return out


def assert_same_state(a: dict, b: dict) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"state differs at {differ[:5]}"


# Every family models/ registers (test files register stand-ins of their own, e.g. tests/test_ddp.py).
FAMILIES = [n for n in families() if n not in external_families()]


def test_every_family_is_a_model_family_with_tiny_overrides():
    assert "moca_fastgan" in FAMILIES and "patch_lut" in FAMILIES
    for name in FAMILIES:
        cls = get_family(name)
        assert issubclass(cls, ModelFamily) and cls.family_name == name
        resolve({"model": {"family": name, **cls.TINY}})  # the tiny config is a valid config


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_shape_range_and_determinism_across_fresh_instances(name):
    a, b = build(name), build(name)
    x = a.sample(3, seed=11)
    assert x.shape == (3, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and torch.isfinite(x).all()
    assert torch.equal(x, a.sample(3, seed=11))  # same seed, same images
    assert torch.equal(x, b.sample(3, seed=11))  # another trial with the same weights: same images
    assert not torch.equal(x, a.sample(3, seed=12))
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(x, a.sample(3, seed=gen))  # a CPU generator works as a seed


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_changes_no_state(name, faces):
    fam = build(name)
    train(fam, faces, 0, 2)
    before = copy.deepcopy(fam.state_dict())
    flags = {n: [m.training for m in net.modules()] for n, net in fam.networks().items()}
    fam.sample(4, seed=5)
    assert_same_state(before, fam.state_dict())
    assert flags == {n: [m.training for m in net.modules()] for n, net in fam.networks().items()}


_STRAIGHT: dict[str, tuple[dict[str, torch.Tensor], ModelFamily]] = {}


def trained_straight(name: str, faces: torch.Tensor) -> tuple[dict[str, torch.Tensor], ModelFamily]:
    """(initial trainable parameters, the family after 40 uninterrupted steps), trained once per
    family for the tests that need it."""
    if name not in _STRAIGHT:
        fam = build(name)
        start = {f"{n}.{k}": p.detach().clone() for n, net in fam.networks().items()
                 for k, p in net.named_parameters() if p.requires_grad}
        train(fam, faces, 0, 2 * HALF)
        _STRAIGHT[name] = (start, fam)
    return _STRAIGHT[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_resume_from_a_state_dict_is_bit_identical(name, faces):
    _, straight = trained_straight(name, faces)

    first = build(name)
    train(first, faces, 0, HALF)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # as a checkpoint file holds it
    resumed = build(name, seed=SEED + 1)  # another process; its own init is overwritten
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    train(resumed, faces, HALF, 2 * HALF)

    assert_same_state(straight.state_dict(), resumed.state_dict())
    assert torch.equal(straight.sample(4, seed=1), resumed.sample(4, seed=1))


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_trainable_parameter(name, faces):
    start, fam = trained_straight(name, faces)
    assert start, "no trainable parameters"
    now = {f"{n}.{k}": p for n, net in fam.networks().items() for k, p in net.named_parameters()}
    frozen = [k for k, v in start.items() if torch.equal(v, now[k])]
    assert not frozen, f"{name}: never updated: {frozen[:8]}"


def _positive_numbers(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _positive_numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            out.append((f"{prefix}{k}", v))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_validate_names_the_key_of_a_bad_value(name):
    cls = get_family(name)
    with pytest.raises(SweeperError, match=rf"^data\.image_size: 17 px is not supported by {name}"):
        cls.validate(model_cfg(name), 17)
    knobs = _positive_numbers(cls.DEFAULTS)
    assert knobs, f"{name} has no numeric knob"
    for key, _ in knobs:  # every positive knob rejects a negative value, naming itself
        cfg = model_cfg(name)
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = -1
        with pytest.raises(SweeperError, match=rf"^model\.{key}: "):
            cls.validate(cfg, SIZE)


def test_a_config_without_a_family_lists_the_registered_ones():
    with pytest.raises(SweeperError, match=r"model\.family: missing; name one of the registered families: .*moca_fastgan.*patch_lut"):
        resolve({"model": {}})


@pytest.mark.parametrize("name", FAMILIES)
def test_what_a_family_reports_is_what_it_declares(name, faces, tmp_path):
    """``LOSSES`` and the registered metrics' ``reports`` are what the spec check refuses an
    objective or a constraint against: each name a training step or an evaluation returns must be
    declared (else the check would refuse a metric that exists)."""
    from fnmatch import fnmatchcase

    from sweeper.eval.evaluator import Evaluator
    from sweeper.eval.registry import base_name, metrics_for, reported_names

    fam = build(name)
    images = faces[:40].float() / 127.5 - 1
    returned: set[str] = set()
    for step in range(2 * HALF):  # past any phase switch, so the second phase's losses are seen too
        returned |= set(fam.train_step(sample_batch(images, BATCH, SEED, step, True, 0, 1), step))
    cls = get_family(name)
    assert all(any(fnmatchcase(k, p) for p in cls.LOSSES) for k in returned), (sorted(returned), cls.LOSSES)
    ev = Evaluator(dict(features="randcnn", n_gen=16, batch_size=8, kid_subsets=2, grid_size=0, seed=1, se_splits=2),
                   faces[:40], str(tmp_path / "store"), out_dir=str(tmp_path / "out"), heldout_images=faces[40:50])
    metrics, _ = ev.evaluate(fam, step=2 * HALF)
    patterns = reported_names(metrics_for(name), "randcnn")
    undeclared = sorted({k for k in metrics if not any(fnmatchcase(base_name(k), p) for p in patterns)})
    assert not undeclared, undeclared

"""MoCA-FastGAN as a model family: shapes, insertion layers, ablations, config errors."""

import pytest
import torch

from models import build_model, families, get_family
from models.fastgan import insertion_layers
from models.moca import MoCA
from sweeper.config.run_config import deep_merge
from sweeper.errors import SweeperError

FAM = get_family("moca_fastgan")


def cfg(**moca):
    return deep_merge({"family": "moca_fastgan", **FAM.DEFAULTS},
                      {"width": 0.0625, "z_dim": 16, "moca": {"dim": 8, "clusters": 3, "memory_size": 4, **moca}})


def test_family_is_registered_by_name():
    assert "moca_fastgan" in families()
    with pytest.raises(SweeperError, match="unknown model family 'nope'.*moca_fastgan"):
        get_family("nope")


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_generator_output_shape_for_every_size_and_insertion_layer(size):
    for layer in insertion_layers(size):
        if layer > 64:  # self-attention at 128x128 costs ~30 s per forward on CPU; shape logic is the same
            continue
        fam = build_model(cfg(layer=layer), size, seed=0)
        g = fam.generator.eval()
        out = g(torch.randn(2, 16))
        assert out.shape == (2, 3, size, size)
        assert out.abs().max() <= 1.0
        assert isinstance(g.attn, MoCA) and g.insert_at == layer


def test_insertion_layers_run_from_8_to_half_the_image_size():
    assert insertion_layers(32) == [8, 16]
    assert insertion_layers(256) == [8, 16, 32, 64, 128]


def test_invalid_insertion_layer_lists_the_valid_ones():
    with pytest.raises(SweeperError, match=r"model.moca.layer: .*32 is not valid for 32 px.*\[8, 16\]"):
        FAM.validate(cfg(layer=32), 32)


@pytest.mark.parametrize("key,value,msg", [
    ("memory_size", 0, "memory_size: must be an integer >= 1"),
    ("momentum", 1.5, r"momentum: must be in \[0, 1\]"),
    ("clusters", 0, "clusters: must be an integer >= 1"),
])
def test_bad_moca_values_are_named(key, value, msg):
    with pytest.raises(SweeperError, match=msg):
        FAM.validate(cfg(**{key: value}), 64)


def test_attention_off_is_plain_fastgan():
    fam = build_model(cfg(attention=False), 32, seed=0)
    assert fam.generator.attn is None
    assert not any(isinstance(m, MoCA) for m in fam.generator.modules())
    assert fam.generator.cluster_assignments(torch.randn(2, 16)) is None


def test_memory_off_keeps_self_attention_without_memory():
    fam = build_model(cfg(memory=False), 32, seed=0)
    assert isinstance(fam.generator.attn, MoCA) and not fam.generator.attn.use_memory
    before = fam.generator.attn.memory.clone()
    fam.train_step(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.equal(before, fam.generator.attn.memory)


def test_one_cluster_trains():
    fam = build_model(cfg(clusters=1), 32, seed=0)
    losses = fam.train_step(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_cluster_assignments_cover_the_layer_resolution():
    fam = build_model(cfg(layer=16), 32, seed=0)
    img, assign, k = fam.generator_ema.cluster_assignments(torch.randn(3, 16))
    assert img.shape == (3, 3, 32, 32) and assign.shape == (3, 16, 16) and k == 3
    assert int(assign.min()) >= 0 and int(assign.max()) < 3


def test_ema_generator_reads_the_memory_the_training_generator_writes():
    fam = build_model(cfg(), 32, seed=0)
    for _ in range(2):
        fam.train_step(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.equal(fam.generator.attn.memory, fam.generator_ema.attn.memory)
    assert torch.equal(fam.generator.attn.phi_k.weight, fam.generator_ema.attn.phi_k.weight)


def test_l1_reconstruction_is_used_when_lpips_weights_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fam = build_model(cfg(), 32, seed=0)
    assert fam.recon_kind == "l1"
    with pytest.raises(SweeperError, match="recon_loss: lpips needs"):
        build_model({**cfg(), "recon_loss": "lpips"}, 32, seed=0)

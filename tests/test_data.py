"""The image-folder loader, the built-in few-shot set, and batch sampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from sweeper.store.data import batch_indices, builtin_lfw_faces, load_images, sample_batch
from sweeper.errors import SweeperError


def test_builtin_lfw_faces_is_100_real_face_crops(tmp_path):
    folder = builtin_lfw_faces(tmp_path)
    imgs = load_images(str(folder), 32)
    assert imgs.shape == (100, 3, 32, 32) and imgs.dtype == torch.uint8
    assert imgs.float().std() > 20  # real pictures, not a constant


def test_loader_reads_all_formats_recursively_and_converts_to_rgb(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("L", (40, 20), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(tmp_path / "sub" / "clear.webp")
    Image.new("RGB", (50, 50), (0, 255, 0)).save(tmp_path / "sub" / "green.JPG")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = load_images(str(tmp_path), 16)
    assert imgs.shape == (4, 3, 16, 16)
    means = {tuple(int(v) for v in im.float().mean((1, 2)).round()) for im in imgs}
    assert (255, 255, 255) in means  # fully transparent RGBA composited on white
    assert (128, 128, 128) in means  # grayscale to RGB


def test_centre_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # white middle third: the square centre crop is all white
    Image.fromarray(arr).save(tmp_path / "wide.png")
    imgs = load_images(str(tmp_path), 20)
    assert int(imgs.min()) == 255


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SweeperError, match="does not exist"):
        load_images(str(tmp_path / "nope"), 32)


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SweeperError, match="holds no images"):
        load_images(str(tmp_path), 32)


def test_unreadable_image_is_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SweeperError, match="broken.png: unreadable image"):
        load_images(str(tmp_path), 8)


def test_fewer_images_than_the_batch_is_a_clear_error(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(SweeperError, match="holds 3 images, fewer than train.batch_size=8"):
        load_images(str(tmp_path), 8, min_count=8)


def test_batches_visit_every_image_once_per_epoch():
    seen = torch.cat([batch_indices(10, 5, seed=1, step=s) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 5, 1, 7), batch_indices(10, 5, 1, 7))


def test_rank_slices_make_up_the_global_batch():
    imgs = torch.randint(0, 255, (12, 3, 4, 4), dtype=torch.uint8)
    whole = sample_batch(imgs, 4, seed=0, step=3)
    parts = torch.cat([sample_batch(imgs, 4, 0, 3, rank=r, world=2) for r in range(2)])
    assert torch.equal(whole, parts)

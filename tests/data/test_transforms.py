"""Batch transforms: shape, dtype and range; channels lifted or reduced; per-sample augmentation
that is repeatable under a seed; bad augment keys."""

from __future__ import annotations

import time

import pytest
import torch

from ufo.data import DEFAULT_MEAN, DEFAULT_STD, build_transform, load_recipe
from ufo.data.transforms import post_transform
from ufo.errors import ConfigError, DataError

ALL_AUG = dict(hflip=True, crop_padding=4, random_resized_crop=True, rotation=15.0, random_erasing=0.5)


@pytest.fixture(scope="module")
def gray() -> torch.Tensor:
    return load_recipe("digits").images[:64]  # (64, 1, 8, 8) uint8, real digits


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)


def test_eval_shape_dtype_range(gray: torch.Tensor):
    tf = build_transform(32)
    y = tf(gray)
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    assert y.min() >= -1.0 and y.max() <= 1.0 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # grayscale lifted
    assert DEFAULT_MEAN == (0.5, 0.5, 0.5) and DEFAULT_STD == (0.5, 0.5, 0.5)


def test_no_resize_when_already_that_size(rgb: torch.Tensor):
    y = build_transform(32)(rgb)
    assert torch.allclose(y, rgb.float() / 255 * 2 - 1, atol=1e-6)


def test_single_image_and_in_chans_1(rgb: torch.Tensor):
    tf = build_transform(16, in_chans=1, mean=(0.5,), std=(0.25,))
    one = tf(rgb[0])
    assert one.shape == (1, 16, 16)
    assert torch.allclose(one, tf(rgb)[0])


def test_train_without_augment_equals_eval(gray: torch.Tensor):
    assert torch.equal(build_transform(24, train=True)(gray), build_transform(24)(gray))


def test_augmentations_are_per_sample_and_seeded(rgb: torch.Tensor):
    same = rgb[:1].expand(16, -1, -1, -1).contiguous()
    for key, val in ALL_AUG.items():
        tf = build_transform(32, train=True, augment={key: val})
        torch.manual_seed(1)
        y = tf(same)
        assert y.shape == (16, 3, 32, 32) and torch.isfinite(y).all()
        distinct = len({row.numpy().tobytes() for row in y})
        assert distinct > 1, f"{key}: every sample got the same random parameters"
        torch.manual_seed(1)
        assert torch.equal(tf(same), y), f"{key}: not repeatable under torch.manual_seed"


def test_hflip_and_crop_are_exact(rgb: torch.Tensor):
    x = rgb[:8]
    base = build_transform(32)(x)
    y = build_transform(32, train=True, augment={"hflip": True})(x)
    for i in range(8):
        assert torch.equal(y[i], base[i]) or torch.equal(y[i], base[i].flip(-1))
    y = build_transform(32, train=True, augment={"crop_padding": 2})(x)
    padded = torch.nn.functional.pad(base, (2, 2, 2, 2), value=-1.0)  # zero pixels normalise to -1
    for i in range(8):
        assert any(torch.equal(y[i], padded[i, :, a : a + 32, b : b + 32]) for a in range(5) for b in range(5))


def test_generator_argument(rgb: torch.Tensor):
    tf = build_transform(32, train=True, augment=ALL_AUG)
    a = tf(rgb, generator=torch.Generator().manual_seed(5))
    b = tf(rgb, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_input_and_keys(rgb: torch.Tensor):
    with pytest.raises(ConfigError, match=r"unknown augment key\(s\) \['flip'\]; known keys: hflip"):
        build_transform(32, train=True, augment={"flip": True})
    with pytest.raises(ConfigError, match="random_erasing is a probability"):
        build_transform(32, train=True, augment={"random_erasing": 2})
    with pytest.raises(ConfigError, match="mean has 2 values"):
        build_transform(32, mean=(0.5, 0.5))
    tf = build_transform(32)
    with pytest.raises(DataError, match="1 or 3 channels"):
        tf(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"\(C, H, W\) or batch"):
        tf(torch.zeros(8, 8, dtype=torch.uint8))


def test_batch_is_fast(rgb: torch.Tensor):
    x = rgb.repeat(4, 1, 1, 1)  # 128 images
    tf = build_transform(32, train=True, augment=ALL_AUG)
    tf(x)
    t = time.perf_counter()
    for _ in range(5):
        tf(x)
    per_batch = (time.perf_counter() - t) / 5
    assert per_batch < 0.25, f"{per_batch * 1e3:.0f} ms for a batch of 128 (expect ~10 ms)"


def test_batch_augmentations_run_on_the_batch_device():
    """A streamed task's batches are normalised and erased on the GPU when there is one. The draws
    stay on the CPU (its generator) and what they build moves to the batch's device. The meta device
    stands in for CUDA here: an op mixing a CPU mask or grid with a meta batch fails, as on CUDA."""
    every = {"random_erasing": 1.0, "hflip": True, "crop_padding": 2, "rotation": 10, "random_resized_crop": 0.5}
    for tf in (
        post_transform(16, train=True, augment={"random_erasing": 1.0}),
        build_transform(16, train=True, augment=every),
    ):
        y = tf(torch.zeros(4, 3, 16, 16, dtype=torch.uint8, device="meta"))
        assert y.device.type == "meta" and y.shape == (4, 3, 16, 16) and y.dtype == torch.float32

"""The paper's view augmentation, checked against torchvision and hand-made images."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.augment import (
    ViewAugment,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    center_view,
    gaussian_blur,
)
from mvmr_hf.errors import ConfigError

# Only the geometry: no jitter, no grayscale, a 1-tap (identity) blur.
GEOMETRY_ONLY = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_kernel_fraction": 0.0}


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Three real 64x64 photographs from scikit-image, float in [0, 1]."""
    images = [data.astronaut(), data.coffee(), data.chelsea()]
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255 for im in images]
    return torch.stack(
        [TF.resize(TF.center_crop(t, [min(t.shape[-2:])] * 2), [64], antialias=True) for t in tensors]
    )


def _params(batch: int, side: int, **overrides: torch.Tensor) -> ViewParams:
    """Parameters that leave the image unchanged, with some fields overridden."""
    fields = {
        "crop_boxes": torch.tensor([[0.0, 0.0, side, side]], dtype=torch.float64).repeat(batch, 1),
        "flip": torch.zeros(batch, dtype=torch.bool),
        "jitter": torch.zeros(batch, dtype=torch.bool),
        "jitter_factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(batch, 1),
        "jitter_order": torch.arange(4).repeat(batch, 1),
        "grayscale": torch.zeros(batch, dtype=torch.bool),
        "blur_sigma": torch.ones(batch, dtype=torch.float64),
    }
    fields.update(overrides)
    return ViewParams(**fields)


def test_seeded_generator_makes_views_reproducible(photos: torch.Tensor) -> None:
    augment = ViewAugment(32)
    first = augment(photos, generator=torch.Generator().manual_seed(7))
    again = augment(photos, generator=torch.Generator().manual_seed(7))
    other = augment(photos, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_every_sample_gets_its_own_parameters(photos: torch.Tensor) -> None:
    same = photos[:1].repeat(6, 1, 1, 1)
    augment = ViewAugment(32)
    params = augment.sample(6, 64, 64, generator=torch.Generator().manual_seed(0))
    for field in ("crop_boxes", "jitter_factors", "blur_sigma"):
        rows = getattr(params, field).reshape(6, -1)
        assert len({tuple(row.tolist()) for row in rows}) == 6, field
    views = augment.apply(same, params).flatten(1)
    assert torch.cdist(views, views).fill_diagonal_(1.0).min() > 0.1


def test_sampled_parameters_follow_the_configured_distributions() -> None:
    augment = ViewAugment(32)
    n, height, width = 4000, 60, 90
    params = augment.sample(n, height, width, generator=torch.Generator().manual_seed(1))
    left, top, right, bottom = params.crop_boxes.unbind(1)
    crop_w, crop_h = right - left, bottom - top
    assert (left >= 0).all()
    assert (top >= 0).all()
    assert (right <= width).all()
    assert (bottom <= height).all()
    assert torch.equal(params.crop_boxes, params.crop_boxes.round())  # integer pixel boxes, like torchvision
    # Area and aspect within the ranges, up to rounding the sides to integers.
    area = crop_w * crop_h / (height * width)
    assert area.min() > 0.08 * 0.8
    assert area.max() <= 1.0
    assert (crop_w / crop_h).min() > 0.75 * 0.9
    assert (crop_w / crop_h).max() < 4 / 3 / 0.9
    for flag, p in ((params.flip, 0.5), (params.jitter, 0.8), (params.grayscale, 0.2)):
        assert abs(flag.double().mean().item() - p) < 0.03
    brightness, contrast, saturation, hue = params.jitter_factors.unbind(1)
    for factor in (brightness, contrast, saturation):
        assert factor.min() >= 0.2
        assert factor.max() <= 1.8
    assert hue.abs().max() <= 0.2
    assert hue.min() < -0.19
    assert params.blur_sigma.min() >= 0.1
    assert params.blur_sigma.max() <= 2.0
    orders = {tuple(row.tolist()) for row in params.jitter_order}
    assert orders == set(itertools.permutations(range(4)))


def test_full_crop_with_forced_flip_is_the_mirrored_resized_image(photos: torch.Tensor) -> None:
    augment = ViewAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, **GEOMETRY_ONLY)
    views = augment(photos)
    # 64 -> 32 is an exact 2x2 area average; computed independently in numpy.
    expected = photos.numpy().reshape(3, 3, 32, 2, 32, 2).mean(axis=(3, 5))[..., ::-1]
    np.testing.assert_allclose(views.numpy(), expected, atol=1e-6)
    same_size = ViewAugment(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, **GEOMETRY_ONLY)
    assert torch.equal(same_size(photos), photos.flip(-1))


def test_crop_box_is_cut_exactly(photos: torch.Tensor) -> None:
    boxes = torch.tensor([[5.0, 9.0, 21.0, 25.0], [40.0, 0.0, 56.0, 16.0], [0.0, 48.0, 16.0, 64.0]])
    views = ViewAugment(16).apply(photos, _params(3, 64, crop_boxes=boxes.double()))  # 16 px: 1-tap blur
    for view, image, (left, top, right, bottom) in zip(views, photos, boxes.long().tolist(), strict=True):
        torch.testing.assert_close(view, image[:, top:bottom, left:right], atol=1e-6, rtol=0)


def test_non_square_image_falls_back_to_the_centre_square() -> None:
    image = torch.rand(1, 3, 6, 10)
    # A square crop of the whole area never fits a 6x10 image: torchvision's fallback is the centre square.
    view = ViewAugment(6, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, **GEOMETRY_ONLY)(image)
    assert torch.equal(view, image[..., 2:8])


def test_grayscale_gives_three_equal_luma_channels(photos: torch.Tensor) -> None:
    options = {**GEOMETRY_ONLY, "grayscale_p": 1.0}
    views = ViewAugment(64, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, **options)(photos)
    luma = 0.2989 * photos[:, 0] + 0.587 * photos[:, 1] + 0.114 * photos[:, 2]
    for channel in range(3):
        torch.testing.assert_close(views[:, channel], luma, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.2, 1.0, 1.8]),
        (adjust_contrast, TF.adjust_contrast, [0.2, 1.0, 1.8]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.8]),
        (adjust_hue, TF.adjust_hue, [-0.5, 0.13, 0.2]),
    ],
)
def test_per_sample_jitter_equals_torchvision(photos, ours, theirs, factors) -> None:
    result = ours(photos, torch.tensor(factors))
    for image, out, factor in zip(photos, result, factors, strict=True):
        torch.testing.assert_close(out, theirs(image, factor), atol=1e-4, rtol=0)


def test_jitter_runs_in_each_samples_own_order(photos: torch.Tensor) -> None:
    factors = torch.tensor([1.5, 0.5, 1.7, 0.15], dtype=torch.float64).repeat(3, 1)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    params = _params(
        3, 64, jitter=torch.ones(3, dtype=torch.bool), jitter_factors=factors, jitter_order=orders
    )
    augment = ViewAugment(64, blur_kernel_fraction=0.0)
    views = augment.apply(photos, params)
    ops = [
        lambda im: TF.adjust_brightness(im, 1.5),
        lambda im: TF.adjust_contrast(im, 0.5),
        lambda im: TF.adjust_saturation(im, 1.7),
        lambda im: TF.adjust_hue(im, 0.15),
    ]
    for view, image, order in zip(views, photos, orders.tolist(), strict=True):
        expected = image
        for op_index in order:
            expected = ops[op_index](expected)
        torch.testing.assert_close(view, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(views[0], views[1], atol=1e-2)  # the order matters


def test_blur_equals_torchvision_per_sample(photos: torch.Tensor) -> None:
    sigmas = [0.1, 0.8, 2.0]
    blurred = gaussian_blur(photos, 7, torch.tensor(sigmas))
    for image, out, sigma in zip(photos, blurred, sigmas, strict=True):
        torch.testing.assert_close(out, TF.gaussian_blur(image, [7, 7], [sigma]), atol=1e-5, rtol=0)


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side() -> None:
    augment = ViewAugment(224)
    assert [augment.blur_kernel_size(s) for s in (224, 96, 64, 32, 8)] == [23, 9, 7, 3, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_output_shape_range_dtype_device(photos: torch.Tensor, dtype: torch.dtype) -> None:
    views = ViewAugment(24)(photos.to(dtype))
    assert views.shape == (3, 3, 24, 24)
    assert views.dtype == dtype
    assert views.device == photos.device
    assert views.min() >= 0
    assert views.max() <= 1
    one = ViewAugment(40)(torch.rand(1, 3, 37, 53, dtype=dtype))  # B=1, odd sizes, as in a loader worker
    assert one.shape == (1, 3, 40, 40)
    assert ViewAugment(None)(torch.rand(2, 3, 20, 30)).shape == (2, 3, 20, 20)


@pytest.mark.gpu
def test_same_views_on_gpu_as_on_cpu(photos: torch.Tensor) -> None:
    augment = ViewAugment(32)
    cpu = augment(photos, generator=torch.Generator().manual_seed(3))
    gpu = augment(photos.cuda(), generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_center_view_resizes_the_shorter_side_and_crops_the_centre() -> None:
    image = torch.rand(2, 3, 32, 48)
    assert torch.equal(center_view(image, 32), image[..., 8:40])
    wide = center_view(torch.rand(1, 3, 50, 80), 25)
    assert wide.shape == (1, 3, 25, 25)
    # crop_fraction is timm's crop_pct: resize to floor(size / crop_pct), then the centre square.
    photo = photos_like = torch.rand(1, 3, 48, 64)
    cropped = center_view(photos_like, 28, crop_fraction=0.875)
    torch.testing.assert_close(cropped, TF.center_crop(TF.resize(photo, [32], antialias=True), [28, 28]))
    with pytest.raises(ConfigError):
        center_view(photo, 28, crop_fraction=0.0)


@pytest.mark.parametrize(
    "bad",
    [torch.rand(3, 32, 32), torch.rand(2, 1, 32, 32), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "image"],
)
def test_bad_images_raise_config_error(bad) -> None:
    with pytest.raises(ConfigError):
        ViewAugment(16)(bad)
    with pytest.raises(ConfigError):
        center_view(bad, 16)


@pytest.mark.parametrize(
    "options",
    [
        {"size": 0},
        {"scale": (1.0, 0.5)},
        {"scale": 0.5},
        {"ratio": (0.0, 1.0)},
        {"flip_p": 1.5},
        {"jitter": (0.8, 0.8, 0.8, 0.7)},
        {"jitter": (0.8, 0.8, 0.8)},
        {"grayscale_p": -0.1},
        {"blur_kernel_fraction": 1.0},
        {"blur_sigma": (0.0, 2.0)},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    size = options.pop("size", 32)
    with pytest.raises(ConfigError):
        ViewAugment(size, **options)

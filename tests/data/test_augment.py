"""The paper's view augmentation, checked against torchvision and hand-made images."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.data.augment import (
    AUGMENTATIONS,
    CENTER_CROP_FRACTION,
    ViewAugment,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    center_view,
    gaussian_blur,
    parse_augmentations,
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
@pytest.mark.parametrize("augmentations", [AUGMENTATIONS, ("flip", "grayscale"), ()])
def test_same_views_on_gpu_as_on_cpu(photos: torch.Tensor, augmentations: tuple[str, ...]) -> None:
    augment = ViewAugment(32, augmentations=augmentations)
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
        {"augmentations": ("crop", "zoom")},
        {"augmentations": "flip,flip"},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    size = options.pop("size", 32)
    with pytest.raises(ConfigError):
        ViewAugment(size, **options)


# ----------------------------------------------------------------------------- Table 7's switches


def test_parse_augmentations_gives_the_steps_in_the_order_they_run() -> None:
    assert AUGMENTATIONS == ("crop", "flip", "color", "grayscale", "blur")
    assert parse_augmentations("crop,flip,color,grayscale,blur") == AUGMENTATIONS
    assert parse_augmentations(" Blur, crop,") == ("crop", "blur")
    assert parse_augmentations(["grayscale", "flip"]) == ("flip", "grayscale")
    assert parse_augmentations("") == parse_augmentations(()) == ()


@pytest.mark.parametrize(("text", "match"), [("crop,zoom", "'zoom'"), ("flip,crop,flip", "flip twice")])
def test_parse_augmentations_names_the_valid_steps(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as excinfo:
        parse_augmentations(text)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "crop, flip, color, grayscale, blur" in message


SIZE = 56
"""Views of the 64 px photos at 56 px: the non-augmented view resizes them to 56 / 0.875 = 64 px,
i.e. not at all, and keeps pixels 4..59, which a box of 56 px copies exactly (no resampling)."""


def _center(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """The non-augmented view, with torchvision: resize the shorter side to size / 0.875, centre crop."""
    resized = TF.resize(images, [math.floor(size / CENTER_CROP_FRACTION)], antialias=True)
    return TF.center_crop(resized, [size, size])


def _eight(photos: torch.Tensor) -> torch.Tensor:
    return photos[torch.arange(8) % len(photos)]


def _views_and_full_params(augmentations: tuple[str, ...], images: torch.Tensor):
    """The views a subset makes, and the parameters the full augmentation draws from the same seed.

    Seed 0 draws, for 8 images, 5 flips, 6 jitters and 2 grayscales: both branches of each.
    """
    height, width = images.shape[-2:]
    augment = ViewAugment(SIZE, augmentations=augmentations)
    params = augment.sample(len(images), height, width, generator=torch.Generator().manual_seed(0))
    full = ViewAugment(SIZE).sample(len(images), height, width, generator=torch.Generator().manual_seed(0))
    return augment.apply(images, params), full


def test_without_augmentation_the_view_is_the_non_augmented_view(photos: torch.Tensor) -> None:
    views = ViewAugment(SIZE, augmentations=())(photos)
    torch.testing.assert_close(views, _center(photos), atol=1e-6, rtol=0)
    # Other shapes and sizes: the same framing (offsets rounded half to even, a truncated longer
    # side), the views differing only by the filter, roi_align's box average against torchvision's
    # antialiasing: 0.4-3.3 gray levels on average (measured); a centred square of exactly 0.875 of
    # the shorter side, up to 0.6 output pixels off that framing, gave up to 11.
    for image in (data.astronaut()[:300, :400], data.coffee(), data.astronaut()[:, :300]):
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        for size in (32, 56, 224):
            view = ViewAugment(size, augmentations="")(tensor)
            assert (view - _center(tensor, size)).abs().mean() * 255 < 4.0, (image.shape, size)


def test_flip_alone_flips_the_non_augmented_view_where_the_full_run_flips(photos: torch.Tensor) -> None:
    images = _eight(photos)
    views, full = _views_and_full_params(("flip",), images)
    assert 0 < full.flip.sum() < len(images)
    center = _center(images)
    for view, image, flip in zip(views, center, full.flip.tolist(), strict=True):
        expected = TF.horizontal_flip(image) if flip else image
        torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)


def test_color_alone_is_torchvisions_jitter_where_the_full_run_jitters(photos: torch.Tensor) -> None:
    images = _eight(photos)
    views, full = _views_and_full_params(("color",), images)
    assert 0 < full.jitter.sum() < len(images)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    rows = zip(views, _center(images), full.jitter, full.jitter_factors, full.jitter_order, strict=True)
    for view, expected, jitter, factors, order in rows:
        for op_index in order.tolist() if jitter else []:
            expected = ops[op_index](expected, factors[op_index].item())
        torch.testing.assert_close(view, expected, atol=1e-4, rtol=0)


def test_grayscale_alone_is_torchvisions_grayscale_where_the_full_run_draws_it(photos: torch.Tensor) -> None:
    images = _eight(photos)
    views, full = _views_and_full_params(("grayscale",), images)
    assert 0 < full.grayscale.sum() < len(images)
    for view, image, gray in zip(views, _center(images), full.grayscale.tolist(), strict=True):
        expected = TF.rgb_to_grayscale(image, num_output_channels=3) if gray else image
        torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)


def test_blur_alone_is_torchvisions_blur_with_the_full_runs_sigma(photos: torch.Tensor) -> None:
    views, full = _views_and_full_params(("blur",), photos)
    kernel = int(0.1 * SIZE) // 2 * 2 + 1  # the paper's 0.1 of the image side, odd: 5 px
    for view, image, sigma in zip(views, _center(photos), full.blur_sigma.tolist(), strict=True):
        torch.testing.assert_close(
            view, TF.gaussian_blur(image, [kernel, kernel], [sigma]), atol=1e-5, rtol=0
        )


def test_crop_alone_is_torchvisions_resized_crop_of_the_full_runs_box(photos: torch.Tensor) -> None:
    images = _eight(photos)
    views, full = _views_and_full_params(("crop",), images)
    for view, image, box in zip(views, images, full.crop_boxes.long().tolist(), strict=True):
        left, top, right, bottom = box
        expected = TF.resized_crop(image, top, left, bottom - top, right - left, [SIZE, SIZE], antialias=True)
        # Mostly upsampled crops, where both are bilinear: they differ only at the box's edges, which
        # roi_align samples across (0.01-0.8 gray levels on average, measured).
        assert (view - expected).abs().mean() * 255 < 1.5


def test_every_subset_keeps_the_full_runs_parameters_and_random_stream() -> None:
    height, width = 48, 64  # at 28 px: resized to 32 x 42, the centre 28 px square at (2, 7)
    full_generator = torch.Generator().manual_seed(5)
    full = ViewAugment(28).sample(16, height, width, generator=full_generator)
    center_box = torch.tensor([7 * 64 / 42, 2 * 48 / 32, 35 * 64 / 42, 30 * 48 / 32], dtype=torch.float64)
    for count in range(len(AUGMENTATIONS) + 1):
        for kept in itertools.combinations(AUGMENTATIONS, count):
            generator = torch.Generator().manual_seed(5)
            params = ViewAugment(28, augmentations=kept).sample(16, height, width, generator=generator)
            assert torch.equal(generator.get_state(), full_generator.get_state()), kept
            expected_boxes = full.crop_boxes if "crop" in kept else center_box.expand(16, 4)
            torch.testing.assert_close(params.crop_boxes, expected_boxes, atol=1e-12, rtol=0)
            for name, field in (("flip", "flip"), ("color", "jitter"), ("grayscale", "grayscale")):
                expected = getattr(full, field) if name in kept else torch.zeros(16, dtype=torch.bool)
                assert torch.equal(getattr(params, field), expected), (kept, field)
            assert torch.equal(
                params.blur_sigma, full.blur_sigma if "blur" in kept else torch.zeros(16).double()
            )
            assert torch.equal(params.jitter_factors, full.jitter_factors)
            assert torch.equal(params.jitter_order, full.jitter_order)


def test_sigma_zero_means_no_blur(photos: torch.Tensor) -> None:
    views = ViewAugment(64).apply(photos, _params(3, 64, blur_sigma=torch.tensor([0.0, 1.5, 0.0]).double()))
    assert torch.equal(views[0], photos[0])
    assert torch.equal(views[2], photos[2])
    torch.testing.assert_close(views[1], TF.gaussian_blur(photos[1], [7, 7], [1.5]), atol=1e-5, rtol=0)


def test_the_switches_show_in_the_modules_repr() -> None:
    assert "augmentations=('crop', 'blur')" in repr(ViewAugment(32, augmentations="blur,crop"))
    assert "augmentations=('crop', 'flip', 'color', 'grayscale', 'blur')" in repr(ViewAugment(32))

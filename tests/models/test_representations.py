"""The representation registry and the hand-crafted representations, against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kymatio.scattering2d.frontend.numpy_frontend import ScatteringNumPy2D
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from scipy import ndimage
from skimage import data
from skimage.feature import hog
from torch import nn

from mvmr_hf.errors import ConfigError
from mvmr_hf.models import representations
from mvmr_hf.models.representations import Representation, build, hog_histograms, registry, scattering
from mvmr_hf.models.representations.scattering import Scattering2D

EXPECTED = {  # name: (deterministic, gather)
    "pixels": (True, True),
    "augmented-pixels": (False, True),
    "scatnet": (True, False),
    "hog": (True, True),
    "lsd": (True, True),
}


def _to_batch(*images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float64 (B, 3, H, W) in [0, 1]."""
    return (
        torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images]).double()
        / 255
    )


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real 512x512 photographs (astronaut, and the grayscale camera as RGB), float64."""
    return _to_batch(data.astronaut(), np.repeat(data.camera()[..., None], 3, axis=2))


# ---------------------------------------------------------------- registry and protocol


def test_registry_lists_the_builtin_representations() -> None:
    assert representations.available() == sorted(EXPECTED)


def test_unknown_name_lists_the_known_ones_and_suggests_the_closest() -> None:
    with pytest.raises(
        ConfigError, match=r"did you mean 'hog'\?.*augmented-pixels, hog, lsd, pixels, scatnet"
    ):
        build("hgo")


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("pixels", {"size": 224}),
        ("hog", {"bins": 24}),
        ("hog", {"orientations": 0}),
        ("lsd", {"kernel_size": 4}),
        ("scatnet", {"max_order": 3}),
        ("augmented-pixels", {"flip_p": 2.0}),
        ("augmented-pixels", {"size": 32}),
        ("augmented-pixels", {"flip_probability": 0.5}),
    ],
)
def test_bad_options_raise_config_error(name: str, options: dict) -> None:
    with pytest.raises(ConfigError):
        build(name, **options)


def test_register_adds_a_buildable_representation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @representations.register("channel-means")
    class ChannelMeans(Representation):
        name = "channel-means"

        def compute(self, images: torch.Tensor) -> torch.Tensor:
            return images.mean(dim=(-2, -1))

    assert "channel-means" in representations.available()
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(build("channel-means")(images), images.mean(dim=(-2, -1)))
    with pytest.raises(ValueError, match="already registered"):
        representations.register("channel-means")(ChannelMeans)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_protocol_attributes_frozen_and_no_grad(name: str) -> None:
    module = build(name)
    assert isinstance(module, nn.Module)
    assert module.name == name
    assert (module.deterministic, module.gather) == EXPECTED[name]
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = module(images)
    assert out.shape[0] == 2
    assert out.dtype == torch.float32
    assert not out.requires_grad


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize(
    "bad", [torch.rand(2, 1, 16, 16), torch.rand(3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)]
)
def test_bad_input_raises_config_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)|float images"):
        build(name)(bad)


# ---------------------------------------------------------------- pixels


def test_pixels_is_the_flattened_image() -> None:
    images = torch.rand(2, 3, 5, 7)
    assert torch.equal(build("pixels")(images), images.reshape(2, 105))


def test_augmented_pixels_are_independent_random_views_of_the_same_size() -> None:
    images = torch.rand(1, 3, 24, 24).repeat(4, 1, 1, 1)
    module = build("augmented-pixels")
    torch.manual_seed(0)
    first = module(images)
    torch.manual_seed(0)
    assert torch.equal(module(images), first)  # reproducible from torch's global seed
    assert first.shape == (4, 3 * 24 * 24)
    assert first.min() >= 0
    assert first.max() <= 1
    assert torch.cdist(first, first).fill_diagonal_(1.0).min() > 0  # each sample its own augmentation
    assert not torch.equal(module(images), first)


# ---------------------------------------------------------------- scatnet


def test_scatnet_equals_kymatios_numpy_backend(photos: torch.Tensor) -> None:
    images = torch.nn.functional.interpolate(photos, size=(64, 48), mode="area").float()
    ours = build("scatnet")(images)
    reference = ScatteringNumPy2D(J=2, shape=(64, 48), L=8, max_order=2)(images.numpy())
    assert ours.shape == (2, 3 * 81, 16, 12)
    np.testing.assert_allclose(ours.numpy(), reference.reshape(2, 243, 16, 12), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("J", "L", "max_order", "shape"),
    [(1, 8, 2, (20, 20)), (2, 6, 1, (37, 50)), (3, 4, 2, (40, 33)), (3, 8, 2, (64, 64))],
)
def test_scattering_equals_kymatios_torch_frontend(J: int, L: int, max_order: int, shape: tuple) -> None:  # noqa: N803
    # Several chunks of images (a tiny chunk budget), odd sizes, J=3 (periodization by 4 and 8).
    maps = torch.rand(5, 2, *shape, generator=torch.Generator().manual_seed(J))
    reference = ScatteringTorch2D(J=J, shape=shape, L=L, max_order=max_order)(maps)
    ours = Scattering2D(J, L, max_order, *shape)
    torch.testing.assert_close(ours(maps), reference, atol=1e-6, rtol=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scattering, "_CPU_CHUNK_BYTES", 1)
        torch.testing.assert_close(ours(maps), reference, atol=1e-6, rtol=0)


def test_scatnet_has_762048_values_at_224_px_and_caches_the_transform() -> None:
    module = build("scatnet")
    images = torch.rand(1, 3, 224, 224)
    assert module(images).flatten(1).shape == (1, 762_048)
    module(images)
    assert len(module._transforms) == 1


# ---------------------------------------------------------------- hog


def _skimage_cell_histograms(channel: np.ndarray) -> np.ndarray:
    """skimage's HOG with one-cell blocks, (rows, cols, 24), L1-normalised per cell: h / (sum(h) + 1e-5)."""
    blocks = hog(
        channel,
        orientations=24,
        pixels_per_cell=(8, 8),
        cells_per_block=(1, 1),
        block_norm="L1",
        feature_vector=False,
    )
    return blocks[:, :, 0, 0, :]


def test_hog_without_interpolation_equals_skimage(photos: torch.Tensor) -> None:
    """Hard binning agrees with ``skimage.feature.hog`` to 7.3e-8 (max abs, measured), tested at 1e-6.

    skimage returns block-normalised cells, so both sides are compared as h / (sum(h) + 1e-5)
    with one-cell blocks; the scale is tested separately (cell mass = mean gradient magnitude).
    The residual comes from skimage summing each cell in float32. The images get a 1e-6 dither:
    undithered 8-bit images hold many gradients exactly on a bin edge (45, 90, 135 degrees),
    which each library assigns by its own last-bit rounding of atan2 (22 of 98,304 bins of
    camera differ there).
    """
    dithered = (
        photos
        + torch.rand(photos.shape, generator=torch.Generator().manual_seed(0), dtype=photos.dtype) * 1e-6
    )
    ours = hog_histograms(dithered, orientations=24, cell_size=8, interpolate=False)
    assert ours.shape == (2, 72, 64, 64)
    for image, histograms in zip(dithered.numpy(), ours.numpy(), strict=True):
        for channel in range(3):
            cells = histograms[channel * 24 : (channel + 1) * 24].transpose(1, 2, 0)
            normalised = cells / (cells.sum(axis=-1, keepdims=True) + 1e-5)
            np.testing.assert_allclose(
                normalised, _skimage_cell_histograms(image[channel]), atol=1e-6, rtol=0
            )


def _hand_hog(channel: np.ndarray, orientations: int = 24, cell: int = 8) -> np.ndarray:
    """Linear orientation interpolation, pixel by pixel with the math module: (orientations, rows, cols)."""
    height, width = channel.shape
    rows, cols = height // cell, width // cell
    histogram = np.zeros((orientations, rows, cols))
    width_deg = 180.0 / orientations
    for r in range(rows * cell):
        for c in range(cols * cell):
            d_row = channel[r + 1, c] - channel[r - 1, c] if 0 < r < height - 1 else 0.0
            d_col = channel[r, c + 1] - channel[r, c - 1] if 0 < c < width - 1 else 0.0
            magnitude = math.hypot(d_row, d_col)
            angle = math.degrees(math.atan2(d_row, d_col)) % 180.0
            below = math.floor(angle / width_deg - 0.5)  # the bin centre at or below the angle
            fraction = angle / width_deg - 0.5 - below
            histogram[below % orientations, r // cell, c // cell] += magnitude * (1 - fraction)
            histogram[(below + 1) % orientations, r // cell, c // cell] += magnitude * fraction
    return histogram / cell**2


def test_hog_interpolation_equals_a_hand_computation(photos: torch.Tensor) -> None:
    crop = photos[:1, :, 200:220, 240:264]  # 20x24: 2x3 cells, the last 4 rows outside any cell
    ours = hog_histograms(crop, interpolate=True)[0].reshape(3, 24, 2, 3)
    for channel in range(3):
        np.testing.assert_allclose(ours[channel].numpy(), _hand_hog(crop[0, channel].numpy()), atol=1e-12)


def test_hog_cell_mass_is_the_mean_gradient_magnitude_and_bins_are_non_negative(photos: torch.Tensor) -> None:
    image = photos.numpy()
    g_row = np.zeros_like(image)
    g_col = np.zeros_like(image)
    g_row[..., 1:-1, :] = image[..., 2:, :] - image[..., :-2, :]
    g_col[..., 1:-1] = image[..., 2:] - image[..., :-2]
    mean_magnitude = np.hypot(g_row, g_col).reshape(2, 3, 64, 8, 64, 8).mean(axis=(3, 5))
    for interpolate in (True, False):
        histograms = hog_histograms(photos, interpolate=interpolate).reshape(2, 3, 24, 64, 64)
        assert histograms.min() >= 0
        np.testing.assert_allclose(histograms.sum(dim=2).numpy(), mean_magnitude, atol=1e-12)


def test_hog_of_a_flat_image_is_zero() -> None:
    """The copied snippet's bug sent flat regions fully into bin 0; a flat image has no gradient."""
    assert torch.equal(build("hog")(torch.full((1, 3, 16, 16), 0.4)), torch.zeros(1, 72, 2, 2))


def test_hog_edges_vote_into_the_bins_either_side_of_their_orientation() -> None:
    step = (torch.arange(16) >= 8).double()
    columns_change = step.expand(1, 3, 16, 16)  # gradient along columns: 0 degrees
    rows_change = columns_change.transpose(-1, -2)  # gradient along rows: 90 degrees
    # 0 degrees is the edge between bin 23 (176.25) and bin 0 (3.75); 90 between bins 11 and 12.
    for images, bins in ((columns_change, (23, 0)), (rows_change, (11, 12))):
        histograms = hog_histograms(images).reshape(3, 24, 2, 2)
        per_bin = histograms.sum(dim=(0, 2, 3))
        assert set(torch.nonzero(per_bin).flatten().tolist()) == set(bins)
        torch.testing.assert_close(per_bin[bins[0]], per_bin[bins[1]])


# ---------------------------------------------------------------- lsd


def test_lsd_equals_scipy_generic_filter_std(photos: torch.Tensor) -> None:
    crop = photos[:, :, 100:140, 300:332]
    ours = build("lsd")(crop)
    assert ours.shape == crop.shape
    # torch's "reflect" padding (edge not repeated) is scipy.ndimage's "mirror" mode.
    reference = ndimage.generic_filter(crop.numpy(), np.std, size=(1, 1, 3, 3), mode="mirror")
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)
    np.testing.assert_allclose(build("lsd")(crop.float()).numpy(), reference, atol=1e-6)
    assert torch.equal(build("lsd")(torch.full((1, 3, 6, 6), 0.7)), torch.zeros(1, 3, 6, 6))


# ---------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["pixels", "scatnet", "hog", "lsd"])
def test_gpu_output_matches_cpu(photos: torch.Tensor, name: str) -> None:
    images = torch.nn.functional.interpolate(photos, size=(64, 64), mode="area").float()
    module = build(name)
    gpu = module(images.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), module(images), atol=1e-4, rtol=1e-4)


def test_hog_in_cpu_chunks_equals_the_whole_batch():
    from mvmr_hf.models.representations.handcrafted import CPU_HOG_CHUNK

    images = torch.rand(2 * CPU_HOG_CHUNK + 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(build("hog")(images), hog_histograms(images, 24, 8, True))

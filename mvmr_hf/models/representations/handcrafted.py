"""The hand-crafted representations of section 7, batched in torch on the input's device.

All take float ``(B, 3, H, W)`` images in [0, 1] (the non-augmented view) and work per
colour channel:

* ``pixels``: the image flattened, ``(B, 3·H·W)``.
* ``augmented-pixels``: an independent random augmentation of each image
  (:class:`mvmr_hf.data.augment.ViewAugment`, same size as the input), flattened. Not deterministic.
* ``scatnet``: kymatio's 2-D scattering transform (J=2, L=8, orders 0-2; computed by
  :class:`mvmr_hf.models.representations.scattering.Scattering2D`): 81 maps per colour
  channel at H/4 x W/4, ``(B, 3·81, H/4, W/4)``, 762,048 values for 224 px (``gather=False``).
* ``hog``: histograms of oriented gradients, ``(B, 3·24, H//8, W//8)``: see :func:`hog_histograms`.
* ``lsd``: the 3x3 local standard deviation, ``(B, 3, H, W)``: see :func:`local_std`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# not kymatio.torch, whose 3-D scattering fails to import with SciPy 1.17
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from torch import Tensor, nn

from mvmr_hf.data.augment import ViewAugment
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.representations.registry import Representation, check_options, register
from mvmr_hf.models.representations.scattering import Scattering2D
from mvmr_hf.utils import check_int

__all__ = ["HOG", "LSD", "AugmentedPixels", "Pixels", "ScatNet", "hog_histograms", "local_std"]


def hog_histograms(
    images: Tensor, orientations: int = 24, cell_size: int = 8, interpolate: bool = True
) -> Tensor:
    """Per-channel cell histograms of unsigned gradient orientations, ``(B, C·orientations, H//c, W//c)``.

    Gradients are centred differences ``x[i+1] - x[i-1]`` along rows and columns, zero on
    the first and last row (column), as in ``skimage.feature.hog``. Each pixel's gradient
    magnitude votes for its orientation in [0, 180) degrees; bin ``k`` is centred at
    ``(k + 0.5) · 180 / orientations``. With ``interpolate=True`` the vote is split linearly
    between the two nearest bin centres (weights ``m·(1 - f)`` and ``m·f`` for the fraction
    ``f`` of the way between them, wrapping at 180 degrees); with ``interpolate=False`` the
    whole magnitude goes to the bin holding the orientation (skimage's hard binning). Votes
    are averaged over ``cell_size`` x ``cell_size`` cells (pixels beyond the last full cell are
    dropped, as in skimage), so the bins of a cell sum to its mean gradient magnitude.
    Output channel ``c·orientations + k`` holds bin ``k`` of colour channel ``c``.

    The paper's code used Sobel gradients and a widely copied binning that took the magnitude
    as the interpolation fraction (negative bins, flat regions voting into bin 0); centred
    differences are used here so that ``interpolate=False`` can be tested against skimage.
    Gradients exactly on a bin edge (common in 8-bit images) go to either side depending on
    the last bit of ``atan2``; with interpolation this makes no difference.
    """
    batch, channels, height, width = images.shape
    rows, cols = height // cell_size, width // cell_size
    if rows == 0 or cols == 0:
        raise ConfigError(
            f"HOG needs images of at least {cell_size}x{cell_size} pixels, got {height}x{width}; "
            "use larger images or a smaller cell_size."
        )
    g_row = F.pad(images[..., 2:, :] - images[..., :-2, :], (0, 0, 1, 1))
    g_col = F.pad(images[..., :, 2:] - images[..., :, :-2], (1, 1, 0, 0))
    g_row, g_col = (g[..., : rows * cell_size, : cols * cell_size] for g in (g_row, g_col))
    magnitude = torch.hypot(g_row, g_col).flatten(2)
    position = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180.0).flatten(2) / (180.0 / orientations)
    # Index of each pixel's first bin in the flattened (cell, bin) histogram.
    pixel_row = torch.arange(rows * cell_size, device=images.device) // cell_size
    pixel_col = torch.arange(cols * cell_size, device=images.device) // cell_size
    cell_offset = ((pixel_row[:, None] * cols + pixel_col[None, :]) * orientations).flatten()
    histogram = images.new_zeros(batch, channels, rows * cols * orientations)
    if interpolate:
        position = position - 0.5  # distance in bins from the centre of bin 0
        lower = position.floor()
        upper_vote = magnitude * (position - lower)
        lower_bin = lower.long().remainder(orientations)
        histogram.scatter_add_(2, cell_offset + lower_bin, magnitude - upper_vote)
        histogram.scatter_add_(2, cell_offset + (lower_bin + 1).remainder(orientations), upper_vote)
    else:
        histogram.scatter_add_(2, cell_offset + position.long().remainder(orientations), magnitude)
    histogram = histogram.view(batch, channels, rows, cols, orientations).permute(0, 1, 4, 2, 3)
    return histogram.reshape(batch, channels * orientations, rows, cols) / cell_size**2


def local_std(images: Tensor, kernel_size: int = 3) -> Tensor:
    """Standard deviation (population, ddof=0) over each pixel's ``kernel_size`` square window.

    Borders use reflect padding (``F.pad(mode="reflect")``: the edge pixel is not repeated;
    scipy.ndimage calls this mode ``"mirror"``). The moments are taken of the differences to
    the window's centre pixel, so rounding scales with the local contrast, not with the
    brightness, and a flat window gives exactly 0.
    """
    height, width = images.shape[-2:]
    pad = kernel_size // 2
    if min(height, width) <= pad:
        raise ConfigError(
            f"LSD with a {kernel_size}x{kernel_size} window needs images larger than {pad} pixels "
            f"per side, got {height}x{width}."
        )
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    first = torch.zeros_like(images)
    second = torch.zeros_like(images)
    for dy in range(kernel_size):
        for dx in range(kernel_size):
            difference = padded[..., dy : dy + height, dx : dx + width] - images
            first += difference
            second += difference.square()
    count = kernel_size**2
    return (second / count - (first / count).square()).clamp_(min=0).sqrt_()


@register("pixels")
class Pixels(Representation):
    """The image itself, flattened: ``(B, 3·H·W)``."""

    name = "pixels"

    def compute(self, images: Tensor) -> Tensor:
        return images.flatten(1)


@register("augmented-pixels")
class AugmentedPixels(Representation):
    """An independent random augmentation of each image, flattened: ``(B, 3·H·H)``.

    Keyword arguments go to :class:`~mvmr_hf.data.augment.ViewAugment` (the output keeps the input's
    height as its side). Random numbers come from torch's global generator.
    """

    name = "augmented-pixels"
    deterministic = False

    def __init__(self, **augment_options: Any) -> None:
        super().__init__()
        check_options(ViewAugment, "the 'augmented-pixels' representation", None, **augment_options)
        self.augment = ViewAugment(None, **augment_options)

    def compute(self, images: Tensor) -> Tensor:
        return self.augment(images).flatten(1)


@register("scatnet")
class ScatNet(Representation):
    """Scattering transform per colour channel (kymatio's filters and paths): ``(B, 3·K, H/2^J, W/2^J)``.

    ``K = 1 + J·L + L²·J·(J-1)/2`` maps (81 for J=2, L=8, orders 0-2). Computed in float32. The
    transform is built on first use for each input size and device and kept for reuse: on the CPU
    the project's :class:`~mvmr_hf.models.representations.scattering.Scattering2D` (faster there), on an
    accelerator kymatio's own torch ``Scattering2D``, whose one batched call per wavelet is the
    faster of the two on a GPU (``benchmarks/results/representations-cuda.json``). Both give
    kymatio's coefficients (``tests/models/test_representations.py``).
    """

    name = "scatnet"
    gather = False

    def __init__(self, J: int = 2, L: int = 8, max_order: int = 2) -> None:  # noqa: N803 (kymatio's names)
        super().__init__()
        self.J = check_int("ScatNet J", J)
        self.L = check_int("ScatNet L", L)
        if max_order not in (1, 2):
            raise ConfigError(f"ScatNet max_order must be 1 or 2, got {max_order!r}.")
        self.max_order = max_order
        self._transforms: dict[tuple[int, int, torch.device], nn.Module] = {}

    def _transform(self, height: int, width: int, device: torch.device) -> nn.Module:
        key = (height, width, device)
        if key not in self._transforms:
            if min(height, width) < 2**self.J:
                raise ConfigError(
                    f"ScatNet with J={self.J} needs images of at least {2**self.J} pixels per side, "
                    f"got {height}x{width}; use larger images or a smaller J."
                )
            if device.type == "cpu":
                scattering = Scattering2D(self.J, self.L, self.max_order, height, width)
            else:
                scattering = ScatteringTorch2D(
                    J=self.J, shape=(height, width), L=self.L, max_order=self.max_order
                )
            self._transforms[key] = scattering.to(device)
        return self._transforms[key]

    def compute(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        coefficients = self._transform(height, width, images.device)(images.float())
        return coefficients.flatten(1, 2)


CPU_HOG_CHUNK = 8


@register("hog")
class HOG(Representation):
    """Histograms of oriented gradients per colour channel, ``(B, 3·orientations, H//c, W//c)``.

    Defaults follow section 7: 24 unsigned orientation bins, 8x8-pixel cells averaged, with
    linear interpolation between neighbouring bins. See :func:`hog_histograms`.
    """

    name = "hog"

    def __init__(self, orientations: int = 24, cell_size: int = 8, interpolate: bool = True) -> None:
        super().__init__()
        self.orientations = check_int("HOG orientations", orientations)
        self.cell_size = check_int("HOG cell_size", cell_size)
        self.interpolate = bool(interpolate)

    def compute(self, images: Tensor) -> Tensor:
        # On CPU, chunks of 8 images keep the per-pixel intermediates in cache, which is faster than the
        # whole batch at once (benchmarks/bench_representations.py measures it); the output is the same.
        chunk = CPU_HOG_CHUNK if images.device.type == "cpu" else images.shape[0]
        return torch.cat(
            [
                hog_histograms(part, self.orientations, self.cell_size, self.interpolate)
                for part in images.split(chunk)
            ]
        )


@register("lsd")
class LSD(Representation):
    """Local standard deviation per colour channel over a ``kernel_size`` square, ``(B, 3, H, W)``."""

    name = "lsd"

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        if check_int("LSD kernel_size", kernel_size) % 2 == 0:
            raise ConfigError(
                f"LSD kernel_size must be odd (3 for the paper's 3x3 window), got {kernel_size}."
            )
        self.kernel_size = kernel_size

    def compute(self, images: Tensor) -> Tensor:
        return local_std(images, self.kernel_size)

"""The paper's views (section 7): the augmented view x̃ and the non-augmented view x.

:class:`ViewAugment` draws the augmentation of section 7 with **independent random
parameters per sample** and applies it to a whole batch on the input's device without a
Python loop over images, in this order:

1. random resized crop (torchvision's ``RandomResizedCrop`` rule for ``scale``/``ratio``,
   integer boxes, 10 tries then a centre crop) resized to ``size`` x ``size``;
2. horizontal flip with probability ``flip_p``;
3. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue
   factors drawn like torchvision's ``ColorJitter`` and applied in a random order drawn per
   sample (as ``ColorJitter`` does per call), each op clamping to [0, 1];
4. grayscale with probability ``grayscale_p`` (ITU-R 601-2 luma, three equal channels);
5. Gaussian blur, always, with an odd kernel of about ``blur_kernel_fraction`` of ``size``
   and sigma uniform in ``blur_sigma`` (the paper gives no probability for it).

Each step can be switched off by name (:data:`AUGMENTATIONS`, the paper's Table 7 ablation,
appendix B): ``ViewAugment(224, augmentations=("crop", "flip"))``. The random parameters are
drawn exactly as with all five, so the steps a run keeps get the parameters the full
augmentation would give them; a step switched off is neutralised in :meth:`ViewAugment.sample`
(no crop: the framing of the non-augmented view; no flip, jitter or grayscale; blur sigma 0,
which :meth:`ViewAugment.apply` reads as no blur), so the parameters alone say what was applied.

The crop and resize use :func:`torchvision.ops.roi_align` with adaptive sampling: it
averages ``ceil(crop/size)`` bilinear samples per output pixel and axis, so downscaling a
large crop is anti-aliased (an affine grid with ``grid_sample`` would alias), and a crop
of exactly ``size`` pixels is copied unchanged. :func:`center_view` is the non-augmented
view: resize the shorter side with anti-aliasing, then centre-crop ``size`` x ``size``; the
training data resizes to ``size / CENTER_CROP_FRACTION`` first (256 px for 224), as the paper's
code and timm's evaluation transform do.

The per-sample colour operations (:func:`adjust_brightness`, :func:`adjust_contrast`,
:func:`adjust_saturation`, :func:`adjust_hue`) and :func:`gaussian_blur` take one factor per
sample and equal torchvision's functions of the same name applied image by image.

Example::

    >>> augment = ViewAugment(224)
    >>> views = augment(images01)                  # (B, 3, 224, 224), new parameters per sample
    >>> params = augment.sample(len(images01), 256, 256, generator=torch.Generator().manual_seed(0))
    >>> same = augment.apply(images01, params)     # replay exactly those parameters
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.errors import ConfigError

__all__ = [
    "AUGMENTATIONS",
    "CENTER_CROP_FRACTION",
    "ViewAugment",
    "ViewParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "center_view",
    "check_image_batch",
    "gaussian_blur",
    "parse_augmentations",
]

_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before the centre crop

CENTER_CROP_FRACTION = 0.875
"""The non-augmented training view keeps the central 87.5 % of the resized image (224 of 256 px),
as the paper's code (resize 256, centre crop 224) and timm's ``crop_pct`` do."""

AUGMENTATIONS = ("crop", "flip", "color", "grayscale", "blur")
"""The steps of the augmented view x̃ in the order they run (section 7): random resized crop,
horizontal flip, colour jitter, grayscale, Gaussian blur; the paper's Table 7 ablates them."""


def parse_augmentations(augmentations: str | Iterable[str]) -> tuple[str, ...]:
    """``"flip, crop"`` (or ``["flip", "crop"]``) -> ``("crop", "flip")``: the steps of x̃ to keep.

    Names come from :data:`AUGMENTATIONS`, comma-separated in a string, case and spaces ignored;
    they are returned in the order the steps run, which the listed order does not change. An
    empty string or list keeps none: x̃ is then the non-augmented view's framing.

    Raises:
        ConfigError: an unknown name or a name listed twice.
    """
    items = augmentations.split(",") if isinstance(augmentations, str) else list(augmentations)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    valid = ", ".join(AUGMENTATIONS)
    for name in names:
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"Unknown augmentation {name!r}: --augmentations takes a comma-separated list among {valid}, "
                "or an empty string for none."
            )
        if names.count(name) > 1:
            raise ConfigError(f"--augmentations lists {name} twice: name each of {valid} at most once.")
    return tuple(name for name in AUGMENTATIONS if name in names)


DEFAULT_CROP_SCALE = (0.08, 1.0)
"""Area range of x̃'s random resized crop, as a fraction of the image (paper, section 7)."""


def parse_crop_scale(crop_scale: str | Iterable[float]) -> tuple[float, float]:
    """``"0.5,1"`` (or ``(0.5, 1)``) -> ``(0.5, 1.0)``: the area range of x̃'s random resized crop.

    Raises:
        ConfigError: not two numbers with ``0 < MIN <= MAX <= 1``.
    """
    items = crop_scale.split(",") if isinstance(crop_scale, str) else list(crop_scale)
    try:
        pair = tuple(float(item) for item in items)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= 1:
        raise ConfigError(
            "--crop-scale takes MIN,MAX, the crop's area as a fraction of the image with 0 < MIN <= MAX "
            f"<= 1 (paper: 0.08,1), got {crop_scale!r}."
        )
    return pair[0], pair[1]


def check_image_batch(images01: Tensor, where: str) -> None:
    """Raise :class:`ConfigError` unless ``images01`` is a float ``(B, 3, H, W)`` tensor."""
    if not isinstance(images01, Tensor):
        raise ConfigError(f"{where} expects a torch.Tensor of images, got {type(images01).__name__}.")
    if images01.ndim != 4 or images01.shape[1] != 3 or images01.shape[0] == 0:
        raise ConfigError(
            f"{where} expects images of shape (B, 3, H, W) with B >= 1, got {tuple(images01.shape)}; "
            "add a batch dimension and convert grayscale images to RGB."
        )
    if not images01.is_floating_point():
        raise ConfigError(
            f"{where} expects float images in [0, 1], got {images01.dtype}; "
            "convert with torchvision.transforms.v2.functional.to_dtype(images, torch.float32, scale=True)."
        )


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Shape a (B,) tensor of factors as (B, 1, 1, 1) in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _blend(image: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``factor * image + (1 - factor) * other`` clamped to [0, 1], one factor per sample."""
    ratio = _per_sample(factor, image)
    return (image * ratio + other * (1 - ratio)).clamp_(0, 1)


def adjust_brightness(images01: Tensor, factor: Tensor) -> Tensor:
    """Multiply sample ``i`` by ``factor[i]`` (torchvision's ``adjust_brightness``, per sample)."""
    return (images01 * _per_sample(factor, images01)).clamp_(0, 1)


def adjust_contrast(images01: Tensor, factor: Tensor) -> Tensor:
    """Blend sample ``i`` with the mean of its luma (torchvision's ``adjust_contrast``, per sample)."""
    mean = TF.rgb_to_grayscale(images01).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images01, mean, factor)


def adjust_saturation(images01: Tensor, factor: Tensor) -> Tensor:
    """Blend sample ``i`` with its luma image (torchvision's ``adjust_saturation``, per sample)."""
    return _blend(images01, TF.rgb_to_grayscale(images01), factor)


def _rgb_to_hsv(images01: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    red, green, blue = images01.unbind(dim=-3)
    value = images01.amax(dim=-3)
    chroma = value - images01.amin(dim=-3)
    grey = chroma == 0  # then value == red and the hue below is 0, as in torchvision
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    hue6 = torch.where(
        value == red,
        (green - blue) / safe_chroma,
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    return (hue6 / 6).remainder(1.0), saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    # Channel n in (5, 3, 1) for (R, G, B): v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device).view(3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(-3)).remainder(6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * ramp)


def adjust_hue(images01: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue of sample ``i`` by ``factor[i]`` turns in [-0.5, 0.5] (torchvision's ``adjust_hue``)."""
    hue, saturation, value = _rgb_to_hsv(images01)
    shifted = (hue + factor.to(device=hue.device, dtype=hue.dtype).view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(shifted, saturation, value).clamp_(0, 1)


def gaussian_blur(images01: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Blur sample ``i`` with a ``kernel_size`` Gaussian of std ``sigma[i]`` (reflect padding).

    Equals torchvision's ``gaussian_blur(image, [kernel_size, kernel_size], [sigma[i]])``,
    computed as two grouped 1-D convolutions with one kernel per sample.
    """
    batch, channels, height, width = images01.shape
    taps = torch.arange(kernel_size, dtype=images01.dtype, device=images01.device) - kernel_size // 2
    sig = sigma.to(device=images01.device, dtype=images01.dtype).view(-1, 1)
    kernel = torch.softmax(-0.5 * (taps / sig) ** 2, dim=1).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    planes = F.pad(images01.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    planes = F.conv2d(planes, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    return planes.view(batch, channels, height, width)


_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one :class:`ViewAugment` call, one row per sample.

    Attributes:
        crop_boxes: (B, 4) float64 ``(left, top, right, bottom)`` pixel edges of the crop.
        flip: (B,) bool, whether each sample is flipped horizontally.
        jitter: (B,) bool, whether each sample's colours are jittered.
        jitter_factors: (B, 4) brightness, contrast, saturation and hue factors.
        jitter_order: (B, 4) int64, the order in which the four ops run (indices into that list).
        grayscale: (B,) bool, whether each sample is turned to grayscale.
        blur_sigma: (B,) Gaussian blur std in pixels; 0 means no blur (the blur switched off).
    """

    crop_boxes: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur_sigma: Tensor


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ConfigError(f"ViewAugment {name} must be a (min, max) pair with 0 < min <= max, got {value!r}.")
    return pair[0], pair[1]


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"ViewAugment {name} must be a probability in [0, 1], got {value}.")
    return float(value)


class ViewAugment(nn.Module):
    """The paper's augmentation (section 7), batched, with independent parameters per sample.

    Args:
        size: side of the square output; ``None`` keeps the input's height.
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: ``(brightness, contrast, saturation, hue)`` strengths as in torchvision's
            ``ColorJitter``: factors uniform in ``[max(0, 1 - s), 1 + s]``, hue shift uniform in
            ``[-hue, hue]`` (hue <= 0.5).
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_kernel_fraction: blur kernel side as a fraction of ``size``, rounded down to an
            odd integer (``int(f * size) // 2 * 2 + 1``: 23 px at 224, 9 px at 96).
        blur_sigma: range of the blur's std in pixels.
        augmentations: the steps to apply, among :data:`AUGMENTATIONS` (all five, the paper's
            section 7); a subset is the paper's Table 7 ablation, ``()`` none. Parsed by
            :func:`parse_augmentations`, so a comma-separated string works too.

    ``forward(images01, generator=None)`` takes float ``(B, 3, H, W)`` images in [0, 1] and
    returns ``(B, 3, size, size)`` views in [0, 1], same dtype and device. Random numbers come
    from ``generator`` (any device) or from torch's global generator, so the views do not
    depend on the device the images are on.
    """

    def __init__(
        self,
        size: int | None,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_kernel_fraction: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        augmentations: str | Iterable[str] = AUGMENTATIONS,
    ) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"ViewAugment size must be a positive integer (or None), got {size!r}.")
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ConfigError(
                "ViewAugment jitter must be (brightness, contrast, saturation, hue) with all >= 0 "
                f"and hue <= 0.5, got {jitter}."
            )
        if not 0.0 <= blur_kernel_fraction < 1.0:
            raise ConfigError(
                f"ViewAugment blur_kernel_fraction must be in [0, 1), got {blur_kernel_fraction}."
            )
        self.size = size
        self.scale = _check_range("scale", scale)
        self.ratio = _check_range("ratio", ratio)
        self.flip_p = _check_probability("flip_p", flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = _check_probability("jitter_p", jitter_p)
        self.grayscale_p = _check_probability("grayscale_p", grayscale_p)
        self.blur_kernel_fraction = float(blur_kernel_fraction)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma)
        self.augmentations = parse_augmentations(augmentations)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p}, "
            f"jitter={self.jitter}, jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_kernel_fraction={self.blur_kernel_fraction}, blur_sigma={self.blur_sigma}, "
            f"augmentations={self.augmentations}"
        )

    def blur_kernel_size(self, size: int) -> int:
        """The odd blur kernel side used for ``size`` x ``size`` outputs."""
        return int(self.blur_kernel_fraction * size) // 2 * 2 + 1

    def sample(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> ViewParams:
        """Draw the parameters for ``batch`` images of ``height`` x ``width`` pixels.

        Drawn on ``generator``'s device (the CPU without one) in float64. Every parameter is
        drawn whatever :attr:`augmentations` leaves out, then the steps left out are neutralised:
        the random stream, and so each kept step's parameters, are those of the full augmentation
        (the paper's Table 7 compares subsets of one augmentation, not different draws).
        """
        device = generator.device if generator is not None else torch.device("cpu")

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            draw = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
            return draw * (high - low) + low

        def bernoulli(p: float) -> Tensor:
            return uniform((batch,), 0.0, 1.0) < p

        crop_boxes = self._sample_crops(batch, height, width, uniform)
        flip = bernoulli(self.flip_p)
        jitter = bernoulli(self.jitter_p)
        brightness, contrast, saturation, hue = self.jitter
        jitter_factors = torch.stack(
            [uniform((batch,), max(0.0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)]
            + [uniform((batch,), -hue, hue)],
            dim=1,
        )
        jitter_order = uniform((batch, len(_JITTER_OPS)), 0.0, 1.0).argsort(dim=1)
        grayscale = bernoulli(self.grayscale_p)
        blur_sigma = uniform((batch,), *self.blur_sigma)
        kept = self.augmentations
        if "crop" not in kept:
            crop_boxes = self._center_box(height, width, device).expand(batch, 4).clone()
        return ViewParams(
            crop_boxes,
            flip & ("flip" in kept),
            jitter & ("color" in kept),
            jitter_factors,
            jitter_order,
            grayscale & ("grayscale" in kept),
            blur_sigma if "blur" in kept else torch.zeros_like(blur_sigma),
        )

    def _center_box(self, height: int, width: int, device: torch.device) -> Tensor:
        """The framing of the non-augmented view x: the source pixels :func:`center_view` keeps.

        Its square in the resized image mapped back to ``height`` x ``width`` pixels, axis by axis
        (the resize truncates the longer side, so the two scales can differ slightly); ``apply``'s
        ``roi_align`` then samples the very points ``center_view``'s resize does, only filtered
        by its box average instead of torchvision's antialiasing kernel.
        """
        size = self.size or height  # apply's output side
        resized_h, resized_w, top, left = _center_framing(height, width, size, CENTER_CROP_FRACTION)
        scale_y, scale_x = height / resized_h, width / resized_w
        box = [left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y]
        return torch.tensor(box, dtype=torch.float64, device=device)

    def _sample_crops(self, batch: int, height: int, width: int, uniform: Callable[..., Tensor]) -> Tensor:
        """torchvision's RandomResizedCrop rule, vectorised over the batch and the 10 tries."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        target_area = area * uniform((batch, _CROP_TRIES), *self.scale)
        aspect = torch.exp(uniform((batch, _CROP_TRIES), *log_ratio))
        crop_w = torch.sqrt(target_area * aspect).round()
        crop_h = torch.sqrt(target_area / aspect).round()
        fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
        first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        found = fits.any(dim=1)
        fallback_w, fallback_h = self._fallback_crop(height, width)
        crop_w = torch.where(found, crop_w.gather(1, first_fit).squeeze(1), fallback_w)
        crop_h = torch.where(found, crop_h.gather(1, first_fit).squeeze(1), fallback_h)
        # Offsets uniform over the integers 0..(side - crop); the centre for the fallback.
        top = torch.where(
            found, (uniform((batch,), 0, 1) * (height - crop_h + 1)).floor(), (height - crop_h) // 2
        )
        left = torch.where(
            found, (uniform((batch,), 0, 1) * (width - crop_w + 1)).floor(), (width - crop_w) // 2
        )
        return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)

    def _fallback_crop(self, height: int, width: int) -> tuple[float, float]:
        """torchvision's centre crop after 10 failed tries: the largest box within ``ratio``."""
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return float(width), float(round(width / self.ratio[0]))
        if in_ratio > self.ratio[1]:
            return float(round(height * self.ratio[1])), float(height)
        return float(width), float(height)

    def apply(self, images01: Tensor, params: ViewParams) -> Tensor:
        """Apply the augmentation with the given per-sample parameters (see :meth:`sample`).

        Computed in float32 for 16-bit input (and returned in the input's dtype).
        """
        check_image_batch(images01, "ViewAugment")
        images = images01 if images01.dtype in (torch.float32, torch.float64) else images01.float()
        size = self.size or images.shape[-2]
        device = images.device
        batch_index = torch.arange(len(images), dtype=torch.float64).unsqueeze(1)
        rois = torch.cat([batch_index, params.crop_boxes.cpu()], dim=1).to(device, images.dtype)
        views = roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        views = torch.where(params.flip.to(device).view(-1, 1, 1, 1), views.flip(-1), views)
        views = self._color_jitter(views.clamp_(0, 1), params)
        grayscale = params.grayscale.to(device).view(-1, 1, 1, 1)
        views = torch.where(grayscale, TF.rgb_to_grayscale(views, num_output_channels=3), views)
        views = self._blur(views, self.blur_kernel_size(size), params.blur_sigma)
        return views.clamp_(0, 1).to(images01.dtype)

    @staticmethod
    def _blur(views: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
        """Blur the samples whose sigma is positive; sigma 0 (blur switched off) leaves a sample as is.

        Skipped rather than convolved with a one-tap kernel: a GPU convolution may run in TF32 and
        would not return the image exactly.
        """
        # Selected where sigma lives (the CPU for the loader's parameters): no wait for the accelerator.
        rows = torch.nonzero(sigma > 0).squeeze(1)
        if rows.numel() == len(views):  # the paper's augmentation: the whole batch, no gather
            return gaussian_blur(views, kernel_size, sigma)
        if rows.numel():
            rows = rows.to(views.device)
            views[rows] = gaussian_blur(views[rows], kernel_size, sigma.to(views.device)[rows])
        return views

    @staticmethod
    def _color_jitter(views: Tensor, params: ViewParams) -> Tensor:
        """Run the four jitter ops in each sample's own order, on the samples that get jitter."""
        jitter = params.jitter.to(views.device)
        order = params.jitter_order.to(views.device)
        factors = params.jitter_factors.to(views.device)
        for step in range(len(_JITTER_OPS)):
            for op_index, op in enumerate(_JITTER_OPS):
                rows = torch.nonzero(jitter & (order[:, step] == op_index)).squeeze(1)
                if rows.numel():
                    views[rows] = op(views[rows], factors[rows, op_index])
        return views

    def forward(self, images01: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment each image with its own random parameters: ``(B, 3, H, W) -> (B, 3, size, size)``."""
        check_image_batch(images01, "ViewAugment")
        return self.apply(images01, self.sample(len(images01), *images01.shape[-2:], generator=generator))


def _center_framing(height: int, width: int, size: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """:func:`center_view`'s geometry: the resized ``(height, width)`` and the ``(top, left)`` of its square.

    torchvision's rules for ``resize(image, [short])`` and ``center_crop``: the shorter side becomes
    ``floor(size / crop_fraction)``, the longer one as much times its aspect ratio, truncated; the
    offsets round half to even. One function, so that the augmented view without crop
    (:meth:`ViewAugment.sample`) has exactly x's framing.
    """
    short = math.floor(size / crop_fraction)
    if height <= width:
        resized_h, resized_w = short, int(short * width / height)
    else:
        resized_h, resized_w = int(short * height / width), short
    return resized_h, resized_w, round((resized_h - size) / 2), round((resized_w - size) / 2)


def center_view(images01: Tensor, size: int, *, crop_fraction: float = 1.0) -> Tensor:
    """Shorter side resized (anti-aliased) to ``floor(size / crop_fraction)``, centre-cropped square ``size``.

    ``crop_fraction`` is timm's ``crop_pct``: 1 keeps the whole shorter side, the training data's
    :data:`CENTER_CROP_FRACTION` gives the paper's resize-256-crop-224 at 224 px.
    """
    check_image_batch(images01, "center_view")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"center_view size must be a positive integer, got {size!r}.")
    if not 0.0 < crop_fraction <= 1.0:
        raise ConfigError(f"center_view crop_fraction must be in (0, 1], got {crop_fraction!r}.")
    resized_h, resized_w, top, left = _center_framing(*images01.shape[-2:], size, crop_fraction)
    resized = TF.resize(images01, [resized_h, resized_w], antialias=True)
    return resized[..., top : top + size, left : left + size]

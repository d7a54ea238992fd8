"""How a teacher prepares its images: exactly as its own image processor, with torch ops on the device.

A teacher (:mod:`~mvmr_hf.models.representations.teacher`) receives ``(B, 3, H, W)`` images in
``[0, 1]`` on any device and prepares them on that device as its *own* image processor, read once at load time
with ``AutoImageProcessor``, prepares the 8-bit images users have (PIL images, decoded files),
whatever the student uses. In `transformers` 5 ``AutoImageProcessor.from_pretrained`` gives the
torchvision ("fast") backend, which turns a PIL image into a ``uint8`` tensor and resizes it with
torch's native ``uint8`` kernel; the PIL backend (``backend="pil"``) and timm's processor resize the
PIL image itself. All three resize an 8-bit image separably, width first, into 8-bit buffers, so the
values are clamped to ``[0, 255]`` and rounded after each pass; bicubic overshoot at edges is cut
before the vertical pass. The teacher resizes the float batch the same way (:func:`_resize_8bit`),
then crops, rescales and normalises in float as the processors do. Measured on scikit-image photos
at 96 px, upsampled 2, 4 and 8 times and downsampled, the pixel values are at most 2 gray levels
(mean below 0.01) from the processor's; one float resize clamped at the end differed by up to 10.6
(up to 17 unclamped, as timm's transform of a float batch gives). Two routes:

* `transformers` processors whose pipeline is the backends' standard one (resize with antialiasing,
  center crop, rescale, normalize: CLIP, SigLIP, ViT, DeiT, Bit/DINOv2, ...) and ConvNeXt's
  ``crop_pct`` rule: their settings are read into :class:`PreprocessSettings` and applied with
  torch ops;
* timm models (``TimmWrapperModel``, e.g. ``timm/vit_base_patch16_clip_224.laion400m_e32``): the
  ``TimmWrapperImageProcessor``'s own eval transform (``val_transforms``, built by timm from the
  checkpoint's ``pretrained_cfg``: input size, ``crop_pct``, ``crop_mode`` center / squash / border,
  interpolation, mean/std) is applied to the float batch (:class:`TimmTransform`), its resize done as
  on the processor's PIL images; every step must work on tensors, and the border mode's padding
  colour is given in ``[0, 1]`` units.

Any other processor (one that overrides the backends' resize or preprocessing: BEiT, EfficientNet,
LeViT, DINOv3, MobileViT, ...), one that pads, or one whose ``size`` is not ``shortest_edge`` or
``height`` and ``width`` is refused at load time with one :class:`~mvmr_hf.errors.ConfigError` line,
so training never starts on inputs that differ from the processor's. A checkpoint without an
image-processor config gets a one-line warning and a fallback: resize the shorter side to the
config's ``image_size`` (224 if absent), center crop a square of that size, bicubic, normalised with
the OpenAI CLIP statistics for CLIP-family models, mean = std = 0.5 for SigLIP and the ImageNet
statistics otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from timm.data.transforms import (
    CenterCropOrPad,
    MaybeToTensor,
    ResizeKeepRatio,
    TrimBorder,
    center_crop_or_pad,
)
from torch import Tensor, nn
from torchvision import transforms
from torchvision.transforms.v2 import functional as tvF
from transformers import (
    AutoImageProcessor,
    ConvNextImageProcessor,
    ConvNextImageProcessorPil,
    PretrainedConfig,
    TimmWrapperImageProcessor,
)
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    pil_torch_interpolation_mapping,
)

from mvmr_hf.errors import ConfigError

_FALLBACK_STATS = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "metaclip_2": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    "siglip_vision_model": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
}


# The PIL filters torch applies to tensors as PIL applies them to 8-bit images (antialiased, as PIL always
# filters), by the torch mode that gives PIL's result: PIL's nearest takes the pixel whose centre is
# nearest, which is torch's "nearest-exact" (torch's "nearest" rounds down; timm names PIL's filter so).
# Where a centre lies half way, PIL's arithmetic breaks the tie the other way at times (up to 2 % of
# the values, measured on photos; the torchvision backend's uint8 kernel agrees with torch exactly).
_PIL_FILTERS = {
    tvF.InterpolationMode.NEAREST: tvF.InterpolationMode.NEAREST_EXACT,
    tvF.InterpolationMode.NEAREST_EXACT: tvF.InterpolationMode.NEAREST_EXACT,
    tvF.InterpolationMode.BILINEAR: tvF.InterpolationMode.BILINEAR,
    tvF.InterpolationMode.BICUBIC: tvF.InterpolationMode.BICUBIC,
}


# Named in the fingerprints, so that teacher outputs cached before the resize matched the processors'
# 8-bit resize (one float resize, clamped once) are not reused.
_RESIZE_RULE = "8-bit separable"


def _to_8bit(images01: Tensor) -> Tensor:
    """``images01`` as an 8-bit buffer holds it: clamped to ``[0, 1]``, rounded half up to 1/255 steps.

    Half up, as PIL's and torch's fixed-point ``uint8`` kernels round (``torch.round`` rounds half to
    even, which moves the many exact halves of a 2x bilinear upsampling: 15 % of the pixels, measured).
    """
    return (images01 * 255 + 0.5).floor().clamp(0, 255) / 255


def _resize_8bit(images01: Tensor, size: tuple[int, int], interpolation: tvF.InterpolationMode) -> Tensor:
    """Resize a ``[0, 1]`` batch to ``size`` (height, width) as PIL resizes an 8-bit image.

    PIL (and torch's native ``uint8`` kernel, which the `transformers` torchvision backend uses)
    resamples the width first, into an 8-bit image, then the height: each pass is antialiased and its
    result clamped and rounded (:func:`_to_8bit`). A pass that keeps its side is skipped, as there.
    On 8-bit inputs this is within one gray level of PIL (mean below 0.01, measured on photos); one
    float resize clamped at the end is up to 10.6 gray levels away, where PIL cuts the bicubic
    overshoot of the first pass before the second one spreads it.
    """
    height, width = size
    if images01.shape[-1] != width:
        images01 = _to_8bit(
            tvF.resize(images01, [images01.shape[-2], width], interpolation=interpolation, antialias=True)
        )
    if images01.shape[-2] != height:
        images01 = _to_8bit(
            tvF.resize(images01, [height, width], interpolation=interpolation, antialias=True)
        )
    return images01


def _output_size(images: Tensor, size: int | Sequence[int]) -> tuple[int, int]:
    """The (height, width) a resize to ``size`` gives: (height, width) itself, or, for one number, the
    shorter side set to it and the longer one keeping the aspect ratio, truncated (the rule of
    `transformers`, torchvision and so timm)."""
    if isinstance(size, int) or len(size) == 1:
        shortest = size if isinstance(size, int) else size[0]
        return get_resize_output_image_size(
            images, size=shortest, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class PreprocessSettings:
    """A `transformers` image processor's settings, applied to ``[0, 1]`` batches with torch ops.

    Exactly one of ``shortest_edge`` (resize the shorter side, keep the aspect ratio) and
    ``resize_to`` (``(height, width)``) is set when the processor resizes; ``interpolation`` is the
    torch mode that gives the processor's PIL filter (:data:`_PIL_FILTERS`). ``scale`` multiplies the
    ``[0, 1]`` input to give what the processor's rescale step gives for 8-bit images (1.0 when it
    divides by 255, 255.0 when it does not rescale). ``mean``/``std`` are ``None`` when it does not
    normalize.
    """

    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop: tuple[int, int] | None
    interpolation: str
    scale: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, images01: Tensor) -> Tensor:
        """Resize, center crop, rescale and normalize a ``(B, 3, H, W)`` batch on its device.

        Works in float32. The resize is the processors' resize of 8-bit images (:func:`_resize_8bit`).
        The center crop puts its top-left corner at ``int((size - crop) / 2)`` and pads with zeros when
        the crop is larger than the image, as the `transformers` image processors do.
        """
        x = images01.float()
        size = self.shortest_edge if self.shortest_edge is not None else self.resize_to
        if size is not None:
            x = _resize_8bit(x, _output_size(x, size), tvF.InterpolationMode(self.interpolation))
        if self.crop is not None:
            (height, width), (crop_h, crop_w) = x.shape[-2:], self.crop
            x = tvF.crop(x, int((height - crop_h) / 2), int((width - crop_w) / 2), crop_h, crop_w)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None and self.std is not None:
            x = tvF.normalize(x, list(self.mean), list(self.std))
        return x

    def describe(self) -> dict[str, Any]:
        """The settings and the resize rule, for the teacher's fingerprint."""
        return {**asdict(self), "resize": _RESIZE_RULE}


@dataclass(frozen=True)
class TimmTransform:
    """A timm model's own eval transform, applied to ``[0, 1]`` batches on their device.

    ``steps`` are the steps of the ``TimmWrapperImageProcessor``'s ``val_transforms`` (timm's
    ``create_transform(**data_config, is_training=False)``) as they act on the PIL images the
    processor makes of 8-bit images: the crops, ``MaybeToTensor`` and ``Normalize`` as they are
    (they take batched tensors on any device); the resize as PIL does it (:class:`_Resize8bit`; timm's
    own resize of a float batch neither clamps nor rounds, up to 17 gray levels from the PIL path on
    upsampled photos, measured); border padding with its 8-bit colour in ``[0, 1]`` units
    (:class:`_CenterCropOrPad01`). ``data_config`` is timm's resolved ``pretrained_cfg`` (input
    size, interpolation, crop_pct, crop_mode, mean, std), which determines the steps.
    """

    data_config: dict[str, Any]
    steps: tuple[Callable[[Tensor], Tensor], ...]

    def __call__(self, images01: Tensor) -> Tensor:
        """The ``pixel_values`` the processor gives for the 8-bit images of the ``(B, 3, H, W)`` batch."""
        x = images01.float()
        for step in self.steps:
            x = step(x)
        return x

    def describe(self) -> dict[str, Any]:
        """timm's data config (the steps follow from it) and the resize rule, for the fingerprint."""
        return {"timm_data_config": self.data_config, "resize": _RESIZE_RULE}


# How a teacher turns [0, 1] batches into pixel values: callable, with ``describe()`` for the fingerprint.
Preprocessing = PreprocessSettings | TimmTransform


class _Resize8bit(nn.Module):
    """timm's ``Resize`` or ``ResizeKeepRatio`` step as it resizes the processor's PIL images.

    The step's own size rule, then :func:`_resize_8bit` with the torch mode of its PIL filter.
    """

    def __init__(self, step: transforms.Resize | ResizeKeepRatio) -> None:
        super().__init__()
        self.step = step
        self.interpolation = _PIL_FILTERS[step.interpolation]

    def forward(self, images: Tensor) -> Tensor:
        if isinstance(self.step, ResizeKeepRatio):
            size = self.step.get_params(images, self.step.size, self.step.longest)
        else:
            size = self.step.size
        return _resize_8bit(images, _output_size(images, size), self.interpolation)

    def extra_repr(self) -> str:
        return f"step={self.step!r}, interpolation={self.interpolation.value}"


class _CenterCropOrPad01(nn.Module):
    """timm's ``CenterCropOrPad`` for float batches in ``[0, 1]``: pads with ``fill / 255`` per channel.

    Padding to the crop size first (centred as timm pads) and then cropping with timm's own
    ``center_crop_or_pad`` gives timm's geometry; the padded pixels hold exactly what the 8-bit
    fill colour becomes after ``ToTensor`` in the processor's PIL path.
    """

    def __init__(self, size: tuple[int, int], fill: int | Sequence[int]) -> None:
        super().__init__()
        self.size = size
        self.fill = fill

    def forward(self, images: Tensor) -> Tensor:
        (height, width), (crop_h, crop_w) = images.shape[-2:], self.size
        if crop_h > height or crop_w > width:
            fill = torch.as_tensor(self.fill, dtype=images.dtype, device=images.device) / 255
            padded_h, padded_w = max(height, crop_h), max(width, crop_w)
            canvas = fill.reshape(-1, 1, 1).expand(*images.shape[:-2], padded_h, padded_w).clone()
            top, left = (padded_h - height) // 2, (padded_w - width) // 2
            canvas[..., top : top + height, left : left + width] = images
            images = canvas
        return center_crop_or_pad(images, list(self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, fill={self.fill}"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report: image towers skip text weights on purpose; missing keys are checked here."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _read_preprocessing(name: str, location: str, config: PretrainedConfig, hub: dict) -> Preprocessing:
    """How teacher ``name`` (at ``location``) prepares its images: its image processor's, or the fallback.

    Raises ConfigError for a processor whose preprocessing the teacher does not reproduce exactly.
    """
    try:
        with _quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(location, **hub)
    except OSError:
        return _fallback_settings(name, config)
    if isinstance(processor, TimmWrapperImageProcessor):
        return _timm_transform(name, processor)
    return _settings_from_processor(name, processor)


def _settings_from_processor(name: str, processor: object) -> PreprocessSettings:
    """The settings of a standard or ConvNeXt processor, which the teacher reproduces exactly.

    Any other processor would only be approximated, so it is refused with a ConfigError: one with its
    own resize or preprocessing code, one that pads, one whose ``size`` is not ``shortest_edge`` alone
    or ``height`` and ``width``.
    """
    convnext = isinstance(processor, (ConvNextImageProcessor, ConvNextImageProcessorPil))
    if not (convnext or _standard_pipeline(processor)):
        raise ConfigError(
            f"the image processor of teacher {name!r} is a {type(processor).__name__}, whose own "
            "preprocessing the teacher does not reproduce exactly: save a standard processor with the "
            "model's settings into the folder (e.g. CLIPImageProcessor, ViTImageProcessor or "
            "BitImageProcessor) or use a supported family (CLIP, SigLIP, ViT, DeiT, DINOv2, ConvNeXt, timm)"
        )
    if getattr(processor, "do_pad", False):
        raise ConfigError(
            f"the image processor of teacher {name!r} pads its images (do_pad=True), which the teacher does "
            "not reproduce: save the processor with do_pad=False if the model runs on unpadded crops"
        )
    size = processor.size if getattr(processor, "do_resize", False) else None
    crop_size = processor.crop_size if getattr(processor, "do_center_crop", False) else None
    shortest = size.shortest_edge if size is not None else None
    resize_to = (size.height, size.width) if size is not None and size.height and size.width else None
    crop = (crop_size.height, crop_size.width) if crop_size is not None else None
    if size is not None and (
        not (shortest or resize_to) or size.longest_edge or size.max_height or size.max_width
    ):
        raise ConfigError(
            f"the image processor of teacher {name!r} sets size={size}, which the teacher cannot apply: it "
            "supports 'shortest_edge' alone or 'height' and 'width'"
        )
    if convnext and shortest:
        # ConvNeXt: below 384 px, resize the shorter side to size / crop_pct, then crop size x size;
        # from 384 px on, warp to size x size.
        if shortest < 384:
            shortest, crop = int(shortest / processor.crop_pct), (shortest, shortest)
        else:
            shortest, resize_to = None, (shortest, shortest)
    normalize = getattr(processor, "do_normalize", False)
    return PreprocessSettings(
        shortest_edge=shortest,
        resize_to=None if shortest else resize_to,
        crop=crop,
        interpolation=_interpolation(name, getattr(processor, "resample", None)),
        scale=255.0 * processor.rescale_factor if getattr(processor, "do_rescale", False) else 255.0,
        mean=_per_channel(processor.image_mean) if normalize else None,
        std=_per_channel(processor.image_std) if normalize else None,
    )


# The steps of timm's eval transforms that take batched float tensors on any device, as they are.
_TENSOR_STEPS = (transforms.CenterCrop, TrimBorder, MaybeToTensor, transforms.Normalize)


# timm's resize steps, done as on PIL images by _Resize8bit when their filter is in _PIL_FILTERS.
_RESIZE_STEPS = (transforms.Resize, ResizeKeepRatio)


def _timm_transform(name: str, processor: TimmWrapperImageProcessor) -> TimmTransform:
    """The processor's ``val_transforms`` as a :class:`TimmTransform`; ConfigError for a PIL-only step."""
    steps: list[Callable[[Tensor], Tensor]] = []
    for step in processor.val_transforms.transforms:
        if isinstance(step, CenterCropOrPad) and step.padding_mode == "constant":
            steps.append(_CenterCropOrPad01(tuple(step.size), step.fill))
            continue
        if type(step) in _TENSOR_STEPS:
            steps.append(step)
            continue
        interpolation = getattr(step, "interpolation", None)
        if type(step) in _RESIZE_STEPS and interpolation in _PIL_FILTERS:
            steps.append(_Resize8bit(step))
            continue
        what = type(step).__name__
        if type(step) in _RESIZE_STEPS:
            what += f" with {getattr(interpolation, 'value', interpolation)} interpolation"
        raise ConfigError(
            f"the timm eval transform of teacher {name!r} has a step that only works on PIL images "
            f"({what}), so the teacher cannot apply it to tensor batches: use a checkpoint whose "
            "pretrained_cfg gives a nearest, bilinear or bicubic resize, a crop and a normalization"
        )
    return TimmTransform(data_config=dict(processor.data_config), steps=tuple(steps))


def _interpolation(name: str, resample: object) -> str:
    """The torch mode that gives the PIL filter a processor's ``resample`` names (a PIL code or a
    torch mode; None: bilinear), see :data:`_PIL_FILTERS` (PIL's nearest is "nearest-exact").

    Raises ConfigError for a filter torch cannot apply to tensors as PIL does (lanczos, box, hamming):
    the teacher would otherwise fail in the first training step, or see other pixels than its
    processor gives.
    """
    if resample is None:
        return tvF.InterpolationMode.BILINEAR.value
    mode = (
        resample
        if isinstance(resample, tvF.InterpolationMode)
        else pil_torch_interpolation_mapping.get(resample)
    )
    if mode not in _PIL_FILTERS:
        raise ConfigError(
            f"the image processor of teacher {name!r} resizes with the {getattr(mode, 'value', resample)} "
            "filter, which torch cannot apply to tensors: save the processor with resample set to "
            "bicubic (3), bilinear (2) or nearest (0)"
        )
    return _PIL_FILTERS[mode].value


def _per_channel(value: float | list[float] | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _standard_pipeline(processor: object) -> bool:
    """True when the processor class keeps the backend's resize / crop / normalize pipeline unchanged.

    That is: no class between it and the backend overrides ``resize``, ``_preprocess`` or
    ``preprocess`` (the teacher reproduces the backends' own code, not a subclass's).
    """
    for cls in type(processor).__mro__:
        if cls in (TorchvisionBackend, PilBackend):
            return True
        if any(name in vars(cls) for name in ("resize", "_preprocess", "preprocess")):
            return False
    return False


def _fallback_settings(name: str, config: PretrainedConfig) -> PreprocessSettings:
    vision = getattr(config, "vision_config", None) or config
    image_size = getattr(vision, "image_size", None) or 224
    side = image_size if isinstance(image_size, int) else image_size[0]
    mean, std = _FALLBACK_STATS.get(config.model_type, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    warnings.warn(
        f"teacher {name!r} has no image-processor config: using {side} px bicubic resize + center crop and "
        f"mean {tuple(mean)}, std {tuple(std)}; save its processor into the folder to use its own settings",
        stacklevel=4,
    )
    return PreprocessSettings(
        shortest_edge=side,
        resize_to=None,
        crop=(side, side),
        interpolation="bicubic",
        scale=1.0,
        mean=tuple(mean),
        std=tuple(std),
    )

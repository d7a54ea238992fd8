"""A frozen `transformers` vision model as a representation: the teacher of knowledge distillation.

The paper distils a teacher by maximising ``dCor(z̃, r(x))`` between the student's embedding of the
augmented view and the teacher's output for the non-augmented view (section 5.2; it is one term of
eq. 9). Here the teacher is any `transformers` vision model, by Hub id or local folder::

    teacher = load_teacher("openai/clip-vit-base-patch16")   # or a folder written by save_pretrained
    r = teacher(images01)                                     # (B, 512) float32, no grad

**Input.** ``images01`` is the batch of non-augmented views, ``(B, 3, H, W)`` in ``[0, 1]``, on any
device. The teacher prepares it on that device as its *own* image processor, read once at load time
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

**Output** (always ``(B, D)`` float32, ``output=`` picks it):

========== =====================================================================================
kind       value
========== =====================================================================================
embedding  the image embedding of an image-text model: CLIP's projected ``image_embeds``; SigLIP's
           pooled output (its attention-pooling head *is* its embedding)
pooler     the model's ``pooler_output`` (ViT: dense + tanh on CLS; DINOv2: the layer-normed CLS;
           ConvNeXt: global average pool + LayerNorm; CLIP: the post-LayerNorm CLS, before projection;
           timm: the pooled pre-logits features of ``forward_head``, what timm calls the embedding)
cls        ``last_hidden_state[:, 0]``, the CLS token as the model returns it (for CLIP that is
           before ``post_layernorm``); an error for models without a CLS token (SigLIP, ConvNeXt,
           timm CNNs and timm ViTs built without ``cls_token``)
mean       the mean of ``last_hidden_state`` over the patch tokens, without CLS, distillation and
           register tokens (timm: its ``num_prefix_tokens``); for convolutional models the spatial
           mean of the last feature map
tokens     ``last_hidden_state`` flattened: all tokens (prefix tokens included) of a transformer,
           the whole last feature map of a convolutional model (channels first; timm models with
           channels-last maps, e.g. Swin, are brought to ``(B, C, H, W)``)
========== =====================================================================================

``auto`` resolves, in order, to ``embedding`` for image-text models (CLIP, MetaCLIP 2, SigLIP), to
``pooler`` when the model returns one *and its weights were in the checkpoint* (a pooler that
``from_pretrained`` had to initialise randomly, e.g. ViT loaded from a ``ViTForImageClassification``
checkpoint, is never used; asking for it explicitly is an error), else to ``cls`` when the model has a
CLS token, else to ``mean``. So DINOv2, ConvNeXt and timm models give ``pooler``, classification ViTs
give ``cls``.

Image-text checkpoints load only their image tower (``CLIPVisionModelWithProjection``,
``SiglipVisionModel``); other vision models load with ``AutoModel`` (``TimmWrapperModel`` for timm
folders, without classifier). The model is frozen, kept in eval mode and run under
``torch.no_grad()`` (not ``inference_mode``: its outputs enter autograd graphs as constants).
``trust_remote_code`` is passed on only when the caller sets it.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
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
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    ConvNextImageProcessor,
    ConvNextImageProcessorPil,
    PretrainedConfig,
    PreTrainedModel,
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
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES

from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import is_local_path

OUTPUT_KINDS = ("auto", "embedding", "pooler", "cls", "mean", "tokens")

# Image-text models: the class that holds only the image tower (with its projection, if any).
IMAGE_TOWERS = {
    "clip": "CLIPVisionModelWithProjection",
    "metaclip_2": "MetaClip2VisionModelWithProjection",
    "siglip": "SiglipVisionModel",
}
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


class Teacher(nn.Module):
    """A frozen vision model that maps ``[0, 1]`` images to ``(B, D)`` float32 features (see module doc).

    Build it with :func:`load_teacher`. ``tower`` is the vision model, ``projection`` the linear map
    to an image-text embedding space (CLIP) or ``None``, ``settings`` its :data:`Preprocessing`
    (:class:`PreprocessSettings` or :class:`TimmTransform`). Follows the representation protocol of
    ``docs/architecture.md``: ``name``, ``deterministic``, ``gather`` and :meth:`fingerprint`.
    """

    name = "teacher"
    deterministic = True

    def __init__(
        self,
        tower: PreTrainedModel,
        projection: nn.Module | None,
        settings: Preprocessing,
        *,
        output: str,
        prefix_tokens: int,
        model_name_or_path: str,
        source: dict,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection
        self.settings = settings
        self.output = output
        self.prefix_tokens = prefix_tokens
        self.model_name_or_path = model_name_or_path
        # A token grid is wide: the objective then uses the local batch (docs/architecture.md).
        self.gather = output != "tokens"
        self._source = source
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Keep the teacher in eval mode (dropout off, fixed statistics) whatever ``mode`` says."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model weights are stored in (the output is always float32)."""
        return next(self.tower.parameters()).dtype

    def preprocess(self, images01: Tensor) -> Tensor:
        """The model's ``pixel_values`` for a ``(B, 3, H, W)`` batch in ``[0, 1]`` (see the module doc)."""
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ConfigError(
                f"the teacher takes float images of shape (B, 3, H, W) in [0, 1], got a {images01.dtype} "
                f"tensor of shape {tuple(images01.shape)}: convert the batch first"
            )
        return self.settings(images01).to(self.dtype)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """The ``(B, D)`` float32 output of kind :attr:`output` for already-preprocessed ``pixel_values``."""
        out = _run(self.tower, self.projection, pixel_values)
        if self.output in ("embedding", "pooler"):
            features = out[self.output]
        elif self.output == "cls":
            features = out["hidden"][:, 0]
        elif self.output == "mean":
            hidden = out["hidden"]
            features = (
                hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, self.prefix_tokens :].mean(1)
            )
        else:
            features = out["hidden"]
        return features.flatten(1).float()

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        """``(B, D)`` float32 teacher features of a ``(B, 3, H, W)`` batch in ``[0, 1]``, on its device."""
        return self.encode(self.preprocess(images01))

    def fingerprint(self) -> dict:
        """What the output depends on, for the exact cache: model, weights version, kind, preprocessing."""
        return {
            "model": self.model_name_or_path,
            **self._source,
            "output": self.output,
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocess": self.settings.describe(),
        }


def load_teacher(
    name_or_path: str,
    *,
    output: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """Load a frozen teacher from a Hub model id or a local folder (see the module docstring).

    Args:
        name_or_path: a Hub id (``"openai/clip-vit-base-patch16"``) or a folder written by
            ``save_pretrained`` (``config.json`` + weights, ideally with the image-processor config).
        output: ``auto``, ``embedding``, ``pooler``, ``cls``, ``mean`` or ``tokens``.
        revision: Hub branch, tag or commit; ``None`` is the default branch.
        token: Hub token for gated or private models (``True``: the saved login).
        trust_remote_code: allow a model that ships its own code (off unless asked).
        dtype: dtype to hold the weights in (e.g. ``torch.bfloat16``); the output is float32.

    Raises:
        ConfigError: a missing folder, an unknown or unreachable Hub id, a model that is not a vision
            model, an image processor whose preprocessing the teacher does not reproduce exactly, or
            an ``output`` the model cannot give.
    """
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"teacher output {output!r} is not known: use one of {', '.join(OUTPUT_KINDS)}")
    folder = _local_folder(name_or_path)
    location = str(folder) if folder is not None else name_or_path
    hub = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    with loading_errors(name_or_path):
        config = AutoConfig.from_pretrained(location, **hub)
    tower_class, tower_config = _tower_class(name_or_path, config, trust_remote_code)
    with loading_errors(name_or_path), _quiet_transformers():
        model, info = tower_class.from_pretrained(
            location, config=tower_config, dtype=dtype, output_loading_info=True, **hub
        )
    pooler_loaded = _check_loaded(name_or_path, info["missing_keys"])
    projection = getattr(model, "visual_projection", None)
    tower = model.vision_model if projection is not None else model
    settings = _read_preprocessing(name_or_path, location, config, hub)
    with torch.no_grad():
        probe = _run(tower, projection, settings(torch.full((1, 3, 224, 224), 0.5)).to(model.dtype))
    prefix_tokens, has_cls = _token_layout(model)
    resolved = _resolve_output(
        output,
        probe,
        name=name_or_path,
        image_text=config.model_type in IMAGE_TOWERS or projection is not None,
        pooler_loaded=pooler_loaded,
        has_cls=has_cls,
    )
    return Teacher(
        tower,
        projection,
        settings,
        output=resolved,
        prefix_tokens=prefix_tokens,
        model_name_or_path=name_or_path,
        source=_local_digest(folder) if folder is not None else _hub_commit(name_or_path, revision),
    )


def _run(tower: nn.Module, projection: nn.Module | None, pixel_values: Tensor) -> dict[str, Tensor | None]:
    """The raw outputs: ``embedding`` (projected pooler), ``pooler`` and ``hidden`` (last hidden state).

    ``hidden`` is ``(B, N, C)`` tokens or a ``(B, C, H, W)`` map: the feature maps of timm models that
    work channels-last (Swin, MambaOut, ...) are permuted, so that spatial means and maps are right.
    """
    out = tower(pixel_values=pixel_values)
    pooler = out.pooler_output
    embedding = pooler if projection is None or pooler is None else projection(pooler)
    hidden = out.last_hidden_state
    if hidden.ndim == 4 and getattr(getattr(tower, "timm_model", None), "output_fmt", None) == "NHWC":
        hidden = hidden.permute(0, 3, 1, 2)
    return {"embedding": embedding, "pooler": pooler, "hidden": hidden}


def _local_folder(name_or_path: str) -> Path | None:
    """The model folder ``name_or_path`` names, ``None`` for a Hub id; raise for a bad path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"teacher folder {name_or_path!r} has no config.json: pass a folder written by "
                "save_pretrained (config.json and weights) or a Hub model id"
            )
        return path
    if path.exists():
        raise ConfigError(f"teacher {name_or_path!r} is a file: pass the folder that holds config.json")
    if is_local_path(name_or_path):
        raise ConfigError(
            f"teacher folder {name_or_path!r} does not exist: check the path, or pass a Hub model id"
        )
    return None


@contextmanager
def loading_errors(name: str, *, what: str = "teacher") -> Iterator[None]:
    """Turn the errors of loading ``name`` into one-line :class:`ConfigError` messages naming it.

    Serves every loader that takes a local folder or a Hub id: ``from_pretrained`` here, and timm's
    pretrained weights of an evaluated ``--model`` (:func:`mvmr_hf.evaluation.features.load_encoder`), whose
    download fails with the same Hub errors. ``what`` names the argument in the message.
    """
    try:
        yield
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(_explain(error, name, what)) from error


def _explain(error: BaseException, name: str, what: str) -> str:
    """One sentence for a loading error, from the Hub error types anywhere in its cause chain."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__

    def found(kind: type[BaseException]) -> bool:
        return any(isinstance(e, kind) for e in chain)

    if found(HFValidationError):
        return (
            f"{what} {name!r} is neither a local folder nor a valid Hub model id: check the name or the path"
        )
    if found(GatedRepoError):
        return (
            f"{what} {name!r} is a gated Hub model you have no access to: accept its terms on "
            "huggingface.co and log in (`hf auth login`, or pass token=...), or pass a local folder"
        )
    if found(RevisionNotFoundError):
        return f"the requested revision of {what} {name!r} does not exist on the Hub: check the revision"
    if found(RepositoryNotFoundError):
        return (
            f"{what} {name!r} is neither a local folder nor a model on the Hub (or it is private): check "
            "the name, log in with `hf auth login` for private models, or pass a local folder"
        )
    if found(LocalEntryNotFoundError) or found(ConnectionError):
        return (
            f"could not download {what} {name!r} from the Hugging Face Hub (offline or no network): pass a "
            "local folder that holds the model, or connect and log in (`hf auth login`) if it is gated"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not load {what} {name!r}: {first_line}"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report: image towers skip text weights on purpose; missing keys are checked here."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _tower_class(
    name: str, config: PretrainedConfig, trust_remote_code: bool
) -> tuple[type, PretrainedConfig]:
    """The class that loads the image tower of ``config``'s model, and the config to give it."""
    model_type = config.model_type
    if model_type in IMAGE_TOWERS:
        tower_config = copy.deepcopy(config.vision_config)
        if hasattr(config, "projection_dim"):  # the vision sub-config does not always carry it
            tower_config.projection_dim = config.projection_dim
        return getattr(transformers, IMAGE_TOWERS[model_type]), tower_config
    with_projection = [a for a in config.architectures or [] if a.endswith("VisionModelWithProjection")]
    if with_projection and hasattr(transformers, with_projection[0]):
        return getattr(transformers, with_projection[0]), config
    if model_type == "timm_wrapper" and "num_classes" in (config.model_args or {}):
        # timm's save_for_hf records num_classes in model_args, but TimmWrapperModel passes
        # num_classes=0 itself (timm would get it twice); the classifier is not part of a teacher.
        config = copy.deepcopy(config)
        config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
    remote = trust_remote_code and "AutoModel" in (getattr(config, "auto_map", None) or {})
    if model_type in MODEL_FOR_IMAGE_MAPPING_NAMES or model_type.endswith("_vision_model") or remote:
        return AutoModel, config
    raise ConfigError(
        f"teacher {name!r} is a {model_type!r} model, not a vision model: pass a transformers image model "
        "(e.g. CLIP, SigLIP, DINOv2, ViT, ConvNeXt)"
    )


def _check_loaded(name: str, missing_keys: set[str]) -> bool:
    """Whether the pooler's weights were loaded; raise when any other weight is missing (random)."""
    pooler_keys = {key for key in missing_keys if "pooler." in key}
    others = sorted(missing_keys - pooler_keys)
    if others:
        raise ConfigError(
            f"{len(others)} weights of teacher {name!r} are not in its checkpoint (e.g. {others[0]!r}), so "
            "it would run partly random: pass a folder or id that holds the full model"
        )
    return not pooler_keys


def _token_layout(model: nn.Module) -> tuple[int, bool]:
    """How many tokens precede the patch tokens (CLS, distillation, registers), and whether one is CLS.

    timm counts them itself (``num_prefix_tokens``, CLS first when ``cls_token`` is set; a timm ViT
    may have registers without CLS). In `transformers` models they follow a CLS token (0 without).
    """
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return getattr(timm_model, "num_prefix_tokens", 0), getattr(timm_model, "cls_token", None) is not None
    for module in model.modules():
        if (
            getattr(module, "cls_token", None) is not None
            or getattr(module, "class_embedding", None) is not None
        ):
            registers = getattr(module, "register_tokens", None)
            distillation = getattr(module, "distillation_token", None) is not None
            return 1 + int(distillation) + (registers.shape[1] if registers is not None else 0), True
    return 0, False


def _resolve_output(
    requested: str,
    out: dict[str, Tensor | None],
    *,
    name: str,
    image_text: bool,
    pooler_loaded: bool,
    has_cls: bool,
) -> str:
    """The output kind ``requested`` resolves to, given the model's outputs ``out`` on a probe image."""
    has_embedding = image_text and out["embedding"] is not None
    has_pooler = out["pooler"] is not None and pooler_loaded
    tokens = out["hidden"].ndim == 3
    has_cls = tokens and has_cls
    if requested == "auto":
        if has_embedding:
            return "embedding"
        return "pooler" if has_pooler else ("cls" if has_cls else "mean")
    if requested == "embedding" and not has_embedding:
        raise ConfigError(
            f"teacher {name!r} gives no image-text embedding (only CLIP- and SigLIP-style models do): use "
            "output='pooler', 'cls', 'mean' or 'tokens' (or 'auto')"
        )
    if requested == "pooler" and not has_pooler:
        reason = (
            "its pooler weights are not in the checkpoint" if out["pooler"] is not None else "it has none"
        )
        raise ConfigError(
            f"teacher {name!r} gives no usable pooler output ({reason}): use output='cls' or 'mean'"
        )
    if requested == "cls" and not has_cls:
        kind = "has no CLS token" if tokens else "is convolutional (no tokens)"
        raise ConfigError(f"teacher {name!r} {kind}: use output='pooler', 'mean' or 'tokens'")
    return requested


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


def _local_digest(folder: Path) -> dict:
    """A digest of the folder's file names, sizes and modification times (cheap, changes with the weights)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.expanduser().rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(folder.expanduser())}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return {"files_sha256": digest.hexdigest()}


def _hub_commit(name: str, revision: str | None) -> dict:
    """The commit the cached ``config.json`` of a Hub model came from (its snapshot folder's name)."""
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return {"commit": Path(cached).parent.name if isinstance(cached, str) else revision}

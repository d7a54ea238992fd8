"""Decoding: an encoded image to an RGB ``uint8`` tensor, in the workers (PIL, every image mode) or on
the device (JPEG, batched with ``torchvision.io.decode_jpeg``); undecodable or degenerate images
raise :class:`~mvmr_hf.data.loading.BadImageError`, which the callers count and skip.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from mvmr_hf.data.loading import MAX_ASPECT_RATIO, MIN_IMAGE_SIDE, BadImageError
from mvmr_hf.errors import ConfigError

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _to_rgb(image: Image.Image) -> np.ndarray:
    """An opened PIL image as an ``(H, W, 3)`` uint8 array (``docs/data.md`` lists each mode)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0
        return np.repeat(np.round(values).astype(np.uint8)[..., None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def decode_image(encoded: bytes) -> torch.Tensor:
    """Decode an encoded image to an 8-bit RGB ``(3, H, W)`` tensor, EXIF orientation applied.

    Raises:
        BadImageError: undecodable, or degenerate (see :data:`MIN_IMAGE_SIDE`,
            :data:`MAX_ASPECT_RATIO`).
    """
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
            if min(width, height) < MIN_IMAGE_SIDE:
                raise BadImageError(f"{width}x{height} px is smaller than {MIN_IMAGE_SIDE} px")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise BadImageError(f"{width}x{height} px is longer than {MAX_ASPECT_RATIO}:1")
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except Exception as error:
        # PIL's decoders raise many types on corrupt input (OSError, SyntaxError, struct.error,
        # IndexError, DecompressionBombError, ...): any of them means "skip this image".
        raise BadImageError(f"{type(error).__name__}: {error}") from error
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy())


_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"

_EXIF_ORIENTATION = 0x0112


def jpeg_size(encoded: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device decodes as it is (read from its header), else ``None``.

    ``None`` (PIL decodes the image in the worker instead) for other formats, CMYK and YCCK
    JPEGs, and JPEGs with an EXIF rotation, which nvJPEG would not apply. Only the header is
    read, so that the worker's share of the work stays small.

    Raises:
        BadImageError: a JPEG without its end-of-image marker (truncated), with an unreadable
            header, or degenerate (see :data:`MIN_IMAGE_SIDE`, :data:`MAX_ASPECT_RATIO`).
    """
    if not encoded.startswith(_JPEG_START):
        return None
    # Encoders may pad after the marker; a truncated file has none near its end.
    if _JPEG_END not in encoded[-64:]:
        raise BadImageError("the JPEG has no end-of-image marker: truncated")
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
            plain = image.mode in ("RGB", "L") and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception as error:  # PIL raises many types on a corrupt header, as in decode_image
        raise BadImageError(f"{type(error).__name__}: {error}") from error
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImageError(f"{width}x{height} px is smaller than {MIN_IMAGE_SIDE} px")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadImageError(f"{width}x{height} px is longer than {MAX_ASPECT_RATIO}:1")
    return (height, width) if plain else None


def decode_on(raw: Sequence[bytes | np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """The ``(3, H, W)`` uint8 images of ``raw`` on ``device``: JPEG bytes decoded there, arrays moved there.

    JPEG bytes (:func:`jpeg_size` accepted them) are decoded together by
    ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU); ``(3, H, W)``
    arrays are images the worker decoded with PIL. A JPEG the device cannot decode is decoded by
    PIL here, as the worker would have.

    Raises:
        ConfigError: an image that passed the worker's checks but that neither decoder reads.
    """
    jpegs = [i for i, item in enumerate(raw) if isinstance(item, bytes)]
    images: list[torch.Tensor | None] = [
        None if isinstance(item, bytes) else torch.from_numpy(item).to(device, non_blocking=True)
        for item in raw
    ]
    data = [torch.frombuffer(bytearray(raw[i]), dtype=torch.uint8) for i in jpegs]
    try:
        decoded = _decode_jpeg(data, device) if data else []
    except RuntimeError:  # one bad image fails the whole call: decode them one at a time
        decoded = [_decode_one(item, device) for item in data]
    for i, image in zip(jpegs, decoded, strict=True):
        images[i] = image
    return images  # type: ignore[return-value]


def _decode_jpeg(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; they still are its only nvJPEG path.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    try:
        return _decode_jpeg([data], device)[0]
    except RuntimeError:
        pass
    try:
        return decode_image(data.numpy().tobytes()).to(device)
    except BadImageError as error:
        raise ConfigError(
            f"an image passed the JPEG checks but neither the device nor PIL decodes it ({error}): "
            "run without --decode-on-device, which skips such images in the workers"
        ) from error

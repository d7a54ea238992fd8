"""Streaming ``datasets`` -> decoded, validated images -> the two views of MV-MR.

A batch holds, for each image, the non-augmented view x in ``"image"``, the augmented view x̃
(the paper's augmentation of section 7, or the subset of its steps that ``augmentations`` keeps,
its Table 7 ablation) in ``"augmented"``, both ``uint8 (B, 3, S, S)``, a stable
content key in ``"key"`` (so teacher outputs can be cached exactly) and the count of images
skipped since the previous batch in ``"skipped"``: a bad image is counted, never a crash. With
``device_views`` the workers only decode and resize: instead of ``"augmented"`` a batch carries
each image resized to a square ``"source"`` and the augmentation's random parameters, drawn as
without it, and :meth:`ViewsDataset.augmented_view` makes x̃ batched on the accelerator. How
every image mode is decoded, how the stream is split between processes and workers, and how a
resumed epoch continues where it stopped are specified in ``docs/data.md``.

Example::

    dataset = load_image_dataset("uoft-cs/cifar10", split="train")          # streaming
    loader, stats = build_dataloader(dataset, image_size=224, batch_size=256,
                                     rank=rank, world_size=world_size, num_workers=8)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for batch in loader:   # {"image": (B,3,S,S) uint8, "augmented": ..., "key": [...], "skipped": int}
            augmented = loader.dataset.augmented_view(batch, device)   # x̃, float in [0, 1]
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import signal
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import fsspec.asyn
import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.data.augment import (
    AUGMENTATIONS,
    CENTER_CROP_FRACTION,
    DEFAULT_CROP_SCALE,
    ViewAugment,
    ViewParams,
    center_view,
)
from mvmr_hf.distributed import blake2b_seed
from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import check_int, is_local_path, usable_cpus

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8
"""Images with a shorter side below this are skipped: upscaled to S they carry no structure
(the smallest common image data sets, the 8x8 digits, MNIST and CIFAR, are at least this big)."""

MAX_ASPECT_RATIO = 20.0
"""Images whose longer side exceeds this multiple of the shorter side (banners, 1-px lines) are
skipped: resizing their shorter side to S would make a huge intermediate image."""

KEY_BYTES = 16
"""Digest size of the blake2b sample key (32 hex characters)."""

IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture", "photo", "jpg", "png", "webp")
"""Column names tried, in order, when a data set has no (or several) ``Image`` features."""

Record = Mapping[str, Any]
"""One undecoded image as ``datasets`` gives it: ``{"bytes": bytes | None, "path": str | None}``."""


class BadImageError(ValueError):
    """An image that cannot be decoded or is degenerate; the data loader skips and counts it."""


@dataclass(frozen=True)
class DataStats:
    """What :func:`build_dataloader` knows before iterating.

    Attributes:
        image_column: the column the images are read from.
        streaming: whether the data set is a streamed ``IterableDataset``.
        num_examples: rows in the split over all processes (before skipping bad images), or
            ``None`` when a stream does not say.
    """

    image_column: str
    streaming: bool
    num_examples: int | None


# ----------------------------------------------------------------------------- loading


def _check_choice(kind: str, value: str, available: list[str], dataset: str, hint: str = "") -> None:
    if value not in available:
        raise ConfigError(
            f"Unknown {kind} {value!r} for dataset {dataset!r}: choose one of {available}{hint}."
        )


_FOLDER_SPLITS = (
    " (a local folder's splits are its train/, test/ and validation/ subfolders, each holding the images or "
    "one subfolder of images per class, which is then the label)"
)


def _check_config(path: str, config: str | None, name: str, hub: dict) -> None:
    """Explain a failed load by the configuration when it is unknown, or missing among several."""
    configs = datasets.get_dataset_config_names(path, **hub)
    if config is not None:
        _check_choice("config", config, configs, name)
    elif len(configs) > 1 and datasets.get_dataset_default_config_name(path, **hub) is None:
        raise ConfigError(f"Dataset {name!r} has several configs: pass one of {configs}.")


def load_image_dataset(
    name_or_path: str,
    *,
    config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> datasets.IterableDataset | datasets.Dataset:
    """Open one split of a Hub data set or a local folder with ``datasets.load_dataset``.

    Args:
        name_or_path: a Hub id (``owner/name``) or a local folder of parquet shards, an image
            folder, or anything else ``load_dataset(folder)`` understands.
        config: the data set's configuration (subset), when it has several.
        split: the split to read; ``streaming=False`` also accepts slices such as ``train[:10%]``.
        streaming: stream the rows (default) instead of downloading and converting the split.
        revision: a Hub branch, tag or commit.
        token: a Hub token for private or gated data sets (default: the logged-in one).
        cache_dir: where ``datasets`` caches downloads and converted files.

    Raises:
        ConfigError: a missing local path, an unreachable Hub id (offline, private, gated), an
            unknown configuration or an unknown split; the message lists the valid choices.
    """
    local = is_local_path(name_or_path)
    if local and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"Local dataset folder {name_or_path!r} does not exist: check the path.")
    path = str(Path(name_or_path).expanduser()) if local else name_or_path
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir}
    try:
        if streaming:
            if any(c in split for c in "[+"):
                raise ConfigError(f"Split {split!r} is a slice or a sum, which needs streaming=False.")
            # All splits of a stream are opened lazily, so this costs no more than opening one.
            splits = datasets.load_dataset(path, config, streaming=True, **hub)
            _check_choice("split", split, list(splits), name_or_path, _FOLDER_SPLITS if local else "")
            stream = splits[split]
            if local and _num_examples(stream) is None:
                _count_local_rows(stream, path, config, split)
            return stream
        # Check the split before load_dataset downloads and converts every split.
        available = datasets.get_dataset_split_names(path, config, **hub)
        for part in split.split("+"):
            _check_choice(
                "split", part.split("[")[0].strip(), available, name_or_path, _FOLDER_SPLITS if local else ""
            )
        return datasets.load_dataset(path, config, split=split, **hub)
    except ConfigError:
        raise
    except ValueError as error:
        _check_config(path, config, name_or_path, hub)
        raise error
    except FileNotFoundError as error:
        if local:
            raise ConfigError(
                f"Found no data in {name_or_path!r}: expected parquet shards, an image folder or another "
                f"format datasets can load ({error})."
            ) from error
        raise ConfigError(_unreachable(name_or_path)) from error
    except ConnectionError as error:
        raise ConfigError(_unreachable(name_or_path)) from error


def _count_local_rows(stream: datasets.IterableDataset, path: str, config: str | None, split: str) -> None:
    """Record the row count of a local split without reading its data.

    A local stream does not know its length, which ``--epochs`` needs: a parquet split's is in its
    files' footers, an image folder's is what :func:`_image_folder_rows` counts (an image that then
    fails to decode is skipped and counted as the loader reads it).
    """
    builder = datasets.load_dataset_builder(path, config)
    files = [str(f) for f in builder.config.data_files.get(split, [])]
    if files and all(f.endswith(".parquet") for f in files):
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    elif files and builder.name == "imagefolder":
        rows = _image_folder_rows(builder, split)
    else:
        return
    if rows is not None:
        stream.info.splits = datasets.SplitDict({split: datasets.SplitInfo(split, num_examples=rows)})


def _image_folder_rows(builder: datasets.DatasetBuilder, split: str) -> int | None:
    """The rows ``datasets``' image folder builder makes of ``split``; ``None`` where only reading tells.

    Its rules: a file is an image when its extension, or the one before it (``a.jpg.gz``), is an
    image extension; where the folder has metadata files, the rows are theirs instead (an image they
    do not name is no row, a name without its file is one). A wrong length would cut an epoch short
    or plan steps that never come, so the images inside ``.zip`` archives, filtered metadata and
    metadata in only some splits give ``None``.
    """
    config = builder.config
    names = config.metadata_filenames or builder.METADATA_FILENAMES
    files = [Path(str(f)) for f in config.data_files[split]]
    metadata = [str(f) for f in files if f.name in names]
    anywhere = any(Path(str(f)).name in names for listed in config.data_files.values() for f in listed)
    if config.filters is not None or any(f.suffix.lower() == ".zip" for f in files):
        return None
    if config.drop_metadata or not anywhere:
        return sum(
            f.suffix.lower() in IMAGE_EXTENSIONS or Path(f.stem).suffix.lower() in IMAGE_EXTENSIONS
            for f in files
        )
    # Without metadata of its own, a split's rows depend on the order in which datasets reads the splits.
    return sum(_metadata_rows(f) for f in metadata) if metadata else None


def _metadata_rows(path: str) -> int:
    """The rows of an image folder's metadata file, read as ``datasets`` reads them (by extension)."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as file:
            return sum(1 for line in file if line.strip())
    if path.endswith(".csv"):
        return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True)).num_rows
    return pq.ParquetFile(path).metadata.num_rows


def _unreachable(name: str) -> str:
    return (
        f"Cannot reach dataset {name!r} on the Hugging Face Hub (no network, HF_HUB_OFFLINE=1, a typo, "
        "or a private/gated data set): check the id, accept its terms on huggingface.co and log in with "
        "`hf auth login`, or pass a local folder of parquet shards or images instead."
    )


def resolve_image_column(features: Mapping[str, Any] | None, image_column: str | None) -> str:
    """Return the column holding the images.

    ``image_column`` is checked when given. Otherwise the single ``datasets.Image`` feature is
    used; failing that, the first column named like :data:`IMAGE_COLUMN_NAMES`.

    Raises:
        ConfigError: the column is missing, or none or several candidates exist; the message lists
            the columns.
    """
    if features is None:
        # Also what a streamed folder of text, CSV or JSON files gives: say so, not only how to cast.
        raise ConfigError(
            "Found no image column: the dataset does not declare its column types (a streamed folder of "
            "text, CSV or JSON files does not); pass a folder of images or parquet shards, or cast its image "
            "column first, e.g. dataset.cast_column('image', datasets.Image())."
        )
    columns = list(features)
    if image_column is not None:
        if image_column not in features:
            raise ConfigError(
                f"Image column {image_column!r} is not in the dataset: choose one of {columns}."
            )
        return image_column
    image_features = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(image_features) == 1:
        return image_features[0]
    candidates = image_features or columns
    named = [name for name in IMAGE_COLUMN_NAMES if name in candidates]
    if named:
        return named[0]
    if image_features:
        raise ConfigError(f"The dataset has several image columns {image_features}: pass image_column.")
    raise ConfigError(f"Found no image column among {columns}: pass image_column.")


# ----------------------------------------------------------------------------- decoding


def image_key(encoded: bytes) -> str:
    """The stable key of an image: the hex blake2b digest of its encoded bytes (32 characters)."""
    return hashlib.blake2b(encoded, digest_size=KEY_BYTES).hexdigest()


def read_encoded(record: Record) -> bytes:
    """The encoded bytes of an undecoded ``datasets`` image (embedded bytes, or the file at its path).

    Remote paths (an image folder streamed from the Hub) are opened with ``datasets``' ``xopen``,
    which uses the logged-in Hub token.

    Raises:
        BadImageError: the record has neither, or the file cannot be read.
    """
    if record.get("bytes") is not None:
        return record["bytes"]
    path = record.get("path")
    if path is None:
        raise BadImageError("the record has neither bytes nor a path")
    try:
        with xopen(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise BadImageError(f"cannot read {path}: {error}") from error


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


def _to_uint8(images01: torch.Tensor) -> torch.Tensor:
    return images01.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def default_source_size(image_size: int) -> int:
    """The side of the square ``"source"`` image sent for device views: ``image_size / 0.875``.

    The non-augmented view is cut at that resolution too (256 px for 224, see
    :data:`~mvmr_hf.data.augment.CENTER_CROP_FRACTION`); ``benchmarks/bench_dataloading.py`` measures
    how far larger sources bring the views to those cut from the full-resolution image.
    """
    return math.floor(image_size / CENTER_CROP_FRACTION)


# ----------------------------------------------------------------------------- the workers

CHUNK_ROWS = 8
"""Rows a DataLoader worker sends at once: few enough that a batch mixes every worker's rows,
enough to share the cost of moving tensors between processes (one shared-memory file per view)."""

_VIEWS = ("image", "augmented", "source")
"""The image tensors a sample can have, stacked per chunk."""

_START = {"row": 0, "block": 0, "block_start": None, "consumed": 0}
"""A worker's position before its first row: rows done, and for streams the shuffle block, the
stream position at the block's start and the rows of the block done."""


class ViewsDataset(torch.utils.data.IterableDataset):
    """Decoded, validated MV-MR views of one worker's share of one process's part of a split, in chunks.

    Built by :func:`build_dataloader`; :class:`ViewsLoader` batches the chunks in the training
    process (``docs/data.md`` gives the split between processes and workers, the order and
    resuming). Each worker yields its rows in chunks of up to :data:`CHUNK_ROWS`, aligned on its
    row count so that a resumed worker cuts the same chunks, then an end marker
    ``{"worker": w, "end": True}``. A chunk is ``{"worker": w, "end": False, "decoded": [bool per
    row], "positions": [the worker's position after each row], "keys": [...], "views": {name:
    (k, ...) uint8 tensor}, "view_params": {name: (k, ...) ndarray}}`` for its k decoded rows: an
    undecodable row is kept as ``decoded=False`` so that it is counted exactly once.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset | datasets.Dataset,
        *,
        image_column: str,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        source_size: int | None = None,
        augmentations: str | Sequence[str] = AUGMENTATIONS,
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        decode_on_device: bool = False,
    ) -> None:
        super().__init__()
        undecoded = dataset.select_columns([image_column])
        undecoded = undecoded.cast_column(image_column, datasets.Image(decode=False))
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self.source = undecoded
        self.image_column = image_column
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.augment = ViewAugment(image_size, augmentations=augmentations, scale=crop_scale)
        self.source_size = source_size
        self.decode_on_device = decode_on_device
        self.epoch = 0
        self.start: dict | None = None  # the loader's saved state to continue from, read by each worker

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration runs (its shard order, shuffle and augmentations)."""
        self.epoch = epoch

    def _worker_start(self, worker: int) -> dict | None:
        """Where ``worker`` starts: the epoch's start, its saved position, or ``None`` once it was done."""
        if self.start is None:
            return _START
        if worker not in self.start["active"]:
            return None
        return self.start["positions"][worker]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self._worker_start(worker)
        if start is None:
            return
        rows = self._stream_rows if self.streaming else self._table_rows
        chunk: list[tuple[Record, dict]] = []
        for record, position in rows(start, worker, num_workers):
            chunk.append((record, position))
            if position["row"] % CHUNK_ROWS == 0:
                yield self._chunk(worker, chunk)
                chunk = []
        if chunk:
            yield self._chunk(worker, chunk)
        yield {"worker": worker, "end": True}

    def _chunk(self, worker: int, rows: list[tuple[Record, dict]]) -> dict:
        """Decode ``rows`` and make their views: the chunk :class:`ViewsLoader` batches."""
        decoded, keys, samples = [], [], []
        for record, _ in rows:
            try:
                encoded = read_encoded(record)
                size = jpeg_size(encoded) if self.decode_on_device else None
                image = decode_image(encoded) if size is None else None
            except BadImageError as error:
                decoded.append(False)
                logger.debug("Skipping an image: %s", error)
                continue
            key = image_key(encoded)
            decoded.append(True)
            keys.append(key)
            if image is None:  # a JPEG the device decodes: only its bytes and the view's parameters travel
                samples.append({"raw": encoded, "view_params": self._device_params(*size, key)})
            elif self.decode_on_device:
                samples.append(
                    {"raw": image.numpy(), "view_params": self._device_params(*image.shape[-2:], key)}
                )
            else:
                samples.append(self._views(image, key))
        present = [name for name in _VIEWS if samples and name in samples[0]]
        views = {name: torch.stack([s[name] for s in samples]) for name in present}
        params = {}
        if samples and "view_params" in samples[0]:
            # numpy travels inside the chunk's pickle; each tensor would cost a shared-memory file
            names = samples[0]["view_params"]
            params = {n: torch.cat([s["view_params"][n] for s in samples]).numpy() for n in names}
        positions = [position for _, position in rows]
        raw = [
            sample["raw"] for sample in samples if "raw" in sample
        ]  # pickled inline: no shared-memory file
        return {"worker": worker, "end": False, "decoded": decoded, "positions": positions, "keys": keys,
                "views": views, "view_params": params, "raw": raw}  # fmt: skip

    def _views(self, image: torch.Tensor, key: str) -> dict[str, Any]:
        """The non-augmented view and either the augmented view or what the device needs to make it."""
        images01 = image.unsqueeze(0).float().div_(255.0)
        if self.source_size is not None:
            plain, source = self._plain_and_source(images01)
            return {
                "image": plain[0],
                "source": source[0],
                "view_params": self._device_params(*image.shape[-2:], key),
            }
        plain = center_view(images01, self.image_size, crop_fraction=CENTER_CROP_FRACTION)
        params = self._params(*image.shape[-2:], key)
        # The crop comes from the full-resolution image: a small crop of an image first shrunk to
        # S would be upsampled more, and so blurrier, than torchvision's RandomResizedCrop makes it.
        return {"image": _to_uint8(plain[0]), "augmented": _to_uint8(self.augment.apply(images01, params)[0])}

    def _params(self, height: int, width: int, key: str) -> ViewParams:
        """The augmentation's random parameters for the image ``key`` of ``height`` x ``width`` px this epoch.

        They are drawn on the full-resolution image in every path, from the same generator: the
        device views differ from the worker views only by the resampling.
        """
        generator = torch.Generator().manual_seed(blake2b_seed(self.seed, self.epoch, key))
        return self.augment.sample(1, height, width, generator=generator)

    def _device_params(self, height: int, width: int, key: str) -> dict[str, torch.Tensor]:
        """:meth:`_params` with the crop boxes moved onto the square source the device crops from."""
        params = self._params(height, width, key)
        side = self.source_size
        values = {f.name: getattr(params, f.name) for f in fields(params)}
        values["crop_boxes"] = params.crop_boxes * torch.tensor(
            [side / width, side / height] * 2, dtype=torch.float64
        )
        return values

    def _plain_and_source(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-augmented views and the square sources of same-sized ``images01``, rounded to 8 bits."""
        plain = center_view(images01, self.image_size, crop_fraction=CENTER_CROP_FRACTION)
        # Squashed to a square so that images of any shape batch; the crop boxes follow the squash.
        source = TF.resize(images01, [self.source_size, self.source_size], antialias=True)
        return _to_uint8(plain), _to_uint8(source)

    def views_on(
        self, batch: Mapping[str, Any], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's non-augmented and augmented views x and x̃ on ``device``, as floats in ``[0, 1]``.

        With ``decode_on_device`` the images are decoded on ``device`` first (:func:`decode_on`)
        and cut there as the workers cut them (same functions, batched by image size).
        """
        if "raw" in batch:
            batch = {**batch, **self._decoded_views(batch["raw"], device)}
        images = batch["image"].to(device, non_blocking=True).float().div_(255)
        return images, self.augmented_view(batch, device)

    def _decoded_views(
        self, raw: Sequence[bytes | np.ndarray], device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        images = decode_on(raw, device)
        plain = torch.empty((len(raw), 3, self.image_size, self.image_size), dtype=torch.uint8, device=device)
        source = torch.empty(
            (len(raw), 3, self.source_size, self.source_size), dtype=torch.uint8, device=device
        )
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for indices in by_size.values():
            same = torch.stack([images[i] for i in indices]).float().div_(255)
            plain[indices], source[indices] = self._plain_and_source(same)
        return {"image": plain, "source": source}

    def augmented_view(self, batch: Mapping[str, Any], device: torch.device | str) -> torch.Tensor:
        """The batch's augmented view x̃ on ``device`` as floats in ``[0, 1]``.

        Made by the workers, it is only moved; with device views it is made here, batched, and
        rounded to 8 bits like the workers' views, so both paths give the same values for the
        same parameters when the source is the image itself.
        """
        if "augmented" in batch:
            return batch["augmented"].to(device, non_blocking=True).float().div_(255)
        source = batch["source"].to(device, non_blocking=True).float().div_(255)
        views = self.augment.apply(source, ViewParams(**batch["view_params"]))
        return views.mul_(255).round_().div_(255)

    def _shard_order(self) -> np.ndarray:
        """The stream's shards in this epoch's order: permuted from ``(seed, epoch)``, or as stored."""
        shards = self.source.num_shards
        if self.shuffle_buffer == 0:
            return np.arange(shards)
        return np.random.default_rng(blake2b_seed(self.seed, self.epoch)).permutation(shards)

    def _stream_tasks(self, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        """``(shard, step, offset)`` for each shard ``worker`` reads, keeping every step-th row from offset.

        Whole shards are dealt to the workers in turn; with more workers than shards, the workers
        beyond share a shard by rows (each reads it all and keeps its own rows).
        """
        order = self._shard_order()
        if num_workers <= len(order):
            return [(int(order[i]), 1, 0) for i in range(worker, len(order), num_workers)]
        first = worker % len(order)
        return [(int(order[first]), len(range(first, num_workers, len(order))), worker // len(order))]

    def _stream_rows(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows in blocks of ``shuffle_buffer``, each block permuted, resumable per block."""
        reader = _StreamReader(self, self._stream_tasks(worker, num_workers), worker, start["block_start"])
        rows = reader.rows()
        block, block_start, consumed = start["block"], start["block_start"], start["consumed"]
        row = start["row"]
        while chunk := list(islice(rows, max(1, self.shuffle_buffer))):
            rng = np.random.default_rng(blake2b_seed(self.seed, self.epoch, self.rank, worker, block))
            order = rng.permutation(len(chunk))
            for position in range(consumed, len(chunk)):
                row += 1
                yield chunk[order[position]], {"row": row, "block": block, "block_start": block_start,
                                               "consumed": position + 1}  # fmt: skip
            block, block_start, consumed = block + 1, reader.cursor(), 0

    def _table_rows(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows of a map-style split: the epoch's permutation dealt to the processes in
        turn, then to the workers in chunks of :data:`CHUNK_ROWS` in turn, so that taking one chunk
        per worker in turn gives the process's rows in order, whatever the number of workers."""
        table = self.source
        usable = len(table) - len(table) % self.world_size
        if self.shuffle_buffer > 0:
            order = np.random.default_rng(blake2b_seed(self.seed, self.epoch)).permutation(len(table))[
                :usable
            ]
        else:
            order = np.arange(usable)
        mine = order[self.rank :: self.world_size]
        row = start["row"]
        while (index := _dealt(row, worker, num_workers)) < len(mine):
            row += 1
            yield table[int(mine[index])][self.image_column], {**_START, "row": row}


def _dealt(row: int, worker: int, num_workers: int) -> int:
    """Where ``worker``'s ``row``-th row is among the process's rows: chunks are dealt to workers in turn."""
    return (row // CHUNK_ROWS * num_workers + worker) * CHUNK_ROWS + row % CHUNK_ROWS


class _StreamReader:
    """One worker's rows of one process's part of a stream, from a cursor that :meth:`cursor` gives.

    Within each shard the worker keeps every step-th row (:meth:`ViewsDataset._stream_tasks`);
    the rows it keeps, counted over its shards, are dealt to the processes in turn, starting at
    process ``worker % world_size`` so that the workers' leftovers fall on different processes.
    Every process reads the same shards and decodes only its own rows.
    """

    def __init__(
        self, views: ViewsDataset, tasks: list[tuple[int, int, int]], worker: int, cursor: dict | None
    ) -> None:
        self.views, self.tasks, self.worker = views, tasks, worker
        cursor = cursor or {"task": 0, "shard_state": None, "shard_row": 0, "kept": 0}
        self.task, self.shard_row, self.kept = cursor["task"], cursor["shard_row"], cursor["kept"]
        self.shard_state = cursor["shard_state"]
        self.stream: datasets.IterableDataset | None = None

    def cursor(self) -> dict:
        """The position after the last row yielded (``datasets`` gives the shard's own, JSON-serialisable)."""
        state = self.stream.state_dict() if self.stream is not None else self.shard_state
        return {"task": self.task, "shard_state": state, "shard_row": self.shard_row, "kept": self.kept}

    def rows(self) -> Iterator[Record]:
        """The undecoded images of this worker's rows for this process, from the cursor on."""
        views = self.views
        if torch.utils.data.get_worker_info() is not None:
            fsspec.asyn.reset_lock()  # as datasets does in a worker: a lock forked from the parent hangs
        while self.task < len(self.tasks):
            shard, step, offset = self.tasks[self.task]
            self.stream = views.source.shard(num_shards=views.source.num_shards, index=shard)
            if self.shard_state is not None:
                self.stream.load_state_dict(self.shard_state)
            # iter(), unlike iterating the stream, does not split it again among the DataLoader workers
            for example in self.stream.iter(batch_size=1):
                self.shard_row += 1
                if (self.shard_row - 1) % step != offset:
                    continue
                self.kept += 1
                if (self.kept - 1 + self.worker) % views.world_size == views.rank:
                    yield example[views.image_column][0]
            self.task, self.shard_row, self.shard_state, self.stream = self.task + 1, 0, None, None


# ----------------------------------------------------------------------------- the loader


def _as_sent(chunk: dict) -> dict:
    """The DataLoader's collate function: a chunk travels as the worker made it (its arrays stay numpy)."""
    return chunk


class ViewsLoader:
    """Full batches of MV-MR views for one process, made in the training process from the workers' chunks.

    The chunks are taken one per worker in turn (a worker leaves the turn at its end marker),
    whatever order they arrive in; a batch is released once the next one is full or the epoch's
    data ran out, so that the last batch also counts the images skipped after it. Only the rows
    after the last full batch are dropped: fewer than ``batch_size`` images per epoch.

    ``dataset`` is the :class:`ViewsDataset` (``set_epoch``, ``augmented_view``);
    :meth:`state_dict` holds the epoch, each worker's position after its last row in a released
    batch and whose turn is next: :meth:`load_state_dict` continues there.
    """

    def __init__(
        self,
        dataset: ViewsDataset,
        *,
        num_workers: int,
        pin_memory: bool,
        worker_init_fn: Callable[[int], None] | None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Room for about two batches of chunks ahead, as when each worker made whole batches.
        ahead = max(2, math.ceil(2 * dataset.batch_size / CHUNK_ROWS / num_workers)) if num_workers else None
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_sent,
            worker_init_fn=worker_init_fn,
            prefetch_factor=ahead,
        )
        self._state: dict | None = None  # after the last batch released; None: the epoch's start
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """The epoch and the position after the last batch yielded (JSON-serialisable)."""
        return self._state if self._state is not None else self._start_state()

    def load_state_dict(self, state: dict) -> None:
        """Continue ``state``'s epoch after its last batch on the next iteration, whatever the epoch set.

        A map-style split can continue with another number of workers (its order does not depend
        on them); a stream cannot (the workers share its shards).
        """
        _check_state(state)
        workers = max(self.num_workers, 1)
        if state["num_workers"] != workers:
            if self.dataset.streaming:
                raise ConfigError(
                    f"The checkpoint's position in the stream is for {state['num_workers']} DataLoader "
                    f"worker(s) per process, which share its shards: resume with --num-workers "
                    f"{state['num_workers']} (0 and 1 are the same here)."
                )
            state = _redealt(state, workers)
        self._state = self._resume = state

    def _start_state(self) -> dict:
        workers = max(self.num_workers, 1)
        return {"epoch": self.dataset.epoch, "num_workers": workers, "active": list(range(workers)),
                "turn": 0, "positions": [_START] * workers}  # fmt: skip

    def __iter__(self) -> Iterator[dict]:
        resume, self._resume = self._resume, None
        if resume is not None:
            self.dataset.set_epoch(resume["epoch"])
        state = self._state = resume or self._start_state()
        self.dataset.start = state  # read by every worker, which the iterator below starts
        arrivals = iter(self.loader)
        active, positions = list(state["active"]), list(state["positions"])
        turn = active.index(state["turn"]) if active else 0
        waiting: dict[int, deque] = {worker: deque() for worker in range(state["num_workers"])}
        parts: list[tuple[dict, int, int]] = []  # (chunk, first, end) decoded rows of the batch being filled
        filled = skipped = 0
        held: tuple[dict, dict] | None = None  # the last full batch and its state, not yet yielded
        while active:
            worker = active[turn]
            chunk = _next_chunk(arrivals, waiting, worker)
            if chunk["end"]:
                del active[turn]
                turn = turn % len(active) if active else 0
                continue
            first = decoded = 0
            for row, is_decoded in enumerate(chunk["decoded"]):
                positions[worker] = chunk["positions"][row]
                if not is_decoded:
                    skipped += 1
                    continue
                decoded += 1
                filled += 1
                if filled < self.dataset.batch_size:
                    continue
                parts.append((chunk, first, decoded))
                rest = row + 1 < len(chunk["decoded"])  # the next batch goes on with this chunk
                after = {"epoch": state["epoch"], "num_workers": state["num_workers"], "active": list(active),
                         "turn": worker if rest else active[(turn + 1) % len(active)],
                         "positions": list(positions)}  # fmt: skip
                if held is not None:
                    self._state = held[1]
                    yield held[0]
                held = (self._collate(parts, skipped), after)
                parts, first, filled, skipped = [], decoded, 0, 0
            if decoded > first:
                parts.append((chunk, first, decoded))
            turn = (turn + 1) % len(active)
        if held is not None:
            held[0]["skipped"] += skipped  # the images skipped after the last full batch
            self._state = held[1]
            yield held[0]

    def _collate(self, parts: list[tuple[dict, int, int]], skipped: int) -> dict:
        """A batch of the decoded rows ``first:end`` of each chunk, copied once (to pinned memory if set)."""
        batch: dict[str, Any] = {}
        for name, view in parts[0][0]["views"].items():
            shape = (self.dataset.batch_size, *view.shape[1:])
            out = torch.empty(shape, dtype=view.dtype, pin_memory=self.pin_memory)
            batch[name] = torch.cat([chunk["views"][name][first:end] for chunk, first, end in parts], out=out)
        if params := parts[0][0]["view_params"]:
            batch["view_params"] = {
                name: torch.from_numpy(np.concatenate([c["view_params"][name][a:b] for c, a, b in parts]))
                for name in params
            }
        if parts[0][0]["raw"]:
            batch["raw"] = [item for chunk, first, end in parts for item in chunk["raw"][first:end]]
        batch["key"] = [key for chunk, first, end in parts for key in chunk["keys"][first:end]]
        batch["skipped"] = skipped
        return batch


def _next_chunk(arrivals: Iterator[dict], waiting: dict[int, deque], worker: int) -> dict:
    """``worker``'s next chunk; the chunks of other workers that arrive first wait for their turn."""
    while not waiting[worker]:
        chunk = next(arrivals)
        waiting[chunk["worker"]].append(chunk)
    return waiting[worker].popleft()


_STATE_KEYS = frozenset({"epoch", "num_workers", "active", "turn", "positions"})


def _check_state(state: Mapping[str, Any]) -> None:
    """Refuse, in one line, a saved loader state of another format."""
    if not isinstance(state, Mapping) or not set(state) >= _STATE_KEYS:
        raise ConfigError(
            "The checkpoint's data position was saved by an older mvmr_hf (per-worker batches): "
            "start a new run, or resume with the version that wrote it."
        )


def _redealt(state: Mapping[str, Any], num_workers: int) -> dict:
    """A map-style split's saved position for ``num_workers`` workers.

    The rows taken so far are the first ``done`` of the process's rows, whatever the workers
    (:meth:`ViewsDataset._table_rows`): each new worker has done those it is dealt among them,
    and the turn is that of the worker dealt the next row.
    """
    done = sum(position["row"] for position in state["positions"])
    chunks, rest = divmod(done, CHUNK_ROWS)
    rows = [CHUNK_ROWS * len(range(worker, chunks, num_workers)) for worker in range(num_workers)]
    rows[chunks % num_workers] += rest  # the worker in the middle of its chunk
    positions = [{**_START, "row": row} for row in rows]
    return {"epoch": state["epoch"], "num_workers": num_workers, "active": list(range(num_workers)),
            "turn": chunks % num_workers, "positions": positions}  # fmt: skip


def _ignore_signals(signals: tuple[int, ...], worker: int) -> None:
    for number in signals:
        signal.signal(number, signal.SIG_IGN)


def _num_examples(dataset: datasets.IterableDataset | datasets.Dataset) -> int | None:
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = dataset.info.splits
    if splits is None or dataset.split is None or str(dataset.split) not in splits:
        return None
    return splits[str(dataset.split)].num_examples or None


def default_num_workers() -> int:
    """DataLoader workers for one training process: the CPU cores this process may use, shared
    evenly among the processes of this machine (``LOCAL_WORLD_SIZE``, which ``accelerate launch``
    and ``torchrun`` set), at least 1.

    Every core a worker: on the 16-core H200 node 16 workers fed the loop 1.8 times as fast as
    12 (``benchmarks/results/loop-cuda*.json``), and more workers than cores only oversubscribe
    them (PyTorch warns).
    """
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def build_dataloader(
    dataset: datasets.IterableDataset | datasets.Dataset,
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    num_workers: int = 0,
    image_column: str | None = None,
    pin_memory: bool = False,
    device_views: bool = False,
    source_size: int | None = None,
    augmentations: str | Sequence[str] = AUGMENTATIONS,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    decode_on_device: bool = False,
    ignore_signals: Sequence[int] = (),
) -> tuple[ViewsLoader, DataStats]:
    """A resumable loader of MV-MR batches for process ``rank`` of ``world_size``.

    Batches are ``{"image": (B,3,S,S) uint8, "augmented": (B,3,S,S) uint8, "key": list[str],
    "skipped": int}`` with ``B = batch_size`` always: the workers decode, the training process
    batches (:class:`ViewsLoader`), so an epoch drops only the incomplete batch at its end
    (distance correlation needs full, equal batches on every process). The processes get as
    many rows as can be dealt evenly (``docs/data.md``); bad images, and for streams the
    workers' leftovers, can still leave one process a batch short, so the training loop must
    stop an epoch when any process runs out.

    Args:
        dataset: one split, from :func:`load_image_dataset` (streamed or map-style).
        image_size: side S of both views.
        batch_size: images per batch in this process.
        rank, world_size: this process and the number of processes.
        shuffle_buffer: streamed rows shuffled together (0: keep the stored order); for a
            map-style split any positive value means a full permutation per epoch.
        seed: seed of the shard order, the shuffles and the augmentations.
        num_workers: DataLoader worker processes, each single-threaded (0 decodes and augments in
            the training process, one image at a time). A stream gives each worker whole shards,
            or with more workers than shards every n-th row of one shard.
        image_column: the image column, or ``None`` to detect it (:func:`resolve_image_column`).
        pin_memory: pin batches in page-locked memory for faster copies to the GPU.
        device_views: workers only decode and resize; the augmented view is made on the device by
            ``loader.dataset.augmented_view(batch, device)`` (which also moves worker-made views).
        source_size: side of the square image sent for device views (default
            :func:`default_source_size`).
        augmentations: the steps of the augmented view among
            :data:`~mvmr_hf.data.augment.AUGMENTATIONS` (default all five, the paper's section 7; a
            subset is its Table 7 ablation, none gives x's framing), as a list or a comma-separated
            string (:func:`~mvmr_hf.data.augment.parse_augmentations`). The random parameters are those
            of the full augmentation, switched-off steps neutralised, in both the workers' and the
            device views.
        crop_scale: the area range of x̃'s random resized crop, as a fraction of the image
            (default the paper's 0.08-1).
        decode_on_device: the workers only read each JPEG's header and draw its view's parameters;
            ``loader.dataset.views_on(batch, device)`` decodes the batch's JPEGs on the device
            (nvJPEG on CUDA) and makes both views there (:func:`jpeg_size` says which images PIL
            still decodes in the workers). Needs ``device_views``.
        ignore_signals: signals the worker processes ignore: the training process handles them
            (a cluster's stop signal reaches every process of the job, workers included, which
            would otherwise die before the run can save its checkpoint).

    Call ``loader.dataset.set_epoch(epoch)`` before each epoch; save ``loader.state_dict()`` with
    checkpoints and restore it with ``loader.load_state_dict(state)`` (``docs/data.md``).
    """
    if not isinstance(dataset, datasets.Dataset | datasets.IterableDataset):
        raise ConfigError(
            f"Expected one split of a dataset (datasets.Dataset or IterableDataset), got "
            f"{type(dataset).__name__}: select a split, e.g. dataset['train']."
        )
    check_int("image_size", image_size, MIN_IMAGE_SIDE)
    check_int("batch_size", batch_size, 1)
    check_int("world_size", world_size, 1)
    check_int("num_workers", num_workers, 0)
    check_int("shuffle_buffer", shuffle_buffer, 0)
    if source_size is not None:
        check_int("source_size", source_size, MIN_IMAGE_SIDE)
    if decode_on_device and not device_views:
        raise ConfigError("decode_on_device makes the views on the device: pass device_views=True too.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    column = resolve_image_column(dataset.features, image_column)
    stats = DataStats(
        image_column=column,
        streaming=isinstance(dataset, datasets.IterableDataset),
        num_examples=_num_examples(dataset),
    )
    if stats.num_examples is not None and stats.num_examples // world_size < batch_size:
        raise ConfigError(
            f"The split has {stats.num_examples} images, fewer than {batch_size} per process for "
            f"{world_size} process(es): lower the batch size or use more data."
        )
    views = ViewsDataset(
        dataset,
        image_column=column,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        source_size=(source_size or default_source_size(image_size)) if device_views else None,
        augmentations=augmentations,
        crop_scale=crop_scale,
        decode_on_device=decode_on_device,
    )
    loader = ViewsLoader(
        views,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_ignore_signals, tuple(ignore_signals)) if ignore_signals else None,
    )
    return loader, stats

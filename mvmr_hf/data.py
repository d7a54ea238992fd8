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
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.augment import AUGMENTATIONS, CENTER_CROP_FRACTION, ViewAugment, ViewParams, center_view
from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import check_int, is_local_path

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


def _check_choice(kind: str, value: str, available: list[str], dataset: str) -> None:
    if value not in available:
        raise ConfigError(f"Unknown {kind} {value!r} for dataset {dataset!r}: choose one of {available}.")


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
            _check_choice("split", split, list(splits), name_or_path)
            stream = splits[split]
            if local and _num_examples(stream) is None:
                _count_local_parquet_rows(stream, path, config, split)
            return stream
        # Check the split before load_dataset downloads and converts every split.
        available = datasets.get_dataset_split_names(path, config, **hub)
        for part in split.split("+"):
            _check_choice("split", part.split("[")[0].strip(), available, name_or_path)
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


def _count_local_parquet_rows(
    stream: datasets.IterableDataset, path: str, config: str | None, split: str
) -> None:
    """Record the row count of a local parquet split from the files' footers (no data is read).

    A local stream does not know its length, which ``--epochs`` needs; parquet stores it.
    """
    files = datasets.load_dataset_builder(path, config).config.data_files.get(split, [])
    if files and all(str(f).endswith(".parquet") for f in files):
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        stream.info.splits = datasets.SplitDict({split: datasets.SplitInfo(split, num_examples=rows)})


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
        raise ConfigError(
            "The dataset does not declare its column types: cast its image column first, e.g. "
            "dataset.cast_column('image', datasets.Image())."
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


def _seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _to_uint8(images01: torch.Tensor) -> torch.Tensor:
    return images01.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def default_source_size(image_size: int) -> int:
    """The side of the square ``"source"`` image sent for device views: ``image_size / 0.875``.

    The non-augmented view is cut at that resolution too (256 px for 224, see
    :data:`~mvmr_hf.augment.CENTER_CROP_FRACTION`); ``benchmarks/bench_dataloading.py`` measures
    how far larger sources bring the views to those cut from the full-resolution image.
    """
    return math.floor(image_size / CENTER_CROP_FRACTION)


# ----------------------------------------------------------------------------- the iterable


class ViewsDataset(torch.utils.data.IterableDataset):
    """Batches of decoded, validated MV-MR views from one process's part of a ``datasets`` split.

    Built by :func:`build_dataloader` (which documents the batches); see ``docs/data.md`` for
    the order, the per-process split, the skipped-image counts and resuming. Batching happens
    here rather than in the DataLoader so that the images skipped after a worker's last full
    batch, and those of its dropped incomplete batch, are still counted: each full batch is held
    until the next one is complete, and the last one also carries the skips that follow it (a
    worker that never fills a batch has nothing to report them with).
    ``state_dict``/``load_state_dict`` make it resumable by
    :class:`~torchdata.stateful_dataloader.StatefulDataLoader`.
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
        self.augment = ViewAugment(image_size, augmentations=augmentations)
        self.source_size = source_size
        self.epoch = 0
        self._state = self._start_state()
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration runs (its shard order, shuffle and augmentations)."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        """The epoch and the position after the last batch yielded (in this worker)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue ``state``'s epoch after its last yielded batch on the next iteration."""
        self.epoch = state["epoch"]
        self._resume = dict(state)

    def _start_state(self) -> dict:
        return {"epoch": self.epoch, "block": 0, "block_start": None, "consumed": 0}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume, self._resume = self._resume, None
        self._state = resume if resume is not None and resume["epoch"] == self.epoch else self._start_state()
        start = {name: value for name, value in self._state.items() if name != "epoch"}
        records = self._stream_records if self.streaming else self._table_records
        samples: list[dict] = []
        skipped = 0
        held: tuple[list[dict], int, dict] | None = None  # the last full batch, not yet yielded
        for record, position in records(start, worker, num_workers):
            try:
                encoded = read_encoded(record)
                image = decode_image(encoded)
            except BadImageError as error:
                skipped += 1
                logger.debug("Skipping an image: %s", error)
                continue
            key = image_key(encoded)
            samples.append({**self._views(image, key), "key": key})
            if len(samples) == self.batch_size:
                if held is not None:
                    yield self._emit(*held)
                held, samples, skipped = (samples, skipped, position), [], 0
        if held is not None:
            # The last full batch also reports the skips after it; resuming from it ends the epoch.
            yield self._emit(held[0], held[1] + skipped, position)

    def _emit(self, samples: list[dict], skipped: int, position: dict) -> dict:
        self._state = {"epoch": self.epoch, **position}
        views = [name for name in ("image", "augmented", "source") if name in samples[0]]
        batch = {name: torch.stack([s[name] for s in samples]) for name in views}
        if "view_params" in samples[0]:
            names = samples[0]["view_params"]
            batch["view_params"] = {n: torch.cat([s["view_params"][n] for s in samples]) for n in names}
        return {**batch, "key": [s["key"] for s in samples], "skipped": skipped}

    def _views(self, image: torch.Tensor, key: str) -> dict[str, Any]:
        """The non-augmented view and either the augmented view or what the device needs to make it."""
        images01 = image.unsqueeze(0).float().div_(255.0)
        plain = center_view(images01, self.image_size, crop_fraction=CENTER_CROP_FRACTION)
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch, key))
        # The parameters are drawn on the full-resolution image in both paths, from the same
        # generator: the device views differ from the worker views only by the resampling.
        height, width = image.shape[-2:]
        params = self.augment.sample(1, height, width, generator=generator)
        if self.source_size is None:
            # The crop comes from the full-resolution image: a small crop of an image first shrunk to
            # S would be upsampled more, and so blurrier, than torchvision's RandomResizedCrop makes it.
            return {
                "image": _to_uint8(plain[0]),
                "augmented": _to_uint8(self.augment.apply(images01, params)[0]),
            }
        side = self.source_size
        # Squashed to a square so that images of any shape batch; the crop boxes follow the squash.
        source = TF.resize(images01, [side, side], antialias=True)
        scale = torch.tensor([side / width, side / height] * 2, dtype=torch.float64)
        values = {f.name: getattr(params, f.name) for f in fields(params)}
        values["crop_boxes"] = params.crop_boxes * scale
        return {"image": _to_uint8(plain[0]), "source": _to_uint8(source[0]), "view_params": values}

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

    def _stream_records(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows in blocks of ``shuffle_buffer``, each block permuted, resumable per block."""
        # A fresh split per iteration: datasets keeps its epoch in a tensor shared by all DataLoader
        # workers, which would race if two workers set it at once.
        stream = split_dataset_by_node(self.source, self.rank, self.world_size)
        if self.shuffle_buffer > 0:
            # datasets >= 5.0 permutes the shards by a non-zero epoch (earlier releases only after
            # .shuffle(), whose buffer would be lost on resume); derived from the seed, never 0.
            stream.set_epoch(1 + _seed(self.seed, self.epoch) % (1 << 31))
        if start["block_start"] is not None:
            stream.load_state_dict(start["block_start"])
        rows = iter(stream)
        block, block_start, consumed = start["block"], start["block_start"], start["consumed"]
        while chunk := list(islice(rows, max(1, self.shuffle_buffer))):
            rng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, worker, block))
            order = rng.permutation(len(chunk))
            for position in range(consumed, len(chunk)):
                row = chunk[order[position]][self.image_column]
                yield row, {"block": block, "block_start": block_start, "consumed": position + 1}
            block, block_start, consumed = block + 1, stream.state_dict(), 0

    def _table_records(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows of a map-style split: one permutation per epoch, dealt to processes, workers."""
        table = self.source
        usable = len(table) - len(table) % self.world_size
        if self.shuffle_buffer > 0:
            order = np.random.default_rng(_seed(self.seed, self.epoch)).permutation(len(table))[:usable]
        else:
            order = np.arange(usable)
        mine = order[self.rank :: self.world_size][worker::num_workers]
        for position in range(start["consumed"], len(mine)):
            row = table[int(mine[position])]
            yield row[self.image_column], {"block": 0, "block_start": None, "consumed": position + 1}


# ----------------------------------------------------------------------------- the loader


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
    ignore_signals: Sequence[int] = (),
) -> tuple[StatefulDataLoader, DataStats]:
    """A resumable loader of MV-MR batches for process ``rank`` of ``world_size``.

    Batches are ``{"image": (B,3,S,S) uint8, "augmented": (B,3,S,S) uint8, "key": list[str],
    "skipped": int}`` with ``B = batch_size`` always (the last incomplete batch of each worker is
    dropped: distance correlation needs full, equal batches on every process). The number of
    batches can differ between processes (shards of different sizes, bad images), so the training
    loop must stop an epoch when any process runs out.

    Args:
        dataset: one split, from :func:`load_image_dataset` (streamed or map-style).
        image_size: side S of both views.
        batch_size: images per batch in this process.
        rank, world_size: this process and the number of processes.
        shuffle_buffer: streamed rows shuffled together (0: keep the stored order); for a
            map-style split any positive value means a full permutation per epoch.
        seed: seed of the shard order, the shuffles and the augmentations.
        num_workers: DataLoader worker processes, each single-threaded (0 decodes and augments in
            the training process, one image at a time; a stream gives each worker whole shards, so
            more workers than shards per process leaves some idle).
        image_column: the image column, or ``None`` to detect it (:func:`resolve_image_column`).
        pin_memory: pin batches in page-locked memory for faster copies to the GPU.
        device_views: workers only decode and resize; the augmented view is made on the device by
            ``loader.dataset.augmented_view(batch, device)`` (which also moves worker-made views).
        source_size: side of the square image sent for device views (default
            :func:`default_source_size`).
        augmentations: the steps of the augmented view among
            :data:`~mvmr_hf.augment.AUGMENTATIONS` (default all five, the paper's section 7; a
            subset is its Table 7 ablation, none gives x's framing), as a list or a comma-separated
            string (:func:`~mvmr_hf.augment.parse_augmentations`). The random parameters are those
            of the full augmentation, switched-off steps neutralised, in both the workers' and the
            device views.
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
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    column = resolve_image_column(dataset.features, image_column)
    stats = DataStats(
        image_column=column,
        streaming=isinstance(dataset, datasets.IterableDataset),
        num_examples=_num_examples(dataset),
    )
    if not stats.streaming and len(dataset) // world_size < batch_size:
        raise ConfigError(
            f"The split has {len(dataset)} images, fewer than {batch_size} per process for {world_size} "
            "process(es): lower the batch size or use more data."
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
    )
    # The views are batched by the dataset itself (see ViewsDataset), hence batch_size=None.
    loader = StatefulDataLoader(
        views,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_ignore_signals, tuple(ignore_signals)) if ignore_signals else None,
    )
    return loader, stats

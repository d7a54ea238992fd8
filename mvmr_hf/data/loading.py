"""Images from ``datasets``: a data set streamed (Hub id or local folder, every supported layout),
its image column, each image's encoded bytes and stable content key, and what is known of its size.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from datasets.utils.file_utils import xopen

from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import is_local_path

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
    image_column: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    check_rows: Callable[[int], None] | None = None,
) -> datasets.IterableDataset | datasets.Dataset:
    """Open one split of a Hub data set or a local folder with ``datasets.load_dataset``.

    Args:
        name_or_path: a Hub id (``owner/name``) or a local folder of parquet shards, an image
            folder, or anything else ``load_dataset(folder)`` understands.
        config: the data set's configuration (subset), when it has several.
        split: the split to read; ``streaming=False`` also accepts slices such as ``train[:10%]``.
        streaming: stream the rows (default) instead of downloading and converting the split.
        image_column: a column the caller will read the images from, checked here, before anything is
            downloaded or converted (``None``: nothing to check yet; :func:`resolve_image_column` finds it).
        revision: a Hub branch, tag or commit.
        token: a Hub token for private or gated data sets (default: the logged-in one).
        cache_dir: where ``datasets`` caches downloads and converted files.
        check_rows: called with the split's number of images where it is known before reading (a
            local folder's files or parquet footers, a Hub data set's declared sizes), before a
            non-streamed split is downloaded or converted; it raises to refuse the split (for example
            :func:`~mvmr_hf.data.loader.check_enough_images`). Not called for a slice.

    Raises:
        ConfigError: a missing local path, an unreachable Hub id (offline, private, gated), an
            unknown configuration, an unknown split or an unknown ``image_column``; the message lists the
            valid choices.
    """
    local = is_local_path(name_or_path)
    if local and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"Local dataset folder {name_or_path!r} does not exist: check the path.")
    path = str(Path(name_or_path).expanduser()) if local else name_or_path
    hub = {"revision": revision, "token": token, "cache_dir": cache_dir}
    if streaming and any(c in split for c in "[+"):
        raise ConfigError(f"Split {split!r} is a slice or a sum, which needs streaming=False.")
    try:
        # Every split opened lazily (no more than opening one): the split and the image column are
        # checked before load_dataset downloads and converts every split, and prints its progress bars.
        splits = datasets.load_dataset(path, config, streaming=True, **hub)
        parts = [part.split("[")[0].strip() for part in split.split("+")]
        for part in parts:
            _check_choice("split", part, list(splits), name_or_path, _FOLDER_SPLITS if local else "")
        lazy = splits[parts[0]]
        if image_column is not None and lazy.features is not None:  # no declared types: told when read
            resolve_image_column(lazy.features, image_column)
        whole = split == parts[0]
        if local and whole and _num_examples(lazy) is None:
            _count_local_rows(lazy, path, config, split)
        rows = _num_examples(lazy) if whole else None
        if check_rows is not None and rows is not None:
            check_rows(rows)
        if not streaming:
            return datasets.load_dataset(path, config, split=split, **hub)
        return lazy
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


# ----------------------------------------------------------------------------- the encoded image


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


def _num_examples(dataset: datasets.IterableDataset | datasets.Dataset) -> int | None:
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = dataset.info.splits
    if splits is None or dataset.split is None or str(dataset.split) not in splits:
        return None
    return splits[str(dataset.split)].num_examples or None

"""Frozen features: the encoder behind ``--model`` and a split's features, extracted once and cached.

:func:`load_encoder` turns ``--model`` (a release folder, a Hub id, a timm name, a transformers
model) into an :class:`Encoder`; :func:`extract_features` runs it over a split with the model's own
preprocessing of the non-augmented view. Under ``accelerate launch`` / ``torchrun`` with P
processes, process ``p`` extracts rows ``p, p + P, ...`` of the split and the shares are gathered,
so every process holds the split's features in row order, those of a single process. The features
stay on the evaluation device when they take at most half its free memory (:func:`feature_device`),
else on the CPU: ImageNet's training split, 1.28 M x 2048, takes 10.5 GB in float32 (5.2 GB in
float16, which the probe and kNN also take), so it stays on a GPU with 21 GB free. They are cached
on disk as safetensors per (model, dataset, split), written by the main process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import timm
import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.data.augment import center_view
from mvmr_hf.data.decode import decode_image
from mvmr_hf.data.loading import BadImageError, read_encoded, resolve_image_column
from mvmr_hf.distributed import holds_on_every_process, launch_state
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.multilabel import (
    MultiHot,
    multi_hot_encoding,
)
from mvmr_hf.models.representations.teacher import load_teacher, loading_errors
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS
from mvmr_hf.release.align import load_alignment
from mvmr_hf.release.export import is_release, load_release
from mvmr_hf.utils import atomic_write, is_local_path, sha256_of_files

DEVICE_MEMORY_FRACTION = 0.5
"""Share of the device's free memory a feature matrix may take and still stay on the device."""


class Encoder(nn.Module):
    """A frozen model as evaluation sees it: ``[0, 1]`` views of side :attr:`view_size` -> ``(B, D)``.

    Images are first brought to a common square :attr:`view_size` with
    :func:`~mvmr_hf.data.augment.center_view` (so that they can be batched); ``forward`` then applies
    the rest of the model's own preprocessing. :attr:`fingerprint` identifies the features (for
    the cache); :attr:`text_model` names the CLIP-style model whose text tower classifies the
    features zero-shot, after :attr:`alignment` when a student's head maps them into its space.

    Args:
        model: maps the preprocessed ``(B, 3, S, S)`` views to ``(B, ...)`` features, flattened to
            ``(B, D)``; it is put in eval mode and frozen.
        view_size: the side of the square views in [0, 1] that :meth:`forward` takes.
        fingerprint: JSON-able facts identifying the model's features (a release's file hashes, a
            teacher's fingerprint), part of the feature cache's key.
        crop: the side of the center crop taken from each view; None: no crop.
        mean: the per-channel mean to normalise with; None (or ``std`` None): no normalisation.
        std: the per-channel standard deviation to normalise with.
        text_model: the name or path of the CLIP-style model whose text tower classifies zero-shot;
            None: no zero-shot.
        alignment: a student's alignment head into ``text_model``'s embedding space, applied by
            zero-shot (not by :meth:`forward`); None: the features are already in that space.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        view_size: int,
        fingerprint: dict[str, Any],
        crop: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        text_model: str | None = None,
        alignment: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.view_size = view_size
        self.crop = crop
        self.mean, self.std = mean, std
        self.fingerprint = fingerprint
        self.text_model = text_model
        self.alignment = alignment.eval() if alignment is not None else None

    @torch.no_grad()
    def forward(self, views01: Tensor) -> Tensor:
        """``(B, D)`` float32 features of ``(B, 3, view_size, view_size)`` views in ``[0, 1]``."""
        x = TF.center_crop(views01, [self.crop, self.crop]) if self.crop else views01
        if self.mean is not None and self.std is not None:
            x = TF.normalize(x, list(self.mean), list(self.std))
        return self.model(x).flatten(1).float()


def timm_encoder(
    model: nn.Module, data_config: Mapping[str, Any], fingerprint: dict[str, Any], **heads: Any
) -> Encoder:
    """An :class:`Encoder` for a timm model without classifier, with timm's eval preprocessing.

    timm resizes the shorter side to ``floor(size / crop_pct)``, center crops ``size`` and
    normalizes; the antialiased resize of :func:`~mvmr_hf.data.augment.center_view` stands in for
    timm's PIL resize. ``heads`` (``text_model``, ``alignment``) are passed to the encoder.
    """
    size = data_config["input_size"][-1]
    return Encoder(
        model,
        view_size=math.floor(size / data_config.get("crop_pct", 1.0)),
        crop=size,
        mean=data_config["mean"],
        std=data_config["std"],
        fingerprint=fingerprint,
        **heads,
    )


def _release_encoder(folder: Path) -> Encoder:
    model, data_config = load_release(folder)
    alignment = load_alignment(folder)
    heads = {"alignment": alignment[0], "text_model": alignment[1].teacher} if alignment else {}
    fingerprint = {"release": sha256_of_files([folder / CONFIG, folder / WEIGHTS])}
    return timm_encoder(model, data_config, fingerprint, **heads)


def _teacher_encoder(name_or_path: str, output: str) -> Encoder:
    """A transformers model through :func:`load_teacher`; image-text models keep their text tower's name."""
    teacher = load_teacher(name_or_path, output=output)
    settings = teacher.settings
    sizes = [settings.shortest_edge, *(settings.resize_to or ()), *(settings.crop or ())]
    return Encoder(
        teacher,
        view_size=max(s for s in sizes if s),
        fingerprint=teacher.fingerprint(),
        text_model=name_or_path if teacher.output == "embedding" else None,
    )


def locate_model(
    name_or_path: str, *, option: str = "--model"
) -> tuple[Literal["release", "timm", "transformers"], str]:
    """What ``--model`` names and where to load it from: ``(kind, folder or name)``.

    * a release folder (``config.json`` in timm format): ``("release", folder)``;
    * a ``transformers`` model folder or a Hub id whose config is not timm's: ``("transformers", id)``;
    * a timm model name (``resnet50.a1_in1k``): ``("timm", name)``, timm's pretrained weights;
    * a Hub id with a timm-format ``config.json`` (a pushed release): downloaded, ``("release", folder)``.

    Raises ConfigError for a local path that is no folder and for a name that is none of these; its
    message names ``option``, the command-line option that gave ``name_or_path``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ("release", str(path)) if is_release(path) else ("transformers", name_or_path)
    if is_local_path(name_or_path):
        raise ConfigError(f"{option} {name_or_path} is not an existing folder: check the path.")
    if timm.is_model(name_or_path.split(".")[0]) and "/" not in name_or_path:
        return "timm", name_or_path
    try:
        config = json.loads(Path(hf_hub_download(name_or_path, CONFIG)).read_text())
        if "pretrained_cfg" not in config:
            return "transformers", name_or_path
        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])
    except (OSError, HTTPError, HFValidationError) as error:
        raise ConfigError(
            f"{option} {name_or_path} is neither a folder, a timm model name nor a reachable Hub model "
            f"({type(error).__name__}): check the name, or pass a local folder."
        ) from None
    return "release", folder


def load_encoder(name_or_path: str, *, teacher_output: str = "auto", option: str = "--model") -> Encoder:
    """The :class:`Encoder` for ``--model`` (see :func:`locate_model`; errors name ``option``).

    A release: its backbone, and its alignment head when fitted; a timm name: timm's pretrained
    weights without classifier; a ``transformers`` model:
    :func:`~mvmr_hf.models.representations.teacher.load_teacher` with ``teacher_output``.
    """
    kind, where = locate_model(name_or_path, option=option)
    if kind == "release":
        return _release_encoder(Path(where))
    if kind == "transformers":
        return _teacher_encoder(where, teacher_output)
    # timm downloads the name's weights from the Hub: offline, that fails like a Hub id does.
    with loading_errors(where, what=option):
        model = timm.create_model(where, pretrained=True, num_classes=0)
    data_config = timm.data.resolve_model_data_config(model)
    return timm_encoder(model, data_config, {"timm": where, "version": timm.__version__})


@dataclass
class FeatureSet:
    """Frozen features of a split in row order: ``features`` (N, D) float32, ``labels`` (N,) int64.

    Both are on the evaluation device when the features fit there (:func:`feature_device`), else
    on the CPU. ``labels`` is all -1 when the split was read without a label column, and the
    (N, C) uint8 multi-hot targets for a multi-label column (:mod:`mvmr_hf.evaluation.multilabel`).
    ``skipped`` counts the images that could not be decoded (see :mod:`mvmr_hf.data.decode`); they are
    left out together with their labels.
    """

    features: Tensor
    labels: Tensor
    skipped: int = 0


def class_names(features: Mapping[str, Any], label_column: str) -> list[str] | None:
    """The class names of ``label_column``, a column of class ids: ``None`` for plain integers."""
    feature = features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


class _Views(torch.utils.data.IterableDataset):
    """``(row, center view, label)`` for the rows of a split (``view`` None when it cannot be decoded).

    The label is the class id (-1 without a label column), or the row's ``targets`` encoding for
    a multi-label column.

    Process ``p`` of ``P`` reads rows ``p, p + P, ...``, and its DataLoader worker ``w`` of ``n``
    every ``n``-th of those from the ``w``-th; the row index lets the caller restore the split's
    order whatever the numbers of processes and workers.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        view_size: int,
        *,
        targets: MultiHot | None = None,
        process: int = 0,
        num_processes: int = 1,
    ):
        super().__init__()
        columns = [image_column] + ([label_column] if label_column else [])
        self.split = split.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.view_size = image_column, label_column, view_size
        self.targets, self.process, self.num_processes = targets, process, num_processes

    def _label(self, row: Mapping[str, Any]) -> Tensor:
        if self.label_column is None:
            return torch.tensor(-1)
        if self.targets is not None:
            return self.targets(row[self.label_column])
        return torch.tensor(int(row[self.label_column]))

    def __iter__(self) -> Iterator[tuple[int, Tensor | None, Tensor]]:
        """This worker's rows: decoded (bad images yield ``None``), center view of side ``view_size``."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, step = self.process + self.num_processes * worker, self.num_processes * num_workers
        for index in range(first, len(self.split), step):
            row = self.split[index]
            label = self._label(row)
            try:
                image = decode_image(read_encoded(row[self.image_column]))
            except BadImageError:
                yield index, None, label
                continue
            yield index, center_view(image.unsqueeze(0).float().div_(255.0), self.view_size)[0], label


def _collate(
    samples: list[tuple[int, Tensor | None, Tensor]],
) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    good = [s for s in samples if s[1] is not None]
    return (
        torch.tensor([index for index, _, _ in good], dtype=torch.long),
        torch.stack([view for _, view, _ in good]) if good else None,
        torch.stack([label for _, _, label in good]) if good else None,
        len(samples) - len(good),
    )


def _cache_path(cache_dir: Path, fingerprint: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / f"{digest[:24]}.safetensors"


def _read_cache(path: Path) -> FeatureSet:
    stored = load_file(path)
    with safe_open(str(path), framework="pt") as file:
        skipped = int(file.metadata()["skipped"])
    return FeatureSet(stored["features"], stored["labels"], skipped)


def _write_cache(path: Path, result: FeatureSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": result.features.cpu().contiguous(), "labels": result.labels.cpu().contiguous()}
    atomic_write(path, lambda partial: save_file(tensors, partial, metadata={"skipped": str(result.skipped)}))


def _process_device(device: str | torch.device | None) -> torch.device:
    """This process's device: ``device``, by default the launch's (Accelerate's ``PartialState``).

    Without a launcher that is the GPU when there is one, else the CPU; under ``accelerate
    launch`` or ``torchrun`` each process's own GPU, which ``"cuda"`` then also means.
    """
    state = launch_state()
    if device is None:
        return state.device
    device = torch.device(device)
    return state.device if state.use_distributed and device.type == state.device.type else device


def feature_device(nbytes: int, device: torch.device) -> torch.device:
    """Where ``nbytes`` of features live: ``device`` if they take at most half its free memory, else the CPU.

    The other half leaves room for the model, the test split's features and the chunks of the
    probe and kNN (:data:`CHUNK_ELEMENTS`). ImageNet's training split (1.28 M x 2048 float32,
    10.5 GB) thus stays on a GPU with 21 GB free. Features on the CPU still reach the device a
    chunk at a time.
    """
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_MEMORY_FRACTION * free else torch.device("cpu")


def _padded(tensor: Tensor, length: int, fill: int) -> Tensor:
    return torch.cat([tensor, tensor.new_full((length - len(tensor), *tensor.shape[1:]), fill)])


def _gather_split(
    state: PartialState,
    rows: Tensor,
    features: Tensor,
    labels: Tensor,
    skipped: int,
    *,
    home: torch.device,
    rows_per_gather: int,
) -> FeatureSet:
    """Every process's rows, features and labels, in the split's row order, on every process, on ``home``.

    ``labels`` are class ids (n,) or multi-hot targets (n, C). Shares differ in length (by a row,
    or by undecodable images), so the gather of the row indices pads them to the longest with row
    -1. Features and labels are gathered ``rows_per_gather`` rows per process at a time straight
    into the preallocated result: padded copies never take more than one such chunk.
    """
    on = state.device if state.use_distributed else home  # NCCL gathers GPU tensors, gloo CPU ones
    every_row = gather(pad_across_processes(rows.to(on), pad_index=-1))
    skipped = int(gather(torch.tensor([skipped], device=on)).sum())
    ordered_rows = every_row[every_row >= 0].sort().values
    result = FeatureSet(
        torch.empty(len(ordered_rows), features.shape[1], dtype=features.dtype, device=home),
        torch.empty(len(ordered_rows), *labels.shape[1:], dtype=labels.dtype, device=home),
        skipped,
    )
    share = len(every_row) // state.num_processes  # the longest share: every process's, padded
    shares = every_row.view(state.num_processes, share)
    for start in range(0, share, rows_per_gather):
        length = min(rows_per_gather, share - start)
        chunk_rows = shares[:, start : start + length].reshape(-1)  # process-major, as gather concatenates
        keep = chunk_rows >= 0
        where = torch.searchsorted(ordered_rows, chunk_rows[keep]).to(home)
        for local, gathered in ((features, result.features), (labels, result.labels)):
            chunk = gather(_padded(local[start : start + length].to(on), length, 0))
            gathered[where] = chunk[keep].to(home)
    return result


def extract_features(
    encoder: Encoder,
    split: datasets.Dataset,
    *,
    image_column: str | None = None,
    label_column: str | None = "label",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    targets: MultiHot | None = None,
) -> FeatureSet:
    """Frozen features of every image of ``split`` (no augmentation: the center view), in row order.

    ``split`` is a map-style ``datasets.Dataset`` (``load_image_dataset(..., streaming=False)``).
    Under ``accelerate launch`` / ``torchrun`` with P processes, call it on every process: process
    ``p`` extracts rows ``p, p + P, ...`` on its own device, and every process gets the whole
    split back (gathered, in row order: the features of a single process). ``device`` defaults
    to the launch's device for this process (the GPU when there is one, else the CPU); the
    features stay there when they fit (:func:`feature_device`), else on the CPU.

    With ``cache_dir``, the result is stored as ``<hash>.safetensors`` (by the main process)
    keyed by the encoder's fingerprint, its view size, the columns and the split's ``datasets``
    fingerprint (which changes with the data), and read back on the next call. ``label_column=None``
    reads unlabelled images (labels -1); a labelled split must not contain -1 labels.

    A multi-label column (several classes or a multi-hot vector per image, see
    :mod:`mvmr_hf.evaluation.multilabel`) gives (N, C) uint8 targets, encoded by ``targets``: by default
    :func:`~mvmr_hf.evaluation.multilabel.multi_hot_encoding` of this split alone; pass that of the
    training and test splits together so that they agree on C (as :func:`evaluate` does).

    Args:
        encoder: the frozen model; its ``view_size`` is the side of the center view it is given.
        split: a map-style ``datasets.Dataset``, not a streamed one.
        image_column: the column holding the images; None picks the single image column.
        label_column: the column holding the labels (class ids or a multi-label column); None reads
            no labels (all -1).
        batch_size: images per forward pass (and rows per gather across processes).
        device: where the encoder runs; None: this process's launch device.
        num_workers: DataLoader workers decoding the images (0: in this process).
        cache_dir: a folder for ``<hash>.safetensors`` feature files; None: no cache.
        targets: the multi-hot encoding of a multi-label ``label_column``; None: that of this split
            alone (which is None for a column of class ids).

    Returns:
        A :class:`FeatureSet`: ``features`` (N, D) float32 and ``labels`` (N,) int64 or (N, C) uint8,
        N the decodable images of the split.

    Raises:
        ConfigError: a streamed split, no decodable image, or -1 labels in a labelled split.
    """
    if not isinstance(split, datasets.Dataset):
        raise ConfigError("extract_features needs a map-style split: load it with streaming=False.")
    column = resolve_image_column(split.features, image_column)
    if label_column is not None and targets is None:
        targets = multi_hot_encoding([split], label_column)  # also checks the column; None for class ids
    state, device = launch_state(), _process_device(device)
    identity = {
        "encoder": encoder.fingerprint,
        "view_size": encoder.view_size,
        "columns": [column, label_column],
        "split": split._fingerprint,  # datasets' content hash of the split (no public accessor)
    }
    if targets is not None:  # C may come from the other split: the same column can be encoded two ways
        identity["targets"] = [targets.kind, targets.num_classes]
    cached = _cache_path(Path(cache_dir).expanduser(), identity) if cache_dir is not None else None
    if cached is not None and holds_on_every_process(cached.is_file(), state):
        stored = _read_cache(cached)
        home = feature_device(stored.features.nbytes, device)
        return FeatureSet(stored.features.to(home), stored.labels.to(home), stored.skipped)
    encoder.to(device)
    # The feature width, to choose where the N x D features will live before any is computed.
    width = encoder(torch.zeros(1, 3, encoder.view_size, encoder.view_size, device=device)).shape[1]
    home = feature_device(len(split) * width * 4, device)
    views = _Views(
        split,
        column,
        label_column,
        encoder.view_size,
        targets=targets,
        process=state.process_index,
        num_processes=state.num_processes,
    )
    loader = torch.utils.data.DataLoader(
        views, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    rows, features, labels, skipped = [], [torch.empty(0, width, device=home)], [], 0
    for batch_rows, views01, batch_labels, bad in loader:
        skipped += bad
        if views01 is not None:
            rows.append(batch_rows)
            features.append(encoder(views01.to(device)).to(home))
            labels.append(batch_labels)
    local_rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
    no_labels = (
        torch.empty(0, dtype=torch.long)
        if targets is None
        else torch.empty(0, targets.num_classes, dtype=MultiHot.dtype)
    )
    local_labels = torch.cat([no_labels, *labels])
    result = _gather_split(
        state, local_rows, torch.cat(features), local_labels, skipped, home=home, rows_per_gather=batch_size
    )
    if not len(result.labels):
        raise ConfigError("no image of the split could be decoded: check the dataset and --image-column.")
    if label_column is not None and (result.labels < 0).any():
        raise ConfigError("the split has unlabelled images (label -1): evaluate on a labelled split.")
    if cached is not None and state.is_main_process:
        _write_cache(cached, result)
    return result

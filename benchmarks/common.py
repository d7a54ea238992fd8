"""Shared pieces of the benchmark scripts: arguments, machine description, timing, memory, output.

Every script parses :func:`parser` arguments (``--device``, ``--quick``, ``--output``),
times with :func:`time_call` (``torch.cuda.synchronize`` around each call on CUDA),
measures peak memory with :class:`PeakMemory`, and ends with :func:`report`, which prints
the machine, the library versions and a markdown table, and writes the same to JSON in
``benchmarks/results/<name>-<device>[-quick].json``.

Peak memory on CPU is the growth of the process's resident set: glibc is told to serve
every allocation above 64 KiB with its own ``mmap`` (so freed tensors leave the resident
set at once), free heap pages are trimmed (``malloc_trim``) and the kernel's high-water
mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` before each measurement, and the
peak is ``VmHWM`` after the call minus ``VmRSS`` before it. This sees every allocation
torch makes, including temporaries freed inside the call.
On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import datasets
import numpy as np
import skimage.data
import torch
from PIL import Image

from mvmr_hf.data.augment import center_view
from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import usable_cpus

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = (
    "mvmr_hf",
    "torch",
    "torchvision",
    "transformers",
    "timm",
    "accelerate",
    "datasets",
    "kymatio",
    "scikit-image",
    "numpy",
    "pyarrow",
    "pillow",
)
PHOTOGRAPHS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)
_M_MMAP_THRESHOLD = -3  # mallopt parameter number from glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 64 * 1024


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=("cpu", "cuda"),
        help="where to run (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced grid that runs in well under a minute"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file to write (default: benchmarks/results/<name>-<device>[-quick].json)",
    )
    return parser


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``; CUDA must be present when asked for."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no CUDA device: use --device cpu")
    return torch.device(name)


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in LIBRARIES},
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming the machine and the versions that matter."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    gpu = info["gpu"] or "no GPU"
    return (
        f"Machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, {info['torch_threads']} torch threads, "
        f"{gpu}; load average {info['load_average_1_5_15_min'][1]} (5 min); "
        f"Python {info['python']}; {versions}"
    )


@functools.cache
def _photograph(name: str, side: int) -> torch.Tensor:
    photo = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255.0
    return center_view(photo, side)[0]


def photo_batch(batch: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """``batch`` real images as float ``(B, 3, size, size)`` in [0, 1]: random square crops of
    scikit-image's sample photographs (squared to twice ``size``), resized with
    :func:`mvmr_hf.data.augment.center_view`."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(batch):
        photo = _photograph(PHOTOGRAPHS[index % len(PHOTOGRAPHS)], 2 * size)
        side = int(rng.integers(size, 2 * size + 1))
        top, left = (int(offset) for offset in rng.integers(0, 2 * size - side + 1, size=2))
        images.append(center_view(photo[None, :, top : top + side, left : left + side], size))
    return torch.cat(images)


def _encoded_photo(index: int, longer_side: int, seed: int) -> dict[str, Any]:
    """Photograph ``index`` of :func:`write_photo_parquet`: a random crop, resized, as a JPEG."""
    rng = np.random.default_rng([seed, index])
    photo = getattr(skimage.data, PHOTOGRAPHS[index % len(PHOTOGRAPHS)])()
    height, width = photo.shape[:2]
    crop_h = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
    crop_w = min(width, int(crop_h * rng.uniform(0.75, 4 / 3)))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    scale = longer_side / max(crop_h, crop_w)
    image = image.resize((round(crop_w * scale), round(crop_h * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return {"bytes": buffer.getvalue(), "path": None}


def write_photo_parquet(
    folder: Path, count: int, *, shards: int = 8, longer_side: int = 500, seed: int = 0
) -> Path:
    """A local parquet data set of ``count`` JPEG photographs, like ImageNet's (about 500 x 375 px).

    Each image is a random crop (aspect ratio 3:4 to 4:3) of one of scikit-image's sample
    photographs, drawn from ``(seed, index)``, resized so that its longer side is ``longer_side``
    and saved as a quality-90 JPEG, on every usable core (thousands of images take seconds on a
    GPU node); ``shards`` files ``folder/data/train-*.parquet`` let workers and processes split it.
    """
    datasets.disable_progress_bars()
    encode = functools.partial(_encoded_photo, longer_side=longer_side, seed=seed)
    with concurrent.futures.ProcessPoolExecutor(max_workers=usable_cpus()) as pool:
        encoded = list(pool.map(encode, range(count), chunksize=64))
    table = datasets.Dataset.from_dict(
        {"image": encoded}, features=datasets.Features({"image": datasets.Image()})
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        name = f"train-{shard:05d}-of-{shards:05d}.parquet"
        table.shard(shards, shard, contiguous=True).to_parquet(str(folder / "data" / name))
    return folder


VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "patch_size": 16, "projection_dim": 512}  # fmt: skip
"""CLIP ViT-B/16's image tower sizes (the paper's teacher)."""
VIT_S16 = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
           "patch_size": 16, "projection_dim": 512}  # fmt: skip
"""A ViT-S/16-sized tower, for CPU configurations."""


def save_clip_tower(folder: Path, sizes: dict[str, int], image_size: int) -> Path:
    """A random-init CLIP image tower of ``sizes`` with its processor, saved like a Hub checkpoint."""
    # Imported here: the benchmarks that share this module without a teacher need no transformers.
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(image_size=image_size, **sizes)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BICUBIC,
    ).save_pretrained(folder)
    return folder


def train_run(
    device: torch.device, model_args: Any, data_args: Any, training_args: Any, teacher_args: Any
) -> None:
    """One :func:`mvmr_hf.train` run with the default loss, as the commands make it, in a process of
    ``device``'s kind (Accelerate is told to stay on the CPU); Accelerate's process-wide singletons
    are reset after it, so that the next run in this process starts afresh."""
    # Imported here: the benchmarks that share this module without training need no Accelerate.
    from accelerate.state import AcceleratorState, GradientState

    from mvmr_hf.config import LossArguments
    from mvmr_hf.training.loop import train

    environment = {"ACCELERATE_USE_CPU": "true"} if device.type == "cpu" else {}
    with mock.patch.dict(os.environ, environment):
        try:
            train(model_args, data_args, LossArguments(), training_args, teacher=teacher_args)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def teacher_arguments(teacher: Path | None, cache: bool) -> Any:
    """The teacher options of a timed run: the defaults, or with ``cache`` the teachers on the
    non-augmented view, which the exact cache holds (``--cache-teacher`` needs it); None without one."""
    from mvmr_hf.config import TeacherArguments

    if teacher is None:
        return None
    view = "non-augmented" if cache else TeacherArguments.teacher_view
    return TeacherArguments(teacher=str(teacher), cache_teacher=cache, teacher_view=view)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up; ``best`` is their minimum."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    budget_s: float = 10.0,
    max_repeats: int = 100,
    warmup: int = 1,
) -> Timing:
    """Time ``fn()`` after ``warmup`` calls, synchronizing the device around each call.

    Calls repeat until ``budget_s`` seconds are spent (at least one timed call, at most
    ``max_repeats``); a warm-up call that alone takes ``budget_s`` is the single sample, so that
    very large cells cost one call. Report :attr:`Timing.best`: on a shared machine the minimum
    is the call least disturbed by other processes.
    """
    seconds: list[float] = []
    for index in range(warmup + max_repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if index >= warmup or elapsed >= budget_s:
            seconds.append(elapsed)
        if seconds and sum(seconds) >= budget_s:
            break
    return Timing(tuple(seconds))


def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_cpu_peak() -> bool:
    """Return free heap pages to the kernel and reset ``VmHWM``; False where that is unsupported.

    Without the trim, a large free chunk left in glibc's heap by earlier code would serve new
    allocations from pages that are already resident, and the peak would not see them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def prepare_memory_measurement(device: torch.device) -> str | None:
    """Set up peak-memory measurement for ``device``; the method's description, or None where unsupported.

    On CPU this changes glibc's allocation policy for the rest of the process, so call it
    after the timings (small allocations are then no longer reused from the heap). Run the
    measured code once before measuring, so that one-time initialisation is not counted.
    """
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the call"
    try:
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) != 1 or not _reset_cpu_peak():
            return None
        _proc_status_kib("VmHWM")
    except OSError:
        return None
    return (
        "growth of the resident set's high-water mark "
        "(VmHWM reset via clear_refs after malloc_trim; allocations > 64 KiB mmapped)"
    )


class PeakMemory:
    """Context manager: ``bytes`` is the peak memory allocated inside the block above what it started with.

    Call :func:`prepare_memory_measurement` first; ``bytes`` stays None where it is unsupported.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self._start = -1

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif _reset_cpu_peak():
            self._start = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start >= 0:
            self.bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self._start)


def available_memory_bytes(device: torch.device) -> int:
    """Memory that a benchmark cell may still allocate on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), flags=re.MULTILINE)
    if match is None:
        return sys.maxsize
    return int(match.group(1)) * 1024


Column = tuple[str, str, str]  # (key in the row, header, format spec)


def _cell(value: object, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a markdown table; missing values print as an en dash."""
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    config: dict[str, Any],
    notes: Sequence[str] = (),
) -> Path:
    """Print the machine, the table and the notes; write them to JSON. Returns the JSON path."""
    info = machine(device)
    table = markdown_table(rows, columns)
    print(f"## {name} ({'quick' if args.quick else 'full'}, {device.type})\n")
    print(describe(info) + "\n")
    print(table)
    for note in notes:
        print(f"\n- {note}")
    path = args.output or RESULTS / f"{name}-{device.type}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "quick": args.quick,
        "device": device.type,
        "machine": info,
        "config": config,
        "notes": list(notes),
        "results": list(rows),
        "table": table,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


DIGITS_SPLITS = {"full": ("train", "test"), "quick": ("train[:256]", "test[:128]")}
"""Train / test splits of the digits for the quality benchmarks; ``--quick`` works on a slice, so
that a real teacher's passes take seconds on one thread."""


def linear_and_knn(
    model: str | os.PathLike, data: Path, cache: Path, device: torch.device, splits: tuple[str, str]
) -> dict[str, float]:
    """Linear-probe and kNN top-1 (percent) of ``model``'s frozen features, by ``mvmr_hf.evaluate``."""
    # Imported here: the speed benchmarks that share this module need no transformers or timm.
    from mvmr_hf.evaluation.features import load_encoder
    from mvmr_hf.evaluation.protocols import evaluate

    results = evaluate(load_encoder(str(model)), str(data), train_split=splits[0], test_split=splits[1],
                       protocols=("linear", "knn"), cache_dir=cache, device=device)  # fmt: skip
    return {result.protocol: result.top1 for result in results}


# ----------------------------------------------------------------------------- quality runs


# The paper's distillation objective (eq. 10 with λ = μ = α = β = 1, the teachers on the non-augmented
# view, its section 7 augmentation, no feature matching), which the quality benchmarks' cells change:
# pinned, so that a cell keeps its meaning whatever mvmr-distill's defaults are.
PAPER_OBJECTIVE = {
    "--invariance-weight": "1", "--variance-weight": "1", "--view-weight": "1",
    "--feature-matching-weight": "0", "--teacher-view": "non-augmented",
    "--augmentations": "crop,flip,color,grayscale,blur", "--crop-scale": "0.08,1",
}  # fmt: skip


def paper_objective(changes: Sequence[str]) -> list[str]:
    """The flags of :data:`PAPER_OBJECTIVE` that ``changes`` do not set, to put before them (a comma
    list such as --augmentations given twice would join its two lists), and ``--cache-teacher`` where
    the teachers see the non-augmented view, which the cache holds exactly."""
    kept = [part for flag, value in PAPER_OBJECTIVE.items() if flag not in changes for part in (flag, value)]
    on_augmented = "--teacher-view" in changes and changes[changes.index("--teacher-view") + 1] == "augmented"
    return kept if on_augmented else [*kept, "--cache-teacher"]


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def share_teacher_caches(pool: Path, run: Path, *, after: bool) -> None:
    """Hard-link exact teacher caches (one folder per teacher setting) from ``pool`` into a new ``run``,
    or, ``after`` it, from the run into the pool."""
    from mvmr_hf.training.teacher_cache import CACHE_DIR

    source, target = (run / CACHE_DIR, pool) if after else (pool, run / CACHE_DIR)
    for folder in sorted(source.iterdir()) if source.is_dir() else []:
        if not (target / folder.name).exists():
            shutil.copytree(folder, target / folder.name, copy_function=os.link)


def spread_summary(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and the spread, half the range: a difference smaller than the spreads is noise."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def seed_row(
    group: str,
    cell: str,
    scores: list[dict[str, float]],
    seconds: float,
    metrics: Sequence[str] = ("linear", "knn"),
) -> dict[str, Any]:
    """One table row: each metric's mean over the seeds' ``scores``, its spread and per-seed values."""
    row: dict[str, Any] = {"group": group, "cell": cell}
    for metric in metrics:
        row[metric], row[f"{metric}_spread"] = spread_summary([s[metric] for s in scores])
    row |= {"seeds": len(scores), "seconds_per_run": seconds}
    return row | {f"{metric}_per_seed": [s[metric] for s in scores] for metric in metrics}

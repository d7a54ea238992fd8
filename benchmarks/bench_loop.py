"""The training loop's own rate at the paper's configuration, against the rate of its parts alone.

The loop measured is the one users run: :func:`mvmr_hf.train` (what ``mvmr-distill`` and
``mvmr-pretrain`` run) over a local parquet data set of JPEG photographs, nothing synchronised
or hooked inside the step. Its rate is read from its own ``metrics.jsonl`` (``images_per_s``,
logged every few steps), as the median of an epoch's logs after its first (which holds the
workers' start and, with ``--compile``, the compilation). The data wait is the share of the
steps' wall time, from the loop's first request for a batch to the last batch it receives (the
final checkpoint and the release are outside it), spent waiting for the loader's next batch, seen
from outside the loader.

In the same process, the parts alone, on one batch already on the device, in the loop's
precision and memory format, each timed over repeated calls with one synchronisation at the end:
the student's two forward and backward passes (projector included) with Adam's step, and the
teacher's forward. The loop should reach most of the rate of its parts: the parts' rate is
``batch / (student + teacher)`` without the cache and ``batch / student`` in the cache's second
epoch, where the teacher is read back instead of run.

Configurations (random-init weights: speed does not depend on them):

- ``cuda``: resnet50 student, the paper's 8192-8192-8192 projector, the CLIP ViT-B/16 image tower
  at its real sizes, 224 px, batch 256, bf16, 16 workers, JPEGs of about 500 x 375 px;
- ``cpu``: resnet18, a 2048-2048 projector, a ViT-S/16-sized tower, 64 px, batch 16, fp32, 2 workers
  (a smoke test of the script, not a target).

On CUDA the distillation without the cache runs a second time with ``--decode-on-device`` (nvJPEG
in the training process, the workers only reading headers), against the workers' decoding.

Targets (issue 19, one H200): loop >= 0.85 of the parts alone with and without the cache; >= 1,700
images/s without the cache and >= 2,200 in the cache's second epoch; pretraining >= 0.8 of the
cached loop; data wait <= 2 %.

    python benchmarks/bench_loop.py --quick
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from common import (
    VIT_B16,
    VIT_S16,
    parser,
    report,
    resolve_device,
    save_clip_tower,
    synchronize,
    teacher_arguments,
    train_run,
    write_photo_parquet,
)

from mvmr_hf.cli import run_cli
from mvmr_hf.config import (
    DataArguments,
    ModelArguments,
    PretrainModelArguments,
    TrainingArguments,
)
from mvmr_hf.models.representations.teacher import load_teacher
from mvmr_hf.models.student import build_student
from mvmr_hf.training import loop as training
from mvmr_hf.training.metrics import METRICS_FILE
from mvmr_hf.training.scaffold import build_optimizer

LOOP_TARGET, NO_CACHE_TARGET, CACHE_TARGET, PRETRAIN_TARGET, DATA_WAIT_TARGET = 0.85, 1700, 2200, 0.8, 0.02


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    student: str
    projector: str
    teacher: str  # label of the CLIP tower's sizes
    image_size: int
    batch: int
    mixed_precision: str
    workers: int
    steps_per_epoch: int
    log_every: int
    compile: bool


def _setup(device: torch.device, quick: bool, compile_: bool, workers: int | None) -> Setup:
    if workers is not None:
        return replace(_setup(device, quick, compile_, None), workers=workers)
    if device.type == "cuda":
        return Setup(
            "resnet50",
            "8192-8192-8192",
            "ViT-B/16",
            224,
            128 if quick else 256,
            "bf16",
            min(16, len(os.sched_getaffinity(0))),
            12 if quick else 16,
            4,
            compile_,
        )
    return Setup("resnet18", "2048-2048", "ViT-S/16", 64, 16, "no", 2, 4 if quick else 8, 2, compile_)


class _WaitClock:
    """Wall time of the steps and, within it, the time spent waiting for the loader's next batch."""

    def __init__(self) -> None:
        self.wait = 0.0
        self.began: float | None = None
        self.last = 0.0  # when the loop received its latest batch

    @property
    def wait_share(self) -> float:
        span = self.last - self.began if self.began is not None else 0.0
        return self.wait / span if span > 0 else 0.0

    def loader(self, loader: Any) -> Any:
        clock = self

        class Timed:
            def __getattr__(self, name: str) -> Any:  # dataset, state_dict, load_state_dict: the loader's own
                return getattr(loader, name)

            def __iter__(self) -> Iterator[dict]:
                batches = iter(loader)
                while True:
                    start = time.perf_counter()
                    clock.began = clock.began or start
                    batch = next(batches, None)
                    clock.last = time.perf_counter()
                    clock.wait += clock.last - start
                    if batch is None:
                        return
                    yield batch

        return Timed()


def _loop(
    setup: Setup, device: torch.device, root: Path, *, teacher: Path | None, cache: bool, decode: bool = False
) -> dict[str, Any]:
    """One :func:`mvmr_hf.train` run; the median rate of each epoch's logs after the first, the data wait."""
    output = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    training_args = TrainingArguments(
        output_dir=str(output),
        batch_size=setup.batch,
        epochs=2 if cache else 1,
        warmup=10,
        mixed_precision=setup.mixed_precision,
        compile=setup.compile,
        log_every=setup.log_every,
        checkpoint_every=10**9,
        seed=0,
    )
    data_args = DataArguments(
        dataset=str(root / "data"),
        image_size=setup.image_size,
        num_workers=setup.workers,
        decode_on_device=decode,
    )
    model = ModelArguments if teacher is not None else PretrainModelArguments
    teacher_args = teacher_arguments(teacher, cache)
    clock = _WaitClock()
    built = training.build_dataloader

    def build_dataloader(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        loader, stats = built(*args, **kwargs)
        return clock.loader(loader), stats

    with mock.patch.object(training, "build_dataloader", build_dataloader):
        train_run(device, model(student=setup.student, projector=setup.projector), data_args, training_args,
                  teacher_args)  # fmt: skip
    logs = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    epochs = sorted({log["epoch"] for log in logs})
    rates = {e: [log["images_per_s"] for log in logs if log["epoch"] == e][1:] for e in epochs}
    return {
        "rates": {e: statistics.median(r) for e, r in rates.items() if r},
        "data_wait_share": clock.wait_share,
    }


def _parts(setup: Setup, device: torch.device, teacher_folder: Path, repeats: int) -> dict[str, float]:
    """Seconds per batch of the student's step (two passes, backward, Adam) and of the teacher's forward."""
    student = build_student(setup.student, projector=setup.projector, image_size=setup.image_size).to(device)
    if device.type == "cuda":
        student.to_channels_last()
    if setup.compile:
        student.compile()
    optimizer = build_optimizer(student, 1e-4, 0.0, device)
    teacher = load_teacher(str(teacher_folder)).to(device)
    images = torch.rand(setup.batch, 3, setup.image_size, setup.image_size, device=device)
    augmented = torch.rand_like(images)
    dtype = torch.bfloat16 if setup.mixed_precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=setup.mixed_precision == "bf16")

    def student_step() -> None:
        with autocast:
            loss = (
                student(images).embedding.float().square().mean()
                + student(augmented).embedding.float().mean()
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_forward() -> None:
        with autocast:
            teacher(images)

    seconds = {}
    for name, part in (("student_s", student_step), ("teacher_s", teacher_forward)):
        for _ in range(3):  # warm-up (and compilation)
            part()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            part()
        synchronize(device)
        seconds[name] = (time.perf_counter() - start) / repeats
    return seconds


def _measure(setup: Setup, device: torch.device, root: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    write_photo_parquet(root / "data", setup.batch * setup.steps_per_epoch, shards=max(setup.workers, 1))
    teacher = save_clip_tower(
        root / "teacher", VIT_B16 if setup.teacher == "ViT-B/16" else VIT_S16, setup.image_size
    )
    parts = _parts(setup, device, teacher, repeats=10 if device.type == "cuda" else 2)
    student_rate = setup.batch / parts["student_s"]
    both_rate = setup.batch / (parts["student_s"] + parts["teacher_s"])
    rows = []
    modes = [
        ("distill", teacher, False, 0, both_rate, False),
        ("distill, cache epoch 2", teacher, True, 1, student_rate, False),
        ("pretrain (5 hand-crafted)", None, False, 0, student_rate, False),
    ]
    if device.type == "cuda":  # nvJPEG against the workers' decoding of the first row
        modes.append(("distill, JPEGs decoded on the GPU", teacher, False, 0, both_rate, True))
    for mode, run_teacher, cache, epoch, parts_rate, decode in modes:
        loop = _loop(setup, device, root, teacher=run_teacher, cache=cache, decode=decode)
        rate = loop["rates"][epoch]
        rows.append(
            {
                "mode": mode,
                "loop_images_per_s": rate,
                "parts_images_per_s": parts_rate,
                "loop_share": rate / parts_rate,
                "data_wait_share": loop["data_wait_share"],
            }
        )
        print(f"measured {mode}", file=sys.stderr, flush=True)
    return rows, parts


def _verdicts(rows: list[dict[str, Any]], device: torch.device, quick: bool) -> list[str]:
    if device.type != "cuda" or quick:
        return ["targets not checked: they apply to the full configuration on one H200"]
    by_mode = {row["mode"]: row for row in rows}
    cached = by_mode["distill, cache epoch 2"]["loop_images_per_s"]
    pretrain = by_mode["pretrain (5 hand-crafted)"]["loop_images_per_s"]
    checks = [
        (
            f"{row['mode']}: loop / parts {row['loop_share']:.2f}",
            row["loop_share"] >= LOOP_TARGET,
            f">= {LOOP_TARGET}",
        )
        for row in rows
        if row["mode"] != "pretrain (5 hand-crafted)"
    ]
    checks += [
        (
            f"distill: {by_mode['distill']['loop_images_per_s']:.0f} images/s",
            by_mode["distill"]["loop_images_per_s"] >= NO_CACHE_TARGET,
            f">= {NO_CACHE_TARGET}",
        ),
        (f"cache epoch 2: {cached:.0f} images/s", cached >= CACHE_TARGET, f">= {CACHE_TARGET}"),
        (
            f"pretrain / cached distill {pretrain / cached:.2f}",
            pretrain >= PRETRAIN_TARGET * cached,
            f">= {PRETRAIN_TARGET}",
        ),
    ]
    checks += [
        (
            f"{row['mode']}: data wait {row['data_wait_share']:.1%}",
            row["data_wait_share"] <= DATA_WAIT_TARGET,
            f"<= {DATA_WAIT_TARGET:.0%}",
        )
        for row in rows
    ]
    return [f"{text} (target {target}): {'met' if ok else 'MISSED'}" for text, ok, target in checks]


def main(argv: list[str]) -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--compile", action="store_true", help="torch.compile the student (loop and parts)")
    cli.add_argument("--num-workers", type=int, help="DataLoader workers (default: 16 on CUDA, 2 on CPU)")
    args = cli.parse_args(argv)
    device = resolve_device(args.device)
    setup = _setup(device, args.quick, args.compile, args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        rows, parts = _measure(setup, device, Path(tmp))
    notes = [
        *_verdicts(rows, device, args.quick),
        f"student {setup.student}, projector {setup.projector}, teacher CLIP {setup.teacher} image tower "
        f"(random init), {setup.image_size} px, batch {setup.batch}, {setup.mixed_precision}, "
        f"{setup.workers} workers, compile {setup.compile}; {setup.steps_per_epoch} steps an epoch, "
        f"logged every {setup.log_every}",
        f"parts alone: student step {parts['student_s'] * 1e3:.1f} ms, teacher forward "
        f"{parts['teacher_s'] * 1e3:.1f} ms a batch",
        "loop: median of metrics.jsonl's images_per_s over an epoch's logs after its first; data wait: "
        "share of the steps' wall time spent in the loader's next(), from the loop's first request for a "
        "batch to the last batch it received (the final checkpoint and the release left out)",
    ]
    columns = [
        ("mode", "mode", ""),
        ("loop_images_per_s", "loop images/s", ".0f"),
        ("parts_images_per_s", "parts alone images/s", ".0f"),
        ("loop_share", "loop / parts", ".2f"),
        ("data_wait_share", "data wait", ".1%"),
    ]
    report("loop", args, device, rows, columns, config={**asdict(setup), **parts}, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))

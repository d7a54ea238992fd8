"""One MV-MR training step split into its phases, with and without the exact teacher cache.

The step timed is the training loop's own: ``mvmr_hf.training.TrainingStep``, the object
``mvmr_hf.train`` calls for every micro-step, built here from the package's own pieces
(``build_student`` prepared by Accelerate with the run's mixed precision, the teacher and the
hand-crafted representations of ``build_representations``, ``MVMRLoss``, ``build_optimizer``
and the cosine schedule, the ``TeacherCache``) and fed by ``mvmr_hf.data.build_dataloader``
over a local parquet stream of JPEG photographs. The wait for the next batch is the data wait;
the step reports the end of each of its phases through its ``mark`` callback: the copy to the
device and the division by 255 (transfer), the student on both views, the teacher (run, or
read from the cache), the hand-crafted representations, the loss, the backward pass down to
z and z̃ (a gradient hook inside the one ``accelerator.backward``), the rest of the backward
through the student, then Adam and the schedule. The device is synchronized at every mark, so
phases do not overlap (a slight upper bound on a step).

Configurations (random-init weights; timing does not depend on them):

- ``cpu``: resnet18 student, a ViT-S/16-sized CLIP image tower as the teacher, 64 px, batch 64, fp32;
- ``cuda``: resnet50 student, the CLIP ViT-B/16 image tower (its real sizes), 224 px, batch 256, bf16.

Both use the paper's 8192-8192-8192 projector. Modes: ``distill`` (the teacher runs every
step), ``cache epoch 1`` (the teacher runs and its outputs are stored), ``cache epoch 2``
(outputs read from the cache), and ``pretrain`` (the paper's five hand-crafted
representations, no teacher). Unavoidable work is the student's forward and backward plus
the teacher's forward when it runs; everything else is overhead.

Targets (issue 5): overhead at most 10 % of a GPU step and 20 % of a CPU step; with the
cache, the second epoch at least 2x faster than the first on the GPU; no data wait at the
GPU configuration with 16 cores.

    python benchmarks/bench_step.py --quick
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from common import parser, report, resolve_device, synchronize, write_photo_parquet
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    get_cosine_schedule_with_warmup,
)

from mvmr_hf.cli import run_cli
from mvmr_hf.config import PAPER_REPRESENTATIONS, ModelArguments, TeacherArguments
from mvmr_hf.data import build_dataloader, load_image_dataset
from mvmr_hf.objective import MVMRLoss
from mvmr_hf.student import build_student
from mvmr_hf.teacher_cache import TeacherCache
from mvmr_hf.training import TrainingStep, build_optimizer, build_representations, share_cache

PHASES = (
    "data_wait", "transfer", "student_forward", "teacher", "representations", "loss_forward", "loss_backward",
    "student_backward", "optimizer",
)  # fmt: skip
CPU_TARGET, GPU_TARGET, CACHE_TARGET = 0.20, 0.10, 2.0
BICUBIC = 3


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    student: str
    teacher: dict[str, int]  # CLIPVisionConfig sizes
    teacher_label: str
    image_size: int
    batch: int
    mixed_precision: str
    projector: str
    workers: int
    warmup: int
    steps: int


_VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "patch_size": 16, "projection_dim": 512}  # fmt: skip
_VIT_S16 = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
            "patch_size": 16, "projection_dim": 512}  # fmt: skip


def _setup(device: torch.device, quick: bool, workers: int | None) -> Setup:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        workers = min(16, cpus) if workers is None else workers
        # Each worker makes whole batches: the first round of batches arrives together after the
        # workers' start-up, so the warm-up is one round and the timed steps are the next rounds.
        return Setup(
            student="resnet50",
            teacher=_VIT_B16,
            teacher_label="CLIP ViT-B/16 image tower",
            image_size=224,
            batch=64 if quick else 256,
            mixed_precision="bf16",
            projector="8192-8192-8192",
            workers=workers,
            warmup=max(workers, 2),
            steps=max(workers, 2) * (1 if quick else 2),
        )
    return Setup(
        student="resnet18",
        teacher=_VIT_S16,
        teacher_label="ViT-S/16-sized CLIP image tower",
        image_size=64,
        batch=16 if quick else 64,
        mixed_precision="no",
        projector="2048-2048" if quick else "8192-8192-8192",
        workers=1 if workers is None else workers,
        warmup=1 if quick else 2,
        steps=2 if quick else 6,
    )


def _save_teacher(folder: Path, sizes: dict[str, int], image_size: int) -> Path:
    """A random-init CLIP image tower with its processor, saved like a Hub checkpoint."""
    config = CLIPVisionConfig(image_size=image_size, **sizes)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=BICUBIC,
    ).save_pretrained(folder)
    return folder


class _Clock:
    """Per step, the synchronized wall time of each phase: from the previous mark to ``mark(phase)``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.last = 0.0

    def new_step(self) -> None:
        """Start a step: its phases at zero, its clock at now."""
        self.steps.append(dict.fromkeys(PHASES, 0.0))
        synchronize(self.device)
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """End ``phase``: add the time since the previous mark (or the step's start) to it."""
        synchronize(self.device)
        now = time.perf_counter()
        self.steps[-1][phase] += now - self.last
        self.last = now


def _epoch(clock: _Clock, run: _Run, step: TrainingStep, *, epoch: int) -> list[dict[str, float]]:
    """Run one epoch of ``step`` as ``mvmr_hf.train`` does; return each step's phase seconds."""
    clock.steps = []
    run.loader.dataset.set_epoch(epoch)
    batches = iter(run.loader)
    while True:
        clock.new_step()
        batch = next(batches, None)
        if batch is None:
            clock.steps.pop()
            break
        clock.mark("data_wait")
        loss = step(batch, mark=clock.mark)
        if not math.isfinite(loss.total.item()):
            raise RuntimeError("the loss is not finite: the benchmark's step is broken")
    if step.cache is not None:
        share_cache(run.accelerator, step.cache)
    return clock.steps


def _summary(mode: str, steps: list[dict[str, float]], batch: int, teacher_runs: bool) -> dict[str, Any]:
    """Median of each phase over the timed steps (robust to a step disturbed by another process)."""
    row: dict[str, Any] = {"mode": mode, "steps": len(steps)}
    for phase in PHASES:
        row[f"{phase}_ms"] = statistics.median(step[phase] for step in steps) * 1e3
    total = sum(row[f"{phase}_ms"] for phase in PHASES)
    unavoidable = row["student_forward_ms"] + row["student_backward_ms"]
    if teacher_runs:
        unavoidable += row["teacher_ms"]
    row.update(
        step_ms=total,
        images_per_s=batch / total * 1e3,
        overhead_ms=total - unavoidable,
        overhead_share=(total - unavoidable) / total,
        data_wait_share=row["data_wait_ms"] / total,
    )
    return row


def _images_for(setup: Setup) -> tuple[int, int]:
    """Images and shards so that every worker yields whole batches (all cached in epoch 1)."""
    workers = max(setup.workers, 1)
    batches_per_worker = -(-(setup.warmup + setup.steps) // workers)
    return batches_per_worker * workers * setup.batch, workers


@dataclass
class _Run:
    """Everything one benchmark run trains with."""

    accelerator: Accelerator
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: MVMRLoss
    loader: Any
    teacher: dict[str, torch.nn.Module]
    handcrafted: dict[str, torch.nn.Module]
    cache: TeacherCache

    def training_step(
        self, representations: dict[str, torch.nn.Module], cache: TeacherCache | None
    ) -> TrainingStep:
        """The training loop's step over this run's student, loss and optimizer with ``representations``."""
        return TrainingStep(
            self.accelerator,
            self.student,
            self.criterion,
            self.optimizer,
            self.scheduler,
            representations,
            cache,
        )


def _build(setup: Setup, device: torch.device, root: Path) -> _Run:
    """Write the data and the teacher under ``root``; build the student, representations, loader, cache."""
    accelerator = Accelerator(mixed_precision=setup.mixed_precision, cpu=device.type == "cpu")
    images, shards = _images_for(setup)
    write_photo_parquet(root / "data", images, shards=shards)
    teacher_folder = _save_teacher(root / "teacher", setup.teacher, setup.image_size)
    model_args = ModelArguments(
        student=setup.student, projector=setup.projector, handcrafted=",".join(PAPER_REPRESENTATIONS)
    )
    representations = build_representations(model_args, TeacherArguments(teacher=str(teacher_folder)))
    for representation in representations.values():
        representation.to(accelerator.device)
    student = build_student(setup.student, projector=setup.projector, image_size=setup.image_size)
    optimizer = build_optimizer(student, 1e-4, 1e-6, accelerator.device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 10, 10_000)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    student.train()
    loader, _ = build_dataloader(
        load_image_dataset(str(root / "data")),
        image_size=setup.image_size,
        batch_size=setup.batch,
        num_workers=setup.workers,
        pin_memory=device.type == "cuda",
    )
    return _Run(
        accelerator=accelerator,
        student=student,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=MVMRLoss(),
        loader=loader,
        teacher={"teacher": representations.pop("teacher")},
        handcrafted=representations,
        cache=TeacherCache(root / "cache", rank=0),
    )


def _measure(setup: Setup, run: _Run) -> list[dict[str, Any]]:
    """One epoch per mode, in order (the cache's second epoch must follow its first)."""
    modes = [  # name, teacher, hand-crafted representations, cache, whether the teacher runs
        ("distill", run.teacher, {}, None, True),
        ("distill, cache epoch 1", run.teacher, {}, run.cache, True),
        ("distill, cache epoch 2", run.teacher, {}, run.cache, False),
        ("pretrain (5 hand-crafted)", {}, run.handcrafted, None, False),
    ]
    device = run.accelerator.device
    clock = _Clock(device)
    rows: list[dict[str, Any]] = []
    for epoch, (mode, teacher, handcrafted, cache, teacher_runs) in enumerate(modes):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps = _epoch(clock, run, run.training_step(teacher | handcrafted, cache), epoch=epoch)
        steps = steps[setup.warmup :]
        row = _summary(mode, steps, setup.batch, teacher_runs)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(f"measured {mode}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str]) -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: 16 on GPU, 1 on CPU)"
    )
    args = cli.parse_args(argv)
    device = resolve_device(args.device)
    setup = _setup(device, args.quick, args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _measure(setup, _build(setup, device, Path(tmp)))
    notes = _verdicts(rows, device, quick=args.quick)
    notes += [
        f"student {setup.student}, projector {setup.projector}, teacher {setup.teacher_label} (random init), "
        f"{setup.image_size} px, batch {setup.batch}, mixed precision {setup.mixed_precision}, "
        f"{setup.workers} DataLoader workers; medians over the steps after {setup.warmup} warm-up steps",
        "step = the sum of the phases' medians over the timed steps; overhead = step - student forward - "
        "student backward - teacher (when the teacher runs: in cache epoch 1 this includes storing its "
        "outputs); the loop's metrics meter and checkpoints are not included",
    ]
    columns = [("mode", "mode", ""), ("images_per_s", "images/s", ".1f"), ("step_ms", "step ms", ".1f")]
    columns += [(f"{phase}_ms", phase.replace("_", " "), ".1f") for phase in PHASES]
    columns += [("overhead_share", "overhead", ".1%"), ("data_wait_share", "data wait", ".1%")]
    if device.type == "cuda":
        columns.append(("peak_memory_gib", "peak GiB", ".1f"))
    report("step", args, device, rows, columns, config=vars(setup), notes=notes)


def _verdicts(rows: list[dict[str, Any]], device: torch.device, *, quick: bool) -> list[str]:
    """Each mode's overhead against the target; with --quick (a smaller step) the share is only reported."""
    target = GPU_TARGET if device.type == "cuda" else CPU_TARGET

    def verdict(share: float) -> str:
        if quick:
            return "not checked: --quick shrinks the batch and projector, so the student's share is smaller"
        return "met" if share <= target else "MISSED"

    notes = [
        f"{row['mode']}: overhead {row['overhead_share']:.1%} of the step (target <= {target:.0%}): "
        f"{verdict(row['overhead_share'])}"
        for row in rows
    ]
    by_mode = {row["mode"]: row for row in rows}
    speedup = by_mode["distill, cache epoch 1"]["step_ms"] / by_mode["distill, cache epoch 2"]["step_ms"]
    notes.append(
        f"cache: epoch 2 is {speedup:.2f}x faster than epoch 1"
        + (f" (target >= {CACHE_TARGET:g}x on the GPU): {'met' if speedup >= CACHE_TARGET else 'MISSED'}"
           if device.type == "cuda" else " (the 2x target applies to the GPU configuration)")
    )  # fmt: skip
    return notes


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The loop behind ``examples/distill.py``, written out from the library's public pieces (paper, eq. 4-10).

    python examples/distill_loop.py --dataset ./digits --teacher ./tiny-clip --student resnet18 \
        --image-size 32 --batch-size 64 --max-steps 100 --output-dir runs/loop

With the same flags it trains exactly as ``mvmr-distill ... --max-steps N`` with distillation's
defaults (``tests/test_example_loop.py`` checks the losses step by step): the teacher's distance
correlation term (eq. 9) plus feature matching, teacher and student on the same augmented view x̃,
λ = μ = α = 0, no projector. The command (``mvmr_hf/training/loop.py``) adds what long runs need around
this loop: checks before anything is written, checkpoints and ``--resume``, ``metrics.jsonl`` and
trackers, the teacher cache, the other objectives, gradient accumulation, and several processes whose
data shares end unevenly (here every process must get as many batches).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from mvmr_hf import (
    FeatureMatching,
    MVMRLoss,
    build_dataloader,
    build_student,
    default_num_workers,
    export_student,
    load_image_dataset,
    load_teacher,
)
from mvmr_hf.config import (
    DistillDataArguments,
    DistillLossArguments,
    DistillModelArguments,
    DistillTrainingArguments,
    TeacherArguments,
)
from mvmr_hf.data import parse_crop_scale
from mvmr_hf.training import resolve_mixed_precision

# Distillation's defaults, read from the command's own presets (measured best: README, "Quality"): x̃ is
# a crop of 0.8-1 of the image and a flip, λ = μ = α = 0, feature matching 4, no projector.
MODEL, TEACHER, DATA = DistillModelArguments(), TeacherArguments(), DistillDataArguments()
LOSS, TRAINING = DistillLossArguments(), DistillTrainingArguments()


def training_function(args: argparse.Namespace) -> list[float]:
    """Train as ``mvmr-distill`` does with ``args``; write the release; return each step's loss."""
    # bf16 on a GPU that has it (or what `accelerate launch` set). --batch-size is global: with
    # split_batches the prepared scheduler steps once per optimizer step, whatever the process count.
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(None),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    device, world, on_cuda = accelerator.device, accelerator.num_processes, accelerator.device.type == "cuda"

    # The images (streamed) and the frozen teacher r of eq. 9, any transformers vision model.
    dataset = load_image_dataset(args.dataset)
    teacher = load_teacher(args.teacher)

    # The student: a timm backbone from scratch, no projector (the terms read its pooled features),
    # the same weights on every process. The feature-matching head (not in the paper) comes next from
    # the same random stream, as in the command; its width is the teacher's output's (one forward).
    set_seed(args.seed)
    student = build_student(args.student, projector=MODEL.projector, image_size=args.image_size)
    width = teacher(torch.zeros(1, 3, args.image_size, args.image_size)).shape[1]
    matching = FeatureMatching(student.feature_dim, {"teacher": width}, TEACHER.feature_matching_weight)

    # This process's share of the stream, as batches of views (section 7): x̃'s random parameters are
    # drawn per image from the seed, so data order and views do not depend on the random state below.
    loader, _ = build_dataloader(
        dataset, image_size=args.image_size, batch_size=args.batch_size // world,
        rank=accelerator.process_index, world_size=world, shuffle_buffer=DATA.shuffle_buffer, seed=args.seed,
        num_workers=default_num_workers() if args.num_workers is None else args.num_workers,
        pin_memory=on_cuda, device_views=on_cuda, augmentations=DATA.augmentations,
        crop_scale=parse_crop_scale(DATA.crop_scale),
    )  # fmt: skip
    set_seed(args.seed, device_specific=True)

    # Eq. 10 with λ = μ = α = 0 (eq. 4-8 off): the teacher's term 1 − dCor(Z̃, r(x̃)) of eq. 9 alone, on the
    # batch gathered from all processes (distance correlation, eq. 11-14, needs no common width).
    criterion = MVMRLoss(
        invariance_weight=LOSS.invariance_weight,
        variance_weight=LOSS.variance_weight,
        view_weight=LOSS.view_weight,
    )

    # On GPUs: batch norm over the global batch, and channels-last convolutions (as the command).
    if world > 1 and on_cuda:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if on_cuda:
        student.to_channels_last()
    # Adam (the paper's) over the student and the head, linear warm-up then cosine decay per step.
    optimizer = torch.optim.Adam(
        [*student.parameters(), *matching.parameters()], lr=args.learning_rate,
        weight_decay=TRAINING.weight_decay, fused=device.type in ("cpu", "cuda"),
    )  # fmt: skip
    warmup = round(TRAINING.warmup * args.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, args.max_steps)
    # Not the loader: build_dataloader has already split the data between processes.
    student, matching, optimizer, scheduler = accelerator.prepare(student, matching, optimizer, scheduler)
    teacher.to(device)

    losses: list[float] = []
    step, epoch = 0, 0
    student.train()
    while step < args.max_steps:
        loader.dataset.set_epoch(epoch)  # each epoch its own order and views
        first = step
        for batch in loader:
            # x̃ as [0, 1] floats on the device; with λ = μ = α = 0 no term reads x, so one student pass.
            augmented = loader.dataset.augmented_view(batch, device)
            out = student(augmented)  # Z̃ (embedding) and h (pooled features): here the same
            with torch.no_grad(), accelerator.autocast():
                targets = {"teacher": teacher(augmented)}  # the teacher sees the student's x̃
            loss = criterion(None, out.embedding, targets)  # eq. 9-10
            loss = loss.plus(matching(out.features, targets))  # + 1 − cos(head(h), r(x̃)), FitNets-style
            accelerator.backward(loss.total)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.total.item())
            if step % 10 == 0 or step == args.max_steps:
                accelerator.print(f"step {step}: loss {losses[-1]:.4f}")
            if step == args.max_steps:
                break
        else:  # the epoch's data ran out
            if step == first:
                raise SystemExit(f"no full batch of {args.batch_size} images: lower --batch-size")
            epoch += 1

    # The release, as the command writes it in OUTPUT_DIR/student: timm's folder, the card, the settings.
    if accelerator.is_main_process:
        defaults = [asdict(group) for group in (MODEL, TEACHER, DATA, LOSS, TRAINING)]
        settings = {key: value for group in defaults for key, value in group.items()} | vars(args)
        release = Path(args.output_dir) / "student"
        export_student(accelerator.unwrap_model(student).eval(), release, training_args=settings)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description="mvmr-distill's loop written out, with its defaults.")
    parser.add_argument("--dataset", default=DATA.dataset, help="Hub data set id or local folder")
    parser.add_argument("--teacher", default=TEACHER.teacher, help="transformers model")
    parser.add_argument("--student", default=MODEL.student, help="timm model name, trained from scratch")
    parser.add_argument("--image-size", type=int, default=DATA.image_size)
    parser.add_argument("--batch-size", type=int, default=TRAINING.batch_size, help="global, all processes")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=TRAINING.learning_rate)
    parser.add_argument("--seed", type=int, default=TRAINING.seed)
    parser.add_argument("--num-workers", type=int, default=None, help="per process (default: the cores)")
    parser.add_argument("--output-dir", default="runs/distill-loop")
    return training_function(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""The single Accelerate training loop of ``mvmr-distill`` and ``mvmr-pretrain``.

:func:`train` checks everything, builds everything, then runs the loop, whose step reads like
Accelerate's examples (paper, sections 4-5): the student embeds the non-augmented view (Z) and
the augmented view (Z̃) in two forward passes, so that batch-norm statistics stay per view (Z only
when a term reads it: λ, μ or α not 0, or feature matching on the non-augmented view);
every representation - the teachers, one after another, the hand-crafted descriptors - sees the
non-augmented view on the accelerator under ``no_grad`` (the teachers the augmented one with
``--teacher-view augmented``, distillation's default); the MV-MR loss (eq. 10) compares them, on the batch
gathered from all processes unless ``--dcor-scope local``; ``backward``, then Adam with a
linear warm-up and a cosine decay, once per optimizer step (``accelerator.accumulate``).
With ``--feature-matching-weight`` (not in the paper), linear heads from the student's pooled
features of the view the teachers see to each teacher's output add a 1 - cosine term
(:class:`~mvmr_hf.loss.objective.FeatureMatching`); they train with the student, are saved in its
checkpoints and are not released.
``benchmarks/bench_step.py`` times this loop's phases from outside, with hooks on what it builds;
``benchmarks/bench_loop.py`` measures its own rate, from its metrics, against its parts alone.

The data stream is already split across processes by :mod:`mvmr_hf.data`, so the loader is
*not* given to ``accelerator.prepare`` (which would split it again); batches move to the
device in the loop, and each process saves its own loader position in every checkpoint. A run
killed at any moment resumes from its latest complete checkpoint at the same step, data
position and random state (:mod:`mvmr_hf.storage.checkpoint`). The folder's lock, the resume point,
the metrics, the checkpoints and the stop signals are the run scaffold's, which fine-tuning shares
(:class:`~mvmr_hf.training.scaffold.RunScaffold`): :func:`train` shows its stages and its step.

Outputs in ``OUTPUT_DIR`` (:mod:`mvmr_hf.training.run_folder`): ``training_args.json`` (all arguments,
written first; a valid config file), ``metrics.jsonl`` (:mod:`mvmr_hf.training.metrics`),
``checkpoints/step-NNNNNN/``, ``teacher_cache/`` (``--cache-teacher``), ``logs/``
(``--log-with``) and, at the end, the release folder ``student/``
(:func:`mvmr_hf.release.export.export_student`). A run stopped by a stop signal
(:class:`~mvmr_hf.training.scaffold.StopRequest`) saves a checkpoint, writes the marker ``PREEMPTED``
(step, checkpoint, signal: what a scheduler script reads, whatever exit status the launcher reports) and
raises PreemptedError; the next start or ``--resume`` removes the marker.

Example (what ``mvmr-pretrain`` does)::

    >>> from mvmr_hf.config import DataArguments, LossArguments, PretrainModelArguments, TrainingArguments
    >>> train(PretrainModelArguments(student="resnet18"), DataArguments(dataset="./digits", image_size=32),
    ...       LossArguments(), TrainingArguments(output_dir="runs/ssl", batch_size=64, max_steps=100))
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DataLoaderConfiguration, LoggerType, ProjectConfiguration, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mvmr_hf.config import DataArguments, LossArguments, ModelArguments, TeacherArguments, TrainingArguments
from mvmr_hf.data.augment import parse_crop_scale
from mvmr_hf.data.loader import ViewsLoader, build_dataloader, check_enough_images, default_num_workers
from mvmr_hf.data.loading import DataStats, load_image_dataset
from mvmr_hf.distributed import reduce_flag
from mvmr_hf.errors import ConfigError, TrainingError
from mvmr_hf.loss.dcor import check_batch_size
from mvmr_hf.loss.objective import FeatureMatching, LossOutput, MVMRLoss
from mvmr_hf.models.representations import build as build_representation
from mvmr_hf.models.representations.teacher import Teacher, load_teacher
from mvmr_hf.models.student import Student, build_student
from mvmr_hf.release.card import CardInfo
from mvmr_hf.release.export import RELEASE_DIR, export_student, stored_run_info
from mvmr_hf.release.hub import push_to_hub
from mvmr_hf.training.metrics import METRICS_FILE
from mvmr_hf.training.run_folder import LOGS_DIR, check_outputs, flat_arguments, flat_defaults
from mvmr_hf.training.scaffold import (
    RunScaffold,
    build_optimizer,
    find_resume_point,
    resolve_mixed_precision,
)
from mvmr_hf.training.teacher_outputs import representation_outputs, share_cache, teacher_caches

__all__ = ["METRICS_FILE", "TrainingError", "build_feature_matching", "build_representations", "train"]


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    loss_args: LossArguments,
    training_args: TrainingArguments,
    *,
    teacher: TeacherArguments | None = None,
) -> Path:
    """Train a student with the MV-MR objective and write its release folder; return that folder.

    Every check of the arguments, the data set, the student and the teacher happens before
    anything is written to ``training_args.output_dir``. Call it on every process (``torchrun``
    or ``accelerate launch``); it raises ConfigError for bad input and TrainingError when the
    loss stops being finite.

    Args:
        model_args: the student (timm backbone, projector) and the hand-crafted representations
            (:class:`~mvmr_hf.config.DistillModelArguments` for distillation,
            :class:`~mvmr_hf.config.PretrainModelArguments` for pretraining).
        data_args: the data set and the views (:class:`~mvmr_hf.config.DistillDataArguments` for
            distillation).
        loss_args: the objective's weights λ, μ (eq. 7), α (eq. 8), β (eq. 9) and the dCor estimator
            (:class:`~mvmr_hf.config.DistillLossArguments` for distillation).
        training_args: the optimisation, the run folder, checkpoints and logging
            (:class:`~mvmr_hf.config.DistillTrainingArguments` for distillation).
        teacher: the teachers to distil from (``mvmr-distill``); None: self-supervised MV-MR
            pretraining on the hand-crafted representations alone (``mvmr-pretrain``).
    """
    args = flat_arguments(model_args, teacher, data_args, loss_args, training_args)
    output_dir = Path(training_args.output_dir)
    _check_trackers(training_args.trackers)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(training_args.mixed_precision),
        gradient_accumulation_steps=training_args.grad_accum,
        log_with=training_args.trackers,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)
        ),
        # --batch-size is global, so one scheduler step per optimizer step whatever the process count.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    device, world = accelerator.device, accelerator.num_processes
    device_views = data_args.device_views if data_args.device_views is not None else device.type == "cuda"
    _check_decoding(data_args.decode_on_device, device, device_views=device_views)

    # Check everything, build everything: nothing is written before this block succeeds.
    criterion = MVMRLoss(
        invariance_weight=loss_args.invariance_weight,
        variance_weight=loss_args.variance_weight,
        view_weight=loss_args.view_weight,
        representation_weights=loss_args.weights,
        invariance_reduction=loss_args.invariance_reduction,
        squared=loss_args.dcor_squared,
        unbiased=loss_args.dcor_estimator == "unbiased",
        scope=loss_args.dcor_scope,
    )
    batch_size = _per_process_batch(training_args.batch_size, world, unbiased=criterion.unbiased)
    defaults = flat_defaults(model_args, teacher, data_args, loss_args, training_args)
    # another run's folder is named before any other check
    resume_from = find_resume_point(accelerator, output_dir, training_args, args, defaults)
    check_outputs(output_dir / RELEASE_DIR, training_args)
    # The data first: a wrong or unreachable data set is told before a large teacher is downloaded.
    dataset = load_image_dataset(
        data_args.dataset,
        config=data_args.dataset_config,
        split=data_args.split,
        streaming=data_args.streaming,
        image_column=data_args.image_column,
        # too few images for the batch is told before --no-streaming converts the split
        check_rows=lambda rows: check_enough_images(rows, batch_size, world),
    )
    set_seed(training_args.seed)  # the same initial weights on every process
    student = build_student(
        model_args.student, projector=model_args.projector, image_size=data_args.image_size
    )
    heads_rng = torch.random.get_rng_state()  # the feature-matching heads' weights come next in this stream
    # Weights for terms the run does not have are told before any teacher is loaded.
    _check_representation_weights(criterion, _term_names(model_args, teacher))
    # The data's checks (image column, enough images, a known length for --epochs) come before the teachers
    # load too; building the loader draws no random number, so the seeding around it is unchanged.
    loader, data_stats = build_dataloader(
        dataset,
        image_size=data_args.image_size,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=world,
        shuffle_buffer=data_args.shuffle_buffer,
        seed=training_args.seed,
        num_workers=default_num_workers() if data_args.num_workers is None else data_args.num_workers,
        image_column=data_args.image_column,
        pin_memory=device.type == "cuda",
        device_views=device_views,
        source_size=data_args.view_source_size,
        decode_on_device=data_args.decode_on_device,
        augmentations=data_args.augmentations,
        crop_scale=parse_crop_scale(data_args.crop_scale),
        ignore_signals=training_args.signals(),
    )
    total_steps = _total_steps(training_args, data_stats, batch_size * world)
    representations = build_representations(model_args, teacher)
    _check_local_batch(batch_size, criterion, representations, student)
    matching = build_feature_matching(
        student, representations, teacher.feature_matching_weight if teacher is not None else 0.0,
        image_size=data_args.image_size, rng_state=heads_rng,
    )  # fmt: skip
    # --teacher-view augmented: the teachers see x̃, uncached, every step; hand-crafted descriptors keep x
    teachers_see_augmented = teacher is not None and teacher.teacher_view == "augmented"
    # Z only when a term reads it: one student pass a step, not two, for distillation's defaults
    embeds_x = criterion.needs_non_augmented or (matching is not None and not teachers_see_augmented)
    set_seed(training_args.seed, device_specific=True)  # e.g. augmented-pixels: per-process random draws

    # From here on the output folder is written, by this run alone: it holds the folder's lock.
    images_per_step = training_args.batch_size * training_args.grad_accum
    run = RunScaffold(accelerator, output_dir, training_args, resume_from, images_per_step=images_per_step)
    with run.holding_folder(args):
        # The student (and the heads) on the device, prepared with Adam and the schedule.
        if model_args.sync_batchnorm and world > 1 and device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        _apply_speed_options(student, training_args, device)
        trained = [student] if matching is None else [student, matching]  # the heads learn with the student
        optimizer = build_optimizer(trained, training_args.learning_rate, training_args.weight_decay, device)
        warmup = training_args.warmup
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, round(warmup * total_steps if warmup < 1 else warmup), total_steps
        )
        # The heads prepared too: DDP averages their gradients, save_state / load_state keep them.
        student, *heads, optimizer, scheduler = accelerator.prepare(*trained, optimizer, scheduler)
        matching, trained = (heads[0] if heads else None), [student, *heads]
        # The representations on the device, the teachers' caches.
        for representation in representations.values():
            representation.to(device)
        caches = teacher_caches(accelerator, output_dir, teacher, data_args, representations)
        gather = {name: getattr(r, "gather", True) for name, r in representations.items()}
        teachers = _teacher_facts(representations, criterion, data_args.image_size, device)

        def run_facts(step: int, seconds: float) -> CardInfo:
            """What the card reports of the run so far; each checkpoint keeps them for mvmr-export."""
            return CardInfo(
                step=step,
                hardware=_hardware(accelerator),
                training_seconds=seconds,
                command=shlex.join(sys.argv),
                repo_id=training_args.push_to_hub,
                teachers=teachers,
            )

        # The resume point: weights, optimizer, random states and this process's data position.
        restored = run.resume(
            loader_state=lambda step: loader.state_dict(),
            run_info=lambda step, seconds: asdict(run_facts(step, seconds)),
        )
        step, epoch = run.start_step, 0 if restored is None else restored.epoch
        if restored is not None:
            loader.load_state_dict(restored.loader_state)  # this epoch's stream goes on where it stopped
        if training_args.log_with:
            accelerator.init_trackers("mvmr", config={k: v for k, v in args.items() if v is not None})
        resumed_epoch = epoch if resume_from is not None else None
        release = output_dir / RELEASE_DIR
        # Resumed with no step left: the release of that step stays, with what its card gained since
        # (mvmr-evaluate --update-card, mvmr-align), which exporting it again would drop.
        released = stored_run_info(release) if step >= total_steps else None
        keep_release = released is not None and released.step == step

        def distil(batch: dict[str, Any]) -> LossOutput:
            """One micro-step: the student's passes, the representations, the loss (eq. 10), the update."""
            # x and x̃ as [0, 1] floats on the device (travelling as uint8; x̃ made there with device
            # views, both decoded there with --decode-on-device)
            images, augmented = loader.dataset.views_on(batch, device)
            with accelerator.accumulate(*trained):
                out = student(images) if embeds_x else None  # Z: the non-augmented view
                out_aug = student(augmented)  # Z̃: a separate pass, its own BN statistics
                targets = representation_outputs(
                    accelerator, representations, images, batch["key"], caches,
                    teacher_images=augmented if teachers_see_augmented else images,
                )  # fmt: skip
                z = None if out is None else out.embedding
                loss = criterion(z, out_aug.embedding, targets, gather=gather)  # eq. 10
                if matching is not None:  # not in the paper: it distils better (README, "Quality")
                    # backbone features of the view the teachers saw against their outputs
                    seen = out_aug if teachers_see_augmented else out
                    loss = loss.plus(matching(seen.features, targets))
                accelerator.backward(loss.total)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            return loss

        # The loop: epochs of the data until the last step; the scaffold logs, saves and stops.
        student.train()
        bar = tqdm(total=total_steps, initial=step, unit="step", disable=not accelerator.is_main_process)
        with run, bar:
            while step < total_steps and (
                training_args.max_steps is not None or epoch < training_args.epochs
            ):
                loader.dataset.set_epoch(epoch)
                batches = 0
                for batch in _until_any_process_runs_out(loader, accelerator):
                    batches += 1
                    loss = distil(batch)
                    run.meter.add(loss.total, loss.terms, skipped=batch["skipped"], step=step + 1)
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    bar.update()
                    lr, log = scheduler.get_last_lr()[0], step % training_args.log_every == 0
                    if summary := run.end_step(step, epoch, lr, log=log):
                        bar.set_postfix(summary)
                    if step == total_steps:
                        break
                else:  # this epoch's data ran out
                    if batches == 0 and epoch != resumed_epoch:  # a resumed epoch may have no batch left
                        raise TrainingError(
                            f"epoch {epoch} gave no full batch of {batch_size} images on some process: its "
                            "share of the split has fewer decodable images (too few images for --batch-size "
                            "on this many processes, or mostly undecodable ones): lower --batch-size or "
                            "check the data set"
                        )
                    epoch += 1
                    for cache in caches.values():
                        share_cache(accelerator, cache)
        run.finish(step, epoch, scheduler.get_last_lr()[0])

        # The release: the student's folder, then the Hub.
        if accelerator.is_main_process and keep_release:
            print(
                f"the run had already reached its last step, {step}: {release} is kept as it is",
                file=sys.stderr,
            )
        elif accelerator.is_main_process:
            print(f"skipped {run.meter.skipped} images", file=sys.stderr)  # undecodable or degenerate
            final = accelerator.unwrap_model(student).eval()
            export_student(final, release, training_args=args, card_info=run_facts(step, run.seconds()))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if training_args.push_to_hub and accelerator.is_main_process:
            # After the other processes have finished: a failed push (ConfigError) keeps the release.
            push_to_hub(release, training_args.push_to_hub)
        return release


def _check_decoding(decode_on_device: bool, device: torch.device, *, device_views: bool) -> None:
    if not decode_on_device:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"--decode-on-device decodes JPEGs with nvJPEG on a CUDA GPU, but this run's device is "
            f"{device.type}: drop the flag (the workers decode)"
        )
    if not device_views:
        raise ConfigError("--decode-on-device makes the views on the GPU: drop --device-views false")


def _check_trackers(trackers: list[str] | str | None) -> None:
    """Accelerate would silently drop a tracker whose package is missing: refuse it instead."""
    if not isinstance(trackers, list):
        return
    known = LoggerType.list()
    for name in trackers:
        if name not in known:
            raise ConfigError(
                f"--log-with {name!r} is not an Accelerate tracker: use one of {', '.join(known)}"
            )
        if LoggerType(name) not in get_available_trackers():
            raise ConfigError(
                f"--log-with {name} needs its package, which is not installed: pip install {name}"
            )


def _per_process_batch(global_batch: int, world: int, *, unbiased: bool) -> int:
    """Each process's share of the global --batch-size."""
    check_batch_size(
        global_batch, unbiased=unbiased, what=f"--batch-size {global_batch}", fix="raise --batch-size"
    )
    if global_batch % world:
        raise ConfigError(
            f"--batch-size {global_batch} is the global batch and must divide evenly over the {world} "
            f"processes: use a multiple of {world}"
        )
    return global_batch // world


def _check_local_batch(
    batch_size: int, criterion: MVMRLoss, representations: dict[str, nn.Module], student: nn.Module
) -> None:
    """Terms computed on each process's own batch, and batch norm, need enough samples per process."""
    local_terms = criterion.scope == "local" or any(
        not getattr(r, "gather", True) for r in representations.values()
    )
    if local_terms:
        check_batch_size(
            batch_size,
            unbiased=criterion.unbiased,
            what=f"each process's batch of {batch_size} samples (for the per-process dCor terms)",
            fix="raise --batch-size or use fewer processes",
        )
    if batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        raise ConfigError(
            "each process gets 1 sample, too few for the student's batch norm: raise --batch-size to at "
            "least 2 per process"
        )


def _apply_speed_options(student: Student, training_args: TrainingArguments, device: torch.device) -> None:
    """--channels-last (default: on CUDA only) and --compile, in place: weight names stay the same."""
    channels_last = training_args.channels_last
    if channels_last or (channels_last is None and device.type == "cuda"):
        student.to_channels_last()
    if training_args.compile:
        student.compile()  # nn.Module.compile: the module itself, not a wrapper with renamed weights


def build_feature_matching(
    student: Student,
    representations: Mapping[str, nn.Module],
    weight: float,
    *,
    image_size: int,
    rng_state: Tensor | None = None,
) -> FeatureMatching | None:
    """The linear heads of the feature-matching term (not in the paper), one per teacher; None at weight 0.

    Each head maps the student's pooled features to its teacher's output, whose width is read
    from one forward of a black image of the training size (a teacher states no output width).
    ``rng_state`` is the CPU random state to draw the heads' initial weights from (the global
    state is left as it was): taken right after the student is built, every process draws the
    same heads. ``--teacher-output tokens`` is refused with a weight above 0 by
    :class:`~mvmr_hf.config.TeacherArguments`, and ``auto`` never resolves to tokens.

    Args:
        student: the student whose pooled features (width ``feature_dim``) the heads take.
        representations: the run's representations by name; only the :class:`Teacher` ones get a head.
        weight: the term's weight (``--feature-matching-weight``); 0 builds nothing.
        image_size: the side of the black image used to read each teacher's output width.
        rng_state: the CPU random state the heads are drawn from; None: the current global state.
            Either way the global state is left as it was.
    """
    teachers = {name: r for name, r in representations.items() if isinstance(r, Teacher)}
    if weight == 0 or not teachers:
        return None
    view = torch.zeros(1, 3, image_size, image_size)
    widths = {name: teacher(view).shape[1] for name, teacher in teachers.items()}
    with torch.random.fork_rng(devices=[]):
        if rng_state is not None:
            torch.random.set_rng_state(rng_state)
        return FeatureMatching(student.feature_dim, widths, weight)


def build_representations(
    model_args: ModelArguments, teacher: TeacherArguments | None
) -> dict[str, nn.Module]:
    """The representations r_k of eq. 9 by name: the teachers in ``--teacher`` order, then the descriptors."""
    representations: dict[str, nn.Module] = {}
    if teacher is not None:
        dtype = torch.bfloat16 if teacher.teacher_dtype == "bfloat16" else None
        for spec in teacher.teachers():
            representations[spec.name] = load_teacher(
                spec.model, output=spec.output, trust_remote_code=teacher.trust_remote_code, dtype=dtype
            )
    for name in model_args.handcrafted_names:
        representations[name] = build_representation(name)
    return representations


def _term_names(model_args: ModelArguments, teacher: TeacherArguments | None) -> list[str]:
    """The names of the run's representations: its teachers' (never a descriptor's), then its descriptors'."""
    teachers = [spec.name for spec in teacher.teachers()] if teacher is not None else []
    return teachers + list(model_args.handcrafted_names)


def _check_representation_weights(criterion: MVMRLoss, names: list[str]) -> None:
    unknown = sorted(set(criterion.representation_weights) - set(names))
    if unknown:
        active = ", ".join(names) or "none"
        raise ConfigError(
            f"--representation-weights names {', '.join(unknown)}, which this run does not use (its "
            f"representations: {active}): weight only those"
        )


def _total_steps(training_args: TrainingArguments, data_stats: DataStats, global_batch: int) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes over the data set's images."""
    if training_args.max_steps is not None:
        return training_args.max_steps
    num_examples = data_stats.num_examples
    if num_examples is None:
        raise ConfigError(
            "the data set does not state its number of images, so --epochs cannot be turned into steps: "
            "pass --max-steps"
        )
    steps_per_epoch = num_examples // global_batch // training_args.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the data set's {num_examples} images make no full optimizer step of {global_batch} x "
            f"{training_args.grad_accum} images: lower --batch-size or --grad-accum"
        )
    return steps_per_epoch * training_args.epochs


def _until_any_process_runs_out(loader: ViewsLoader, accelerator: Accelerator) -> Iterator[dict]:
    """The loader's batches while every process still has one.

    Processes can hold different numbers of batches (skipped images, a stream's uneven rows);
    a process that went on alone would wait forever in the next collective.
    """
    if accelerator.num_processes == 1:
        yield from loader
        return
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        if not reduce_flag(batch is not None, dist.ReduceOp.MIN):
            return
        yield batch


def _teacher_facts(
    representations: dict[str, nn.Module], criterion: MVMRLoss, image_size: int, device: torch.device
) -> list[dict[str, Any]]:
    """What the card says of each teacher: name, model, output kind, the side its model sees, weight β."""
    view = torch.zeros(1, 3, image_size, image_size, device=device)
    return [
        {"name": name, "model": teacher.model_name_or_path, "output": teacher.output,
         "input_size": teacher.preprocess(view).shape[-1], "weight": criterion.weight(name)}
        for name, teacher in representations.items()
        if isinstance(teacher, Teacher)
    ]  # fmt: skip


def _hardware(accelerator: Accelerator) -> str:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{accelerator.num_processes}x {name}"

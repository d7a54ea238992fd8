"""``mvmr-export``, ``mvmr-evaluate``, ``mvmr-align`` and ``mvmr-push``: from a run to a published model.

Arguments are the dataclasses of :mod:`mvmr_hf.config`, parsed like the training commands
(:func:`mvmr_hf.cli.parse_arguments`: ``--help`` documents every flag, a JSON/YAML file may hold
them, errors are one line, exit 2)::

    mvmr-export runs/kd                                   # -> runs/kd/student (latest checkpoint)
    mvmr-evaluate --model runs/kd/student --dataset tanganke/stl10 --protocol linear,knn --update-card
    mvmr-evaluate --model runs/kd/student --dataset ./imagenet --protocol finetune --label-fraction 0.01
    mvmr-align --model runs/kd/student --dataset tanganke/stl10 --split unlabeled
    mvmr-evaluate --model runs/kd/student --dataset tanganke/stl10 --protocol zero-shot --update-card
    mvmr-evaluate --model runs/kd/student --dataset ORG/VOC2007 --train-split trainval \
        --protocol multilabel --label-column labels --update-card
    mvmr-push runs/kd/student me/resnet50-mvmr-clip --private

``mvmr-evaluate`` and ``mvmr-align`` also run under ``accelerate launch`` (or ``torchrun``) with
several processes: each extracts the features of its share of the images, and the main process
prints and writes the results.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from mvmr_hf import config
from mvmr_hf.cli import parse_arguments, run_cli
from mvmr_hf.config import (
    AlignArguments,
    EvalDataArguments,
    EvaluateArguments,
    ExportArguments,
    FinetuneArguments,
    PushArguments,
)
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.distributed import launch_state
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import extract_features, load_encoder
from mvmr_hf.evaluation.finetuning import Finetuning
from mvmr_hf.evaluation.protocols import evaluate, parse_protocols
from mvmr_hf.evaluation.results import format_table, to_eval_results
from mvmr_hf.release.align import alignment_teacher, fit_alignment
from mvmr_hf.release.export import TRAINING_ARGS, add_alignment, check_release, export_run, update_card
from mvmr_hf.release.hub import push_to_hub
from mvmr_hf.utils import deprecated_alias

__all__ = ["align_main", "evaluate_main", "export_main", "push_main"]


def _export(argv: Sequence[str]) -> None:
    (args,) = parse_arguments(
        [ExportArguments],
        argv,
        prog="mvmr-export",
        description=export_main.__doc__,
        positionals=["checkpoint"],
    )
    print(export_run(args.checkpoint, args.output_dir, overwrite=args.overwrite))


def _evaluate(argv: Sequence[str]) -> None:
    args, data, tuning = parse_arguments(
        [EvaluateArguments, EvalDataArguments, FinetuneArguments],
        argv,
        prog="mvmr-evaluate",
        description=evaluate_main.__doc__,
    )
    protocols = parse_protocols(args.protocol)
    command = shlex.join(["mvmr-evaluate", *argv])
    if args.update_card:
        check_release(args.model)
    # Fine-tuning is checked first (writing nothing), so that its bad input stops the command before
    # the frozen-feature protocols write their caches; it runs last.
    tuning_job = None
    if "finetune" in protocols:
        tuning_job = Finetuning(
            args.model,
            data.dataset,
            tuning,
            config=data.dataset_config,
            train_split=args.train_split,
            test_split=args.test_split,
            image_column=data.image_column,
            label_column=args.label_column,
            eval_batch_size=data.batch_size,
            num_workers=data.num_workers,
            command=command,
        )
    frozen = [protocol for protocol in protocols if protocol != "finetune"]
    results = []
    if frozen:
        results = evaluate(
            load_encoder(args.model, teacher_output=args.teacher_output),
            data.dataset,
            config=data.dataset_config,
            train_split=args.train_split,
            test_split=args.test_split,
            image_column=data.image_column,
            label_column=args.label_column,
            protocols=frozen,
            batch_size=data.batch_size,
            device=data.device,
            num_workers=data.num_workers,
            cache_dir=data.cache_dir or None,
        )
    if tuning_job is not None:
        results.append(tuning_job.run().as_protocol_result())
    if not launch_state().is_main_process:  # every process has the results; one reports them
        return
    print(format_table(results))
    if args.update_card:
        entries = to_eval_results(
            results, dataset=data.dataset, config=data.dataset_config, split=args.test_split, command=command
        )
        update_card(args.model, entries)
        print(f"updated {Path(args.model) / 'README.md'}")


def _align(argv: Sequence[str]) -> None:
    args, data = parse_arguments(
        [AlignArguments, EvalDataArguments], argv, prog="mvmr-align", description=align_main.__doc__
    )
    folder = check_release(args.model)
    teacher = alignment_teacher(json.loads((folder / TRAINING_ARGS).read_text()), args.teacher)
    sources = {"config": data.dataset_config, "streaming": False, "image_column": data.image_column}
    split = load_image_dataset(data.dataset, split=args.split, **sources)
    if args.max_images is not None:
        split = split.select(range(min(args.max_images, len(split))))
    options = {
        "image_column": data.image_column,
        "label_column": None,
        "batch_size": data.batch_size,
        "device": data.device,
        "num_workers": data.num_workers,
        "cache_dir": data.cache_dir or None,
    }
    # Both models load before any image is read: a teacher that cannot load (offline, a moved folder)
    # stops the command before the student's features are extracted and cached for nothing.
    student_encoder = load_encoder(str(folder))
    # "auto" resolves to the image-text embedding wherever the teacher has one; anything else (a ViT, a
    # timm folder such as EfficientNet-Lite's) has no text tower for zero-shot to classify with.
    teacher_encoder = load_encoder(teacher, option="--teacher")
    if teacher_encoder.text_model is None:
        raise ConfigError(
            f"--teacher {teacher} gives no image-text embedding (only CLIP- and SigLIP-style models do): "
            "zero-shot classifies through that model's text tower; pass one with --teacher."
        )
    student = extract_features(student_encoder, split, **options)
    del student_encoder  # its device memory goes to the teacher's pass
    target = extract_features(teacher_encoder, split, **options)
    if student.skipped != target.skipped:
        raise ConfigError(
            "the student and the teacher decoded different images: clear --cache-dir and retry."
        )
    if not launch_state().is_main_process:  # every process has the features; one fits and writes the head
        return
    # On the CPU: the closed-form fit is a float64 D x D solve, which not every accelerator has.
    fit = fit_alignment(student.features.cpu(), target.features.cpu())
    add_alignment(folder, fit, teacher=teacher, teacher_output="embedding")
    print(
        f"alignment head fitted on {fit.num_images} images: held-out cosine {fit.val_cosine:.4f} "
        f"(ridge {fit.ridge:.3g}); saved in {folder}"
    )


def _push(argv: Sequence[str]) -> None:
    (args,) = parse_arguments(
        [PushArguments],
        argv,
        prog="mvmr-push",
        description=push_main.__doc__,
        positionals=["folder", "repo_id"],
    )
    url = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(url)


def export_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-export RUN_OR_CHECKPOINT``: write the release folder (timm + transformers format, card)."""
    return run_cli(_export, argv)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-evaluate``: linear, kNN, zero-shot and multi-label evaluation; semi-supervised fine-tuning."""
    return run_cli(_evaluate, argv)


def align_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-align``: fit a student's alignment head to its teacher's image embeddings (for zero-shot)."""
    return run_cli(_align, argv)


def push_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-push FOLDER ORG/NAME``: upload a release folder to the Hugging Face Hub."""
    return run_cli(_push, argv)


# The arguments lived here before they moved into the library (mvmr_hf.config); the data arguments of
# evaluation were renamed so that one name no longer means two classes.
__getattr__ = deprecated_alias(
    __name__,
    {
        "DataArguments": (config, "EvalDataArguments"),
        **{
            name: (config, name)
            for name in ("AlignArguments", "EvaluateArguments", "ExportArguments", "PushArguments")
        },
    },
)

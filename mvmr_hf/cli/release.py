"""``mvmr-export``, ``mvmr-evaluate``, ``mvmr-align`` and ``mvmr-push``: from a run to a published model.

Arguments are dataclasses parsed like the training commands (:func:`mvmr_hf.cli.train.parse_arguments`:
``--help`` documents every flag, a JSON/YAML file may hold them, errors are one line, exit 2)::

    mvmr-export runs/kd                                   # -> runs/kd/student (latest checkpoint)
    mvmr-evaluate --model runs/kd/student --dataset tanganke/stl10 --protocol linear,knn --update-card
    mvmr-align --model runs/kd/student --dataset tanganke/stl10 --split unlabelled
    mvmr-evaluate --model runs/kd/student --dataset tanganke/stl10 --protocol zero-shot --update-card
    mvmr-push runs/kd/student me/resnet50-mvmr-clip --private
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvmr_hf.align import fit_alignment
from mvmr_hf.cli import run_cli
from mvmr_hf.cli.train import parse_arguments
from mvmr_hf.data import load_image_dataset
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluate import (
    evaluate,
    extract_features,
    format_table,
    load_encoder,
    parse_protocols,
    to_eval_results,
)
from mvmr_hf.export import TRAINING_ARGS, add_alignment, check_release, export_run, update_card
from mvmr_hf.hub import push_to_hub

__all__ = [
    "AlignArguments",
    "DataArguments",
    "EvaluateArguments",
    "ExportArguments",
    "PushArguments",
    "align_main",
    "evaluate_main",
    "export_main",
    "push_main",
]

DEFAULT_CACHE = "~/.cache/mvmr_hf/features"


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ExportArguments:
    """Export a training checkpoint as a release folder."""

    checkpoint: str = _opt(
        MISSING, "Run folder (its latest checkpoint is used) or one of its checkpoints/step-NNNNNN folders."
    )
    output_dir: str | None = _opt(None, "Release folder to write; default RUN/student.")


@dataclass
class DataArguments:
    """The images and how to read them (shared by mvmr-evaluate and mvmr-align)."""

    _argument_group_name = "data"

    dataset: str = _opt(MISSING, "Hub data set id or local folder (parquet shards or an image folder).")
    dataset_config: str | None = _opt(None, "Configuration name of the data set.")
    image_column: str | None = _opt(
        None, "Column holding the images; detected from the features when omitted."
    )
    batch_size: int = _opt(256, "Images per forward pass.")
    num_workers: int = _opt(0, "Data-loading worker processes (decoding and resizing).")
    device: str | None = _opt(None, "Device to run the models on; default cuda when available, else cpu.")
    cache_dir: str = _opt(
        DEFAULT_CACHE, "Folder caching extracted features per model, data set and split; empty for no cache."
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"--batch-size {self.batch_size} / --num-workers {self.num_workers}: "
                "use a batch size of at least 1 and 0 or more workers."
            )


@dataclass
class EvaluateArguments:
    """The model and the protocols."""

    _argument_group_name = "evaluation"

    model: str = _opt(
        MISSING,
        "A release folder, a Hub id, a timm model name (pretrained weights) or a transformers model "
        "(a teacher: its image embedding / pooled output).",
    )
    train_split: str = _opt("train", "Split the linear probe and kNN are fitted on.")
    test_split: str = _opt("test", "Split the accuracies are reported on.")
    label_column: str = _opt("label", "Column holding the integer class labels.")
    protocol: str = _opt("linear,knn", "Comma-separated protocols among linear, knn, zero-shot.")
    teacher_output: str = _opt(
        "auto", "Output of a transformers --model (see mvmr-distill --teacher-output)."
    )
    update_card: bool = _opt(False, "Write the results into the release folder's card (model-index).")


@dataclass
class AlignArguments:
    """The student, its teacher and the images the head is fitted on (labels unused)."""

    _argument_group_name = "alignment"

    model: str = _opt(MISSING, "Release folder of a distilled student.")
    split: str = _opt("train", "Split whose images (labels unused) the head is fitted on.")
    teacher: str | None = _opt(None, "CLIP-style teacher to align to; default the run's --teacher.")
    max_images: int | None = _opt(None, "Use at most this many images of the split (its first ones).")


@dataclass
class PushArguments:
    """Upload a release folder to the Hugging Face Hub."""

    folder: str = _opt(MISSING, "Release folder to upload.")
    repo_id: str = _opt(MISSING, "Hub model repository, ORG/NAME (created when missing).")
    private: bool = _opt(False, "Create the repository private.")
    revision: str | None = _opt(None, "Branch to commit to (created when missing); default the main branch.")
    commit_message: str | None = _opt(None, "Commit message; default names the training step.")


def _with_positionals(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``FOLDER ORG/NAME --private`` -> ``--folder FOLDER --repo_id ORG/NAME --private``."""
    args, flags = list(argv), []
    for name in names:
        if not args or args[0].startswith("-"):
            break
        flags += [f"--{name}", args.pop(0)]
    return flags + args


def _export(argv: Sequence[str]) -> None:
    (args,) = parse_arguments(
        [ExportArguments],
        _with_positionals(argv, ["checkpoint"]),
        prog="mvmr-export",
        description=export_main.__doc__,
    )
    print(export_run(args.checkpoint, args.output_dir))


def _evaluate(argv: Sequence[str]) -> None:
    args, data = parse_arguments(
        [EvaluateArguments, DataArguments], argv, prog="mvmr-evaluate", description=evaluate_main.__doc__
    )
    protocols = parse_protocols(args.protocol)
    if args.update_card:
        check_release(args.model)
    results = evaluate(
        load_encoder(args.model, teacher_output=args.teacher_output),
        data.dataset,
        config=data.dataset_config,
        train_split=args.train_split,
        test_split=args.test_split,
        image_column=data.image_column,
        label_column=args.label_column,
        protocols=protocols,
        batch_size=data.batch_size,
        device=data.device or _default_device(),
        num_workers=data.num_workers,
        cache_dir=data.cache_dir or None,
    )
    print(format_table(results))
    if args.update_card:
        entries = to_eval_results(
            results, dataset=data.dataset, config=data.dataset_config, split=args.test_split
        )
        update_card(args.model, entries)
        print(f"updated {Path(args.model) / 'README.md'}")


def _align(argv: Sequence[str]) -> None:
    args, data = parse_arguments(
        [AlignArguments, DataArguments], argv, prog="mvmr-align", description=align_main.__doc__
    )
    folder = check_release(args.model)
    teacher = args.teacher or json.loads((folder / TRAINING_ARGS).read_text()).get("teacher")
    if not teacher:
        raise ConfigError(
            f"{folder} was not distilled from a teacher: pass the CLIP-style model with --teacher."
        )
    split = load_image_dataset(data.dataset, config=data.dataset_config, split=args.split, streaming=False)
    if args.max_images is not None:
        split = split.select(range(min(args.max_images, len(split))))
    options = {
        "image_column": data.image_column,
        "label_column": None,
        "batch_size": data.batch_size,
        "device": data.device or _default_device(),
        "num_workers": data.num_workers,
        "cache_dir": data.cache_dir or None,
    }
    student = extract_features(load_encoder(str(folder)), split, **options)
    target = extract_features(load_encoder(teacher, teacher_output="embedding"), split, **options)
    if student.skipped != target.skipped:
        raise ConfigError(
            "the student and the teacher decoded different images: clear --cache-dir and retry."
        )
    fit = fit_alignment(student.features, target.features)
    add_alignment(folder, fit, teacher=teacher, teacher_output="embedding")
    print(
        f"alignment head fitted on {fit.num_images} images: held-out cosine {fit.val_cosine:.4f} "
        f"(ridge {fit.ridge:.3g}); saved in {folder}"
    )


def _push(argv: Sequence[str]) -> None:
    (args,) = parse_arguments(
        [PushArguments],
        _with_positionals(argv, ["folder", "repo_id"]),
        prog="mvmr-push",
        description=push_main.__doc__,
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
    """``mvmr-export CHECKPOINT_OR_RUN``: write the release folder (timm + transformers format, card)."""
    return run_cli(_export, argv)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-evaluate``: linear probe, kNN and zero-shot accuracy of frozen features."""
    return run_cli(_evaluate, argv)


def align_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-align``: fit a student's alignment head to its teacher's image embeddings (for zero-shot)."""
    return run_cli(_align, argv)


def push_main(argv: Sequence[str] | None = None) -> int:
    """``mvmr-push FOLDER ORG/NAME``: upload a release folder to the Hugging Face Hub."""
    return run_cli(_push, argv)

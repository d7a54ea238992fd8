"""The arguments of the release commands: ``mvmr-export``, ``mvmr-evaluate`` (its ``finetune`` protocol
included), ``mvmr-align`` and ``mvmr-push``."""

from __future__ import annotations

from dataclasses import MISSING, dataclass

from mvmr_hf.config.options import (
    RunArguments,
    _check_ints,
    _list_opt,
    _opt,
    check_label_fraction,
    preset,
)
from mvmr_hf.utils import check_number

DEFAULT_CACHE = "~/.cache/mvmr_hf/features"


@dataclass
class ExportArguments:
    """Export a training checkpoint as a release folder."""

    checkpoint: str = _opt(
        MISSING,
        "Run folder (its latest checkpoint is used) or one of its checkpoints/step-NNNNNN folders.",
        metavar="RUN_OR_CHECKPOINT",
    )
    output_dir: str | None = _opt(None, "Release folder to write; default RUN/student.")
    overwrite: bool = _opt(
        False, "Replace a release already in that folder, with its evaluation results and alignment head."
    )


@dataclass
class EvalDataArguments:
    """The images and how to read them (shared by mvmr-evaluate and mvmr-align)."""

    _argument_group_name = "data"

    dataset: str = _opt(MISSING, "Hub data set id or local folder (parquet shards or an image folder).")
    dataset_config: str | None = _opt(None, "Configuration name of the data set.")
    image_column: str | None = _opt(
        None, "Column holding the images; detected from the features when omitted."
    )
    batch_size: int = _opt(256, "Images per forward pass.")
    num_workers: int = _opt(0, "Data-loading worker processes (decoding and resizing).")
    device: str | None = _opt(
        None,
        "Device to run the models, the probe and kNN on; default the launch's device for each process "
        "(its GPU under accelerate launch / torchrun; cuda when available, else cpu).",
    )
    cache_dir: str = _opt(
        DEFAULT_CACHE, "Folder caching extracted features per model, data set and split; empty for no cache."
    )

    def __post_init__(self) -> None:
        _check_ints(self, ("batch_size",), 1)
        _check_ints(self, ("num_workers",), 0)


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
    label_column: str = _opt(
        "label",
        "The labels: a class id per image, or (multilabel) a list of classes or a multi-hot vector.",
    )
    protocol: str = _list_opt(
        "linear,knn",
        "Comma-separated protocols among linear, knn, zero-shot, multilabel (frozen features) and finetune "
        "(semi-supervised fine-tuning of the whole backbone on --label-fraction of the training labels, "
        "paper Table 1).",
    )
    teacher_output: str = _opt(
        "auto", "Output of a transformers --model (see mvmr-distill --teacher-output)."
    )
    update_card: bool = _opt(False, "Write the results into the release folder's card (model-index).")


@preset(
    {"checkpoint_every": 500},
    {"overwrite": "Fine-tuning's output folder is --finetune-dir, its release the classifier."},
)
class FinetuneArguments(RunArguments):
    """Semi-supervised fine-tuning (paper, section 6.1 and Table 1): the whole backbone and a linear head.

    The defaults are the paper's (section 7): Adam, learning rate 1e-4, batch 128, 100 epochs, cross-entropy.
    """

    _argument_group_name = "semi-supervised fine-tuning (--protocol finetune)"

    label_fraction: float = _opt(
        0.01,
        "Share of the training split whose labels fine-tuning uses, in (0, 1] (paper Table 1: 0.01 and 0.1); "
        "the images are drawn per class, the same share of each class, and listed in labelled_subset.json.",
    )
    finetune_epochs: int = _opt(100, "Passes over the labelled images (paper: 100).")
    finetune_max_steps: int | None = _opt(
        None, "Stop after this many optimizer steps; overrides --finetune-epochs when set."
    )
    finetune_batch_size: int = _opt(
        128, "GLOBAL batch of labelled images, split evenly over the processes (paper: 128)."
    )
    finetune_learning_rate: float = _opt(1e-4, "Adam learning rate, constant (paper: 1e-4).")
    finetune_weight_decay: float = _opt(0.0, "Adam weight decay (the paper states none).")
    finetune_seed: int = _opt(
        0, "Seed of the labelled subset, the head's initial weights, the batch order and the augmentations."
    )
    finetune_dir: str | None = _opt(
        None,
        "Run folder of the fine-tuning: checkpoints/, metrics.jsonl, labelled_subset.json, results.json and "
        "the classifier release classifier/; default MODEL-finetune-1pct next to a model folder, else in the "
        "working directory.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_label_fraction(self.label_fraction)
        names = ("finetune_epochs", "finetune_batch_size")
        _check_ints(self, names if self.finetune_max_steps is None else (*names, "finetune_max_steps"), 1)
        check_number("--finetune-learning-rate", self.finetune_learning_rate)
        check_number("--finetune-weight-decay", self.finetune_weight_decay, allow_zero=True)


@dataclass
class AlignArguments:
    """The student, its teacher and the images the head is fitted on (labels unused)."""

    _argument_group_name = "alignment"

    model: str = _opt(MISSING, "Release folder of a distilled student.")
    split: str = _opt("train", "Split whose images (labels unused) the head is fitted on.")
    teacher: str | None = _opt(
        None,
        "CLIP-style teacher to align to: one of the run's teacher names, or a model id or folder; default "
        "the run's teacher (required when it had several).",
    )
    max_images: int | None = _opt(None, "Use at most this many images of the split (its first ones).")


@dataclass
class PushArguments:
    """Upload a release folder to the Hugging Face Hub."""

    folder: str = _opt(MISSING, "Release folder to upload.")
    repo_id: str = _opt(MISSING, "Hub model repository (created when missing).", metavar="ORG/NAME")
    private: bool = _opt(False, "Create the repository private.")
    revision: str | None = _opt(None, "Branch to commit to (created when missing); default the main branch.")
    commit_message: str | None = _opt(None, "Commit message; default names the training step.")

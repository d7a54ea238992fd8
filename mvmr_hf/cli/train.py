"""``mvmr-distill`` and ``mvmr-pretrain``: the argument dataclasses and the two entry points.

Both commands run the same loop, :func:`mvmr_hf.train.train`; they differ only in the
representations the student is matched against (paper, eq. 9): distillation has a teacher
(and optionally hand-crafted descriptors), pretraining the five hand-crafted descriptors of
the paper (section 7). Arguments are dataclasses parsed by transformers' ``HfArgumentParser``,
so ``--help`` documents every flag and a run can come from a JSON or YAML file::

    mvmr-distill --dataset ./digits --output-dir runs/kd --student resnet18 --batch-size 64
    mvmr-pretrain run.yaml --max-steps 100       # the file's values, then the flags, win
    mvmr-distill --config runs/kd/training_args.json --resume
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from mvmr_hf.cli import run_cli
from mvmr_hf.dcor import check_estimator
from mvmr_hf.errors import ConfigError

__all__ = [
    "PAPER_REPRESENTATIONS",
    "DataArguments",
    "DistillDataArguments",
    "DistillTrainingArguments",
    "LossArguments",
    "ModelArguments",
    "PretrainModelArguments",
    "TeacherArguments",
    "TrainingArguments",
    "distill_main",
    "parse_arguments",
    "parse_names",
    "parse_weights",
    "pretrain_main",
]

PAPER_REPRESENTATIONS = ("pixels", "augmented-pixels", "scatnet", "hog", "lsd")
"""The hand-crafted representations of the paper's self-supervised pretraining (section 7)."""


def parse_names(text: str) -> list[str]:
    """``"hog, lsd"`` -> ``["hog", "lsd"]``; empty entries are dropped, duplicates rejected."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--handcrafted lists {', '.join(repeated)} twice: name each representation once")
    return names


def parse_weights(text: str) -> dict[str, float]:
    """``"teacher=2,hog=0.5"`` -> ``{"teacher": 2.0, "hog": 0.5}`` (the β_k of eq. 9)."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(
                f"--representation-weights entry {item!r} is not name=number: write e.g. teacher=1,hog=0.5"
            )
    return weights


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "positive"
        raise ConfigError(f"--{name.replace('_', '-')} is {value} but must be {bound}")


def _opt(default: Any, text: str, **argparse_options: Any) -> Any:
    """A dataclass field with its ``--help`` text (and extra argparse options)."""
    return field(default=default, metadata={"help": text, **argparse_options})


@dataclass
class ModelArguments:
    """The student and the hand-crafted representations it is matched against."""

    _argument_group_name = "student and representations"

    student: str = _opt(
        "resnet50", "timm name of the student backbone, trained from scratch (paper: resnet50)."
    )
    projector: str = _opt(
        "8192-8192-8192",
        "Projector widths, dash-separated: Linear-BN-ReLU blocks, the last layer plain Linear "
        "(paper, section 7: 8192-8192-8192).",
    )
    handcrafted: str = _opt(
        "",
        "Comma-separated hand-crafted representations for the dCor terms of eq. 9, among "
        f"{', '.join(PAPER_REPRESENTATIONS)}; empty for none.",
    )
    sync_batchnorm: bool = _opt(
        True,
        "With several GPU processes, normalise with batch statistics of the global batch, so that the update "
        "does not depend on the number of GPUs (CPU processes cannot, and keep per-process statistics).",
    )

    def __post_init__(self) -> None:
        parse_names(self.handcrafted)

    @property
    def handcrafted_names(self) -> list[str]:
        """``--handcrafted`` as a list of representation names."""
        return parse_names(self.handcrafted)


@dataclass
class PretrainModelArguments(ModelArguments):
    """Self-supervised pretraining: the paper's five hand-crafted representations by default."""

    handcrafted: str = _opt(
        ",".join(PAPER_REPRESENTATIONS),
        "Comma-separated hand-crafted representations for the dCor terms of eq. 9 (paper, section 7: all "
        "five); empty for none, which leaves the L1 and L2 terms.",
    )


@dataclass
class TeacherArguments:
    """The frozen teacher of distillation (paper, section 5.2)."""

    _argument_group_name = "teacher"

    teacher: str = _opt(
        "openai/clip-vit-base-patch16",
        "Hub id or local folder of a transformers vision model (paper: CLIP ViT-B/16).",
    )
    teacher_output: str = _opt(
        "auto",
        "Teacher output to match: auto (the image embedding of image-text models, else the pooled output, "
        "else the CLS token, else the token mean), embedding, pooler, cls, mean or tokens.",
    )
    cache_teacher: bool = _opt(
        False,
        "Store the teacher's outputs in OUTPUT_DIR/teacher_cache during the first epoch and read them "
        "afterwards; exact, since the teacher only sees the non-augmented view.",
    )
    trust_remote_code: bool = _opt(
        False, "Let a Hub teacher run its own code; only for repositories you trust."
    )


@dataclass
class DataArguments:
    """The images: a Hub data set or a local folder of parquet files or images."""

    _argument_group_name = "data"

    dataset: str = _opt(MISSING, "Hub data set id or local folder (parquet shards or an image folder).")
    dataset_config: str | None = _opt(None, "Configuration name of the data set.")
    split: str = _opt("train", "Split to train on.")
    image_column: str | None = _opt(
        None, "Column holding the images; detected from the features when omitted."
    )
    streaming: bool = _opt(True, "Stream the data set instead of downloading and converting it first.")
    image_size: int = _opt(224, "Side of the square training views, in pixels.")
    shuffle_buffer: int = _opt(10_000, "Streaming shuffle buffer per process (0: keep the stored order).")
    num_workers: int = _opt(4, "Data-loading worker processes per training process.")

    def __post_init__(self) -> None:
        _positive("image_size", self.image_size)
        _positive("shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive("num_workers", self.num_workers, allow_zero=True)


DEFAULT_DISTILL_DATASET = "tanganke/stl10"
"""The data set ``mvmr-distill`` trains on when none is given: STL-10 (ImageNet-derived photographs,
96 px), on which the paper reports its CLIP ViT-B/16 -> ResNet-50 distillation (95.6 % linear)."""


@dataclass
class DistillDataArguments(DataArguments):
    """Distillation's data: the paper's STL-10 by default."""

    dataset: str = _opt(
        DEFAULT_DISTILL_DATASET,
        "Hub data set id or local folder (parquet shards or an image folder); default: STL-10's labelled "
        "training split (the paper's distillation benchmark).",
    )


@dataclass
class LossArguments:
    """Weights and estimator of the MV-MR objective (paper, eq. 4-10)."""

    _argument_group_name = "objective"

    invariance_weight: float = _opt(1.0, "λ of eq. 7 (paper: 1).")
    variance_weight: float = _opt(1.0, "μ of eq. 7 (paper: 1).")
    view_weight: float = _opt(1.0, "α of eq. 8 (paper: 1).")
    representation_weights: str = _opt(
        "", "β_k of eq. 9 as name=weight,... (e.g. teacher=1,hog=0.5); unlisted representations get 1."
    )
    invariance_reduction: Literal["mean", "sum"] = _opt(
        "mean",
        "Invariance term of eq. 4: 'mean' over batch and embedding dimensions (the paper's released code; "
        "measured best, see the README) or 'sum' over the dimensions (eq. 4 as printed: D times larger).",
    )
    dcor_estimator: Literal["biased", "unbiased"] = _opt(
        "biased",
        "'biased' (the paper's V-statistic) or 'unbiased' (U-centred, bias-corrected; needs a global "
        "batch of at least 4 and is only defined squared).",
    )
    dcor_squared: bool | None = _opt(
        None,
        "Use R² (eq. 11 as printed) rather than R in the dCor terms; when omitted, R for the biased "
        "estimator (the paper's released code, measured best: see the README) and R² for the unbiased one "
        "(the only one defined); --dcor-squared false forces R.",
        nargs="?",
        const=True,
    )
    dcor_scope: Literal["global", "local"] = _opt(
        "global",
        "'global': every term on the batch gathered from all processes, so the update equals a one-process "
        "run; 'local': per-process batches, as the paper's code did.",
    )

    def __post_init__(self) -> None:
        for name in ("invariance_weight", "variance_weight", "view_weight"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name, weight in parse_weights(self.representation_weights).items():
            if weight < 0:
                raise ConfigError(f"--representation-weights gives {name} the weight {weight}: use 0 or more")
        check_estimator(
            unbiased=self.dcor_estimator == "unbiased",
            squared=self.dcor_squared,
            fix="drop --dcor-squared false (--dcor-estimator unbiased runs only squared)",
        )

    @property
    def weights(self) -> dict[str, float]:
        """``--representation-weights`` as ``{name: β}``."""
        return parse_weights(self.representation_weights)


@dataclass
class TrainingArguments:
    """Optimisation, checkpoints, logging and the release."""

    _argument_group_name = "training"

    output_dir: str = _opt(MISSING, "Run folder: checkpoints/, metrics.jsonl, training_args.json, student/.")
    batch_size: int = _opt(
        256,
        "GLOBAL batch size of one micro-step, split evenly over the processes (paper: 256 pretraining, "
        "512 distillation).",
    )
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step (paper pretraining: 4).")
    epochs: int = _opt(100, "Passes over the data (paper: 1000 pretraining, 200 distillation).")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps; overrides --epochs when set.")
    learning_rate: float = _opt(1e-4, "Peak Adam learning rate (paper: 1e-4).")
    weight_decay: float = _opt(1e-6, "Adam weight decay (paper: 1e-6).")
    warmup: float = _opt(
        0.01,
        "Linear warm-up before the cosine decay, stepped per optimizer step: a fraction of all steps when "
        "below 1, else a number of steps (paper: 10 epochs).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _opt(
        None, "Mixed precision; when omitted, what `accelerate launch` or `accelerate config` set, else no."
    )
    channels_last: bool | None = _opt(
        None,
        "Keep the student's weights and activations in channels-last memory format (usually faster "
        "convolutions under mixed precision on GPUs); when omitted, on for CUDA and off elsewhere; "
        "--channels-last false turns it off.",
        nargs="?",
        const=True,
    )
    compile: bool = _opt(
        False,
        "torch.compile the student (in place: weight names, checkpoints and the release are unchanged); "
        "the first steps take longer while it compiles.",
    )
    checkpoint_every: int = _opt(1000, "Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = _opt(2, "Keep the N newest checkpoints.")
    resume: str | None = _opt(
        None,
        "Continue a run: alone (or 'latest') from the newest complete checkpoint in the output folder, "
        "starting afresh when there is none; or from the given checkpoint folder.",
        nargs="?",
        const="latest",
    )
    overwrite: bool = _opt(
        False, "Delete a previous run's checkpoints, metrics and release in the output folder."
    )
    seed: int = _opt(42, "Seed of the initial weights, the data order and the augmentations.")
    log_with: str | None = _opt(
        None, "Comma-separated Accelerate trackers (tensorboard, wandb, ...) or 'all'."
    )
    log_every: int = _opt(10, "Log loss, terms, learning rate and throughput every N optimizer steps.")
    push_to_hub: str | None = _opt(None, "Hub repository id (user/name) to push the student release to.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "checkpoint_every", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        _positive("log_every", self.log_every)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        _positive("learning_rate", self.learning_rate)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("warmup", self.warmup, allow_zero=True)
        if self.warmup >= 1 and not float(self.warmup).is_integer():
            raise ConfigError(f"--warmup {self.warmup} must be a fraction below 1 or a whole number of steps")
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one of them")

    @property
    def trackers(self) -> list[str] | str | None:
        """``--log-with`` as Accelerate's ``log_with``: a list of tracker names, ``"all"`` or None."""
        if not self.log_with or self.log_with == "all":
            return self.log_with or None
        return parse_names(self.log_with)


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """Distillation's schedule: the paper's (section 6.2 and its released code) by default."""

    output_dir: str = _opt(
        "runs/distill", "Run folder: checkpoints/, metrics.jsonl, training_args.json, student/."
    )
    batch_size: int = _opt(
        512, "GLOBAL batch size of one micro-step, split evenly over the processes (paper distillation: 512)."
    )
    epochs: int = _opt(200, "Passes over the data (paper distillation: 200).")
    warmup: float = _opt(
        0.05,
        "Linear warm-up before the cosine decay, stepped per optimizer step: a fraction of all steps when "
        "below 1, else a number of steps (paper: 10 of 200 epochs).",
    )


_EPILOG = (
    "Options can also come from a JSON or YAML file whose keys are the option names without dashes: "
    "pass it first (`%(prog)s run.yaml --max-steps 10`) or with --config; options on the command line "
    "override the file. --debug shows full tracebacks of errors."
)


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one-line ConfigErrors instead of usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (run with --help to see the options)")


def _split_config_file(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Take the config file (first positional argument or ``--config PATH``) out of ``argv``."""
    if argv and not argv[0].startswith("-") and Path(argv[0]).suffix.lower() in {".json", ".yaml", ".yml"}:
        return Path(argv[0]), argv[1:]
    for index, arg in enumerate(argv):
        if arg == "--config":
            if index + 1 == len(argv):
                raise ConfigError("--config needs a JSON or YAML file: --config run.yaml")
            return Path(argv[index + 1]), argv[:index] + argv[index + 2 :]
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]), argv[:index] + argv[index + 1 :]
    return None, argv


def _config_as_flags(path: Path, known: set[str]) -> list[str]:
    """The values in a JSON/YAML file as command-line flags, so that they get the same parsing and checks."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid JSON or YAML ({error.problem})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown keys {', '.join(unknown)}: see --help for the names"
        )
    flags: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = ",".join(f"{name}={weight}" for name, weight in value.items())
        elif isinstance(value, list):
            value = ",".join(str(item) for item in value)
        flags += [f"--{key}", str(value)]
    return flags


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str], *, prog: str, description: str = ""
) -> tuple[Any, ...]:
    """Parse ``argv`` (optionally with a JSON/YAML config file) into instances of ``dataclass_types``.

    Raises ConfigError, with one sentence, for unknown options, bad values and bad files.
    """
    parser = _Parser(dataclass_types, prog=prog, description=description, epilog=_EPILOG)
    config_file, argv = _split_config_file(list(argv))
    if config_file is not None:
        known = {f.name for dtype in dataclass_types for f in fields(dtype) if f.init}
        argv = _config_as_flags(config_file, known) + argv
    *parsed, remaining = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)} (see --help for the options)")
    return tuple(parsed)


def _distill(argv: Sequence[str]) -> None:
    from mvmr_hf.train import train

    model, teacher, data, loss, training = parse_arguments(
        [ModelArguments, TeacherArguments, DistillDataArguments, LossArguments, DistillTrainingArguments],
        argv,
        prog="mvmr-distill",
        description=distill_main.__doc__,
    )
    train(model, data, loss, training, teacher=teacher)


def _pretrain(argv: Sequence[str]) -> None:
    from mvmr_hf.train import train

    model, data, loss, training = parse_arguments(
        [PretrainModelArguments, DataArguments, LossArguments, TrainingArguments],
        argv,
        prog="mvmr-pretrain",
        description=pretrain_main.__doc__,
    )
    train(model, data, loss, training)


def _run(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None) -> int:
    """:func:`run_cli`, plus: a run that fails after it started (TrainingError) exits with status 1."""
    from mvmr_hf.train import TrainingError

    try:
        return run_cli(main, argv)
    except TrainingError as error:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


def distill_main(argv: Sequence[str] | None = None) -> int:
    """mvmr-distill: label-free distillation of a transformers teacher into a timm student (MV-MR)."""
    return _run(_distill, argv)


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """mvmr-pretrain: MV-MR self-supervised pretraining of a timm student with hand-crafted descriptors."""
    return _run(_pretrain, argv)

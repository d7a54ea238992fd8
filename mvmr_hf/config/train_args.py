"""The arguments of the training commands (`mvmr-distill`, `mvmr-pretrain`) and of :func:`mvmr_hf.train`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

from mvmr_hf.config.options import (
    DEFAULT_FEATURE_MATCHING_WEIGHT,
    DEFAULT_TEACHER_VIEW,
    PAPER_REPRESENTATIONS,
    RESERVED_NAMES,
    TEACHER_NAME,
    RunArguments,
    TeacherSpec,
    _check_ints,
    _comma_list,
    _deduplicated,
    _flag,
    _list_opt,
    _opt,
    _per_teacher,
    parse_names,
    parse_weights,
    preset,
)
from mvmr_hf.data.augment import AUGMENTATIONS, parse_augmentations, parse_crop_scale
from mvmr_hf.errors import ConfigError
from mvmr_hf.loss.dcor import check_estimator
from mvmr_hf.utils import check_number


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
    handcrafted: str = _list_opt(
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
        # --handcrafted parsed once, here: a bad list is told before anything runs.
        self.handcrafted_names: tuple[str, ...] = tuple(parse_names(self.handcrafted))


@preset(
    {"projector": "none"},
    {
        "projector": "Distillation's default, none, puts the teachers' dCor terms on the backbone's "
        "features, which distilled better on Fashion-MNIST and digits (README, Quality)."
    },
)
class DistillModelArguments(ModelArguments):
    """Distillation's student: no projector by default, so that the teachers' dCor terms (eq. 9) compare
    the features that are probed and released, as feature matching does (README, 'Quality')."""


@preset(
    {"handcrafted": ",".join(PAPER_REPRESENTATIONS)},
    {"handcrafted": "Pretraining's default: all five (paper, section 7); empty leaves the L1 and L2 terms."},
)
class PretrainModelArguments(ModelArguments):
    """Self-supervised pretraining: the paper's five hand-crafted representations by default."""


@dataclass
class TeacherArguments:
    """The frozen teacher of distillation (paper, section 5.2)."""

    _argument_group_name = "teacher"

    teacher: str = _list_opt(
        "openai/clip-vit-base-patch16",
        "Hub id or local folder of a transformers vision model (paper: CLIP ViT-B/16); several teachers as a "
        "comma-separated list, each one more dCor term of eq. 9 (no adaptor: dCor needs no common width).",
    )
    teacher_output: str = _list_opt(
        "auto",
        "Teacher output to match: auto (the image embedding of image-text models, else the pooled output, "
        "else the CLS token, else the token mean), embedding, pooler, cls, mean or tokens; one for every "
        "teacher, or a comma-separated list with one per teacher.",
    )
    teacher_names: str = _list_opt(
        "",
        "Names of the teachers in --representation-weights, metrics.jsonl and the trackers, comma-separated, "
        "one per teacher; default: 'teacher' for one teacher, else each id's last part (a repeated one "
        "gets -2, -3, ...).",
    )
    teacher_dtype: Literal["float32", "bfloat16"] = _opt(
        "float32",
        "Hold the teachers' weights in this dtype: bfloat16 halves their memory (its agreement with float32: "
        "README, 'Several teachers').",
    )
    cache_teacher: bool = _opt(
        False,
        "Store the teachers' outputs in OUTPUT_DIR/teacher_cache during the first epoch and read them "
        "afterwards; exact, since with --teacher-view non-augmented the teachers only see that fixed view.",
    )
    trust_remote_code: bool = _opt(
        False, "Let a Hub teacher run its own code; only for repositories you trust."
    )
    feature_matching_weight: float = _opt(
        DEFAULT_FEATURE_MATCHING_WEIGHT,
        "Weight of a feature-matching term (not in the paper): 1 − cosine between a linear head on the "
        "student's pooled features of the view the teachers see (--teacher-view) and each teacher's output, "
        "the heads trained with the student and not released; 0: no feature matching.",
    )
    teacher_view: Literal["non-augmented", "augmented"] = _opt(
        DEFAULT_TEACHER_VIEW,
        "The view the teachers see. non-augmented: the paper's eq. 10, the dCor term pairs the student's "
        "embedding of the augmented view with the teachers' outputs of the non-augmented one (which "
        "--cache-teacher holds). augmented: the teachers run on the augmented view every step and each "
        "teacher term compares student and teacher on that same random view, as classic feature "
        "distillation does; with the invariance, variance and view weights at 0 the student then runs once "
        "a step instead of twice.",
    )

    def __post_init__(self) -> None:
        # Parsed once, here: every mistake in the teacher options is told before anything is loaded.
        self._specs: tuple[TeacherSpec, ...] = self._parse_teachers()
        specs = self._specs
        check_number("--feature-matching-weight", self.feature_matching_weight, allow_zero=True)
        if self.cache_teacher and self.teacher_view == "augmented":
            raise ConfigError(
                "--cache-teacher stores the teachers' outputs of the non-augmented view, but with "
                "--teacher-view augmented (the default) they only see the augmented one, new every step: "
                "add --teacher-view non-augmented, or drop --cache-teacher"
            )
        tokens = [spec.name for spec in specs if spec.output == "tokens"]
        if self.feature_matching_weight > 0 and tokens:
            raise ConfigError(
                f"--feature-matching-weight needs a pooled teacher output but {', '.join(tokens)} gives "
                "tokens: choose --teacher-output embedding, pooler, cls or mean, "
                "or --feature-matching-weight 0"
            )

    def teachers(self) -> list[TeacherSpec]:
        """The teachers of ``--teacher``, each with its name and output kind."""
        return list(self._specs)

    def _parse_teachers(self) -> tuple[TeacherSpec, ...]:
        """The teachers of ``--teacher``, ``--teacher-output`` and ``--teacher-names``.

        Raises ConfigError for an empty list, a per-teacher option whose count does not match the
        teachers', two teachers under one name, a name that a term already uses, or the same
        teacher and output twice (one term twice: a weight says that).
        """
        models = _comma_list(self.teacher)
        if not models:
            raise ConfigError("--teacher is empty: give a Hub id or a local folder (several: a,b)")
        outputs = _per_teacher("--teacher-output", _comma_list(self.teacher_output), len(models))
        if self.teacher_names.strip():
            names = _comma_list(self.teacher_names)
            if len(names) != len(models):
                raise ConfigError(
                    f"--teacher-names lists {len(names)} names for {len(models)} teachers: name each teacher"
                )
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ConfigError(f"--teacher-names gives two teachers the name {repeated[0]}: use each once")
        elif len(models) == 1:
            names = ["teacher"]
        else:
            names = _deduplicated([Path(model.rstrip("/")).name or model for model in models])
        for name in names:
            if not TEACHER_NAME.fullmatch(name) or name in RESERVED_NAMES:
                raise ConfigError(
                    f"teacher name {name!r} cannot name a term (letters, digits, '.', '_', '-'; not one of "
                    f"{', '.join(sorted(RESERVED_NAMES))}): choose names with --teacher-names"
                )
        specs = [TeacherSpec(*spec) for spec in zip(names, models, outputs, strict=True)]
        for index, spec in enumerate(specs):
            if any((spec.model, spec.output) == (other.model, other.output) for other in specs[:index]):
                raise ConfigError(
                    f"--teacher lists {spec.model} twice with the output {spec.output}: the same term twice; "
                    f"give it a weight instead (--representation-weights {spec.name}=2)"
                )
        return tuple(specs)


def teacher_specs(training_args: Mapping[str, Any]) -> list[TeacherSpec]:
    """The teachers a run's saved arguments (``training_args.json``) name; none for pretraining."""
    if not training_args.get("teacher"):
        return []
    options = ("teacher", "teacher_output", "teacher_names")
    return TeacherArguments(**{k: training_args[k] for k in options if k in training_args}).teachers()


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
    num_workers: int | None = _opt(
        None,
        "Data-loading worker processes per training process (default: this machine's CPU cores shared among "
        "its processes, at least 1: mvmr_hf.data.default_num_workers).",
    )
    device_views: bool | None = _opt(
        None,
        "Make the augmented view on the accelerator, batched, with the same per-image random parameters: "
        "workers only decode and resize. When omitted, on for CUDA and off elsewhere; --device-views false "
        "turns it off.",
        nargs="?",
        const=True,
    )
    decode_on_device: bool = _opt(
        False,
        "Decode the JPEGs on the CUDA GPU (nvJPEG, batched) instead of in the workers, which then only read "
        "each JPEG's header: for when the workers cannot decode as fast as the GPU trains. Needs CUDA and "
        "device views; other formats, CMYK and EXIF-rotated JPEGs are still decoded by the workers. The "
        "pixels may differ from PIL's by a few gray levels (tests/data/test_data_pipeline.py gives the "
        "bound).",
    )
    view_source_size: int | None = _opt(
        None,
        "With device views, the side of the square image the workers send (default image_size / 0.875: "
        "256 px for 224); larger brings the views closer to crops of the full-resolution image.",
    )
    augmentations: str = _list_opt(
        ",".join(AUGMENTATIONS),
        "Steps of the augmented view, comma-separated among crop, flip, color, grayscale, blur, run in that "
        "order with the paper's parameters (section 7: all five); a subset is the paper's Table 7 ablation, "
        "with the random parameters of the full augmentation for the steps kept; without crop the augmented "
        "view keeps the non-augmented view's framing; empty: no augmentation. The augmented-pixels "
        "representation keeps all five.",
    )
    crop_scale: str = _opt(  # one MIN,MAX pair, not a list: given twice, the last one counts
        "0.08,1",
        "Area range of the augmented view's random resized crop as a fraction of the image, MIN,MAX (paper, "
        "section 7: 0.08,1); a larger MIN keeps more of each image (README, 'Quality').",
    )

    def __post_init__(self) -> None:
        # The steps in the order they run, so that "flip,crop" and "crop,flip" are one setting for --resume.
        self.augmentations = ",".join(parse_augmentations(self.augmentations))
        self.crop_scale = ",".join(f"{bound:g}" for bound in parse_crop_scale(self.crop_scale))
        _check_ints(self, ("image_size",), 1)
        _check_ints(self, ("shuffle_buffer",), 0)
        if self.num_workers is not None:
            _check_ints(self, ("num_workers",), 0)
        if self.view_source_size is not None:
            _check_ints(self, ("view_source_size",), self.image_size)


DEFAULT_DISTILL_DATASET = "tanganke/stl10"
"""The data set ``mvmr-distill`` trains on when none is given: STL-10 (ImageNet-derived photographs,
96 px), on which the paper reports its CLIP ViT-B/16 -> ResNet-50 distillation (95.6 % linear)."""


@preset(
    {"dataset": DEFAULT_DISTILL_DATASET, "augmentations": "crop,flip", "crop_scale": "0.8,1"},
    {
        "dataset": "Distillation's default: STL-10's labelled training split (the paper's distillation "
        "benchmark).",
        "augmentations": "Distillation's default, crop and flip, is the milder view that distilled best "
        "(README, 'Quality').",
        "crop_scale": "Distillation's default 0.8,1 keeps most of each image, which distilled best with "
        "both teachers (README, 'Quality').",
    },
)
class DistillDataArguments(DataArguments):
    """Distillation's data: the paper's STL-10 by default."""


@dataclass
class LossArguments:
    """Weights and estimator of the MV-MR objective (paper, eq. 4-10)."""

    _argument_group_name = "objective"

    invariance_weight: float = _opt(1.0, "λ of eq. 7 (paper: 1).")
    variance_weight: float = _opt(1.0, "μ of eq. 7 (paper: 1).")
    view_weight: float = _opt(1.0, "α of eq. 8 (paper: 1).")
    representation_weights: str = _list_opt(
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
            check_number(_flag(name), getattr(self, name), allow_zero=True)
        # --representation-weights as {name: β}, parsed once, here: a bad entry is told before anything runs.
        self.weights: dict[str, float] = parse_weights(self.representation_weights)
        for name, weight in self.weights.items():
            if weight < 0:
                raise ConfigError(f"--representation-weights gives {name} the weight {weight}: use 0 or more")
        check_estimator(
            unbiased=self.dcor_estimator == "unbiased",
            squared=self.dcor_squared,
            fix="drop --dcor-squared false (--dcor-estimator unbiased runs only squared)",
        )


@preset(
    {"invariance_weight": 0.0, "variance_weight": 0.0, "view_weight": 0.0},
    dict.fromkeys(
        ("invariance_weight", "variance_weight", "view_weight"),
        "Distillation's default: 0 (README, Quality).",
    ),
)
class DistillLossArguments(LossArguments):
    """Distillation's objective: the teacher's dCor term of eq. 9 without L1 and L2 by default, which
    distilled better with feature matching on Fashion-MNIST and digits (README, 'Quality')."""


@dataclass
class TrainingArguments(RunArguments):
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
    seed: int = _opt(42, "Seed of the initial weights, the data order and the augmentations.")
    log_with: str | None = _list_opt(
        None, "Comma-separated Accelerate trackers (tensorboard, wandb, ...) or 'all'."
    )
    log_every: int = _opt(10, "Log loss, terms, learning rate and throughput every N optimizer steps.")
    push_to_hub: str | None = _opt(None, "Hub repository id (user/name) to push the student release to.")

    def __post_init__(self) -> None:
        super().__post_init__()
        # --log-with parsed once, here: a tracker named twice is told before anything runs.
        self.trackers: list[str] | str | None = (
            self.log_with or None
            if not self.log_with or self.log_with == "all"
            else parse_names(self.log_with, "--log-with")
        )  # Accelerate's log_with: a list of tracker names, "all" or None
        _check_ints(self, ("batch_size", "grad_accum", "epochs"), 1)
        _check_ints(self, ("log_every",) if self.max_steps is None else ("log_every", "max_steps"), 1)
        check_number("--learning-rate", self.learning_rate)
        check_number("--weight-decay", self.weight_decay, allow_zero=True)
        check_number("--warmup", self.warmup, allow_zero=True)
        if self.warmup >= 1 and not float(self.warmup).is_integer():
            raise ConfigError(f"--warmup {self.warmup} must be a fraction below 1 or a whole number of steps")


@preset(
    {"output_dir": "runs/distill", "batch_size": 512, "epochs": 200, "warmup": 0.05},
    {"warmup": "Distillation's default: 0.05, the paper's 10 of 200 epochs."},
)
class DistillTrainingArguments(TrainingArguments):
    """Distillation's schedule: the paper's (section 6.2 and its released code) by default."""

"""What the argument dataclasses share: the parsers and checks of list-valued options (teachers,
weights, signals), the help texts and defaults several commands use, and the field helpers."""

from __future__ import annotations

import argparse
import inspect
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import check_int

PAPER_REPRESENTATIONS = ("pixels", "augmented-pixels", "scatnet", "hog", "lsd")
"""The hand-crafted representations of the paper's self-supervised pretraining (section 7)."""


def parse_names(text: str, flag: str = "--handcrafted") -> list[str]:
    """``"hog, lsd"`` -> ``["hog", "lsd"]``; empty entries dropped, duplicates refused naming ``flag``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{flag} lists {', '.join(repeated)} twice: name each one once")
    return names


def parse_weights(text: str) -> dict[str, float]:
    """``"teacher=2,hog=0.5"`` -> ``{"teacher": 2.0, "hog": 0.5}`` (the β_k of eq. 9).

    A name given twice is refused rather than the later weight silently replacing the earlier one.
    """
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name in weights:
            raise ConfigError(f"--representation-weights gives {name} two weights: give each name one")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(
                f"--representation-weights entry {item!r} is not name=number: write e.g. teacher=1,hog=0.5"
            )
    return weights


def parse_signals(text: str) -> list[signal.Signals]:
    """``"SIGTERM,SIGUSR1"`` (``--stop-signals``) as signals; ConfigError naming an unknown one."""
    try:
        return [signal.Signals[name.upper()] for name in parse_names(text, "--stop-signals")]
    except KeyError as error:
        raise ConfigError(
            f"--stop-signals names {error.args[0]}, which is not a signal: use names like SIGTERM,SIGUSR1"
        ) from None


def check_label_fraction(fraction: float) -> float:
    """``fraction`` when it is a share of the labels in (0, 1]; ConfigError naming --label-fraction."""
    if isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(
            f"--label-fraction {fraction} is not a share of the labels in (0, 1]: write e.g. 0.01 for 1 % "
            "(paper Table 1)"
        )
    return fraction


STOP_SIGNALS_HELP = (
    "Signals on which every process finishes its optimizer step, the run saves a checkpoint and exits "
    "with status 75 (preempted, resumable with --resume): SIGTERM is what SLURM and Kubernetes send "
    "before a kill, SIGUSR1 what SLURM's --signal=USR1@SECONDS sends before a time limit; empty: none."
)

MIXED_PRECISION_HELP = (
    "Mixed precision; when omitted, what `accelerate launch` or `accelerate config` set, else bf16 on a CUDA "
    "GPU that supports it (the paper's released code trained in 16-bit precision; it is also the faster "
    "setting: benchmarks/results/loop-cuda.json), else no."
)

DEFAULT_FEATURE_MATCHING_WEIGHT = 4.0
"""``--feature-matching-weight`` when omitted: on, since on Fashion-MNIST with two ImageNet teachers
the paper's dCor terms alone lose to classic feature distillation; 4 rather than 1 because 1 − cos
ranges to 2 and 1 − dCor to 1, and at 4 the student met that baseline where 1 fell short of it
(README, "Quality")."""

DEFAULT_TEACHER_VIEW = "augmented"
"""``--teacher-view`` when omitted: every teacher term compares student and teacher on one random view,
as classic feature distillation does, and the student runs once a step when λ = μ = α = 0 (README,
"Quality")."""

RESUME_HELP = (
    "Continue a run: alone (or 'latest') from the newest complete checkpoint in the output folder, starting "
    "afresh when there is none; or from the given checkpoint folder."
)


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a run: its name (in weights, metrics and trackers), model id or folder, output kind."""

    name: str
    model: str
    output: str


TEACHER_NAME = re.compile(r"[A-Za-z0-9._-]+")

RESERVED_NAMES = frozenset({"views", *PAPER_REPRESENTATIONS})
"""Term names a teacher cannot take: the L2 term between the views and the hand-crafted descriptors."""


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _per_teacher(flag: str, values: list[str], teachers: int) -> list[str]:
    """One value for every teacher, or exactly one per teacher."""
    if len(values) == 1:
        return values * teachers
    if len(values) != teachers:
        raise ConfigError(
            f"{flag} lists {len(values)} values for {teachers} teachers: give one for all or one per teacher"
        )
    return values


def _deduplicated(names: list[str]) -> list[str]:
    """``[a, b, a]`` -> ``[a, b, a-2]``."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _flag(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return f"--{name.replace('_', '-')}"


def _check_ints(arguments: object, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        check_int(_flag(name), getattr(arguments, name), minimum)


def _opt(default: Any, text: str, **argparse_options: Any) -> Any:
    """A dataclass field with its ``--help`` text (and extra argparse options)."""
    return field(default=default, metadata={"help": text, **argparse_options})


class _GivenList(str):
    """A comma list that this command line gave: a later occurrence of its option extends it."""


class CommaListAction(argparse.Action):
    """The argparse action of every comma-list option: given several times, it means all the lists.

    ``--teacher A --teacher B`` is ``--teacher A,B``; argparse's plain ``store`` would keep B and
    silently drop A. The first occurrence replaces the default (or a config file's value), so that
    the command line still overrides both. :func:`mvmr_hf.cli.parse_arguments` hands the value on
    as a plain ``str``.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        joined = f"{current},{values}" if isinstance(current, _GivenList) else values
        setattr(namespace, self.dest, _GivenList(joined))


_Arguments = TypeVar("_Arguments")


def preset(
    defaults: Mapping[str, Any], notes: Mapping[str, str] | None = None
) -> Callable[[type[_Arguments]], type[_Arguments]]:
    """Make the decorated subclass of an argument dataclass a preset: the same fields, other defaults.

    Each field named in ``defaults`` keeps its type, its place among the flags and its help text, which
    ``notes`` may extend with why the command's default differs (or, for a field whose default stays, with
    what the option means for this command); ``--help`` shows the new default. The
    subclass is still a dataclass of its base, so :func:`mvmr_hf.train` and resume treat it as the base.
    """

    def make(cls: type[_Arguments]) -> type[_Arguments]:
        inherited = {item.name: item for item in fields(cls)}  # type: ignore[arg-type]
        annotations = dict(inspect.get_annotations(cls))
        for name in {**defaults, **(notes or {})}:
            base = inherited[name]
            default = defaults.get(name, base.default)
            note = (notes or {}).get(name)
            text = f"{base.metadata['help']} {note}" if note else base.metadata["help"]
            setattr(
                cls,
                name,
                field(default=default, metadata={**base.metadata, "help": text}, kw_only=base.kw_only),
            )
            annotations[name] = base.type
        cls.__annotations__ = annotations
        return dataclass(cls)

    return make


def _list_opt(default: str | None, text: str) -> Any:
    """A comma-list option: repeated on the command line, its lists join (:class:`CommaListAction`)."""
    return _opt(default, text, action=CommaListAction)


@dataclass(kw_only=True)
class RunArguments:
    """The options of every resumable run, training and fine-tuning alike: its precision, checkpoints,
    restarts and stop signals, declared and checked once so that both commands spell and check them
    alike (keyword-only, so that a subclass may still add a required field such as ``output_dir``).

    ``mvmr_hf.cli`` shows them after each command's own options.
    """

    checkpoint_every: int = _opt(1000, "Save a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = _opt(2, "Keep the N newest checkpoints.")
    resume: str | None = _opt(None, RESUME_HELP, nargs="?", const="latest")
    overwrite: bool = _opt(
        False, "Delete a previous run's checkpoints, metrics and release in the output folder."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _opt(None, MIXED_PRECISION_HELP)
    stop_signals: str = _list_opt("SIGTERM,SIGUSR1", STOP_SIGNALS_HELP)

    def __post_init__(self) -> None:
        # --stop-signals parsed once, here: an unknown signal name is told before anything runs.
        self._signals: tuple[signal.Signals, ...] = tuple(parse_signals(self.stop_signals))
        _check_ints(self, ("checkpoint_every", "keep_checkpoints"), 1)
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one of them")

    def signals(self) -> list[signal.Signals]:
        """``--stop-signals`` as signals."""
        return list(self._signals)

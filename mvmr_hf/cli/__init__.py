"""Command-line entry points: the top layer, which only parses ``argv`` and calls the library.

`train.py` holds `mvmr-distill` / `mvmr-pretrain`; `release.py` holds `mvmr-export`,
`mvmr-evaluate`, `mvmr-align` and `mvmr-push`. Their arguments are the dataclasses of
:mod:`mvmr_hf.config`, parsed by :func:`parse_arguments`. Every entry point goes through
:func:`run_cli`, so that bad input gets one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from mvmr_hf.errors import PREEMPTED_EXIT, ConfigError, PreemptedError, TrainingError

__all__ = ["USAGE_ERROR", "parse_arguments", "run_cli"]

USAGE_ERROR = 2


def run_cli(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn user errors into one line on stderr and exit status 2.

    A job that started but could not finish (TrainingError: a full disk, a non-finite loss) gets one
    line and status 1; a preempted run (a checkpoint saved on a stop signal) status
    :data:`~mvmr_hf.errors.PREEMPTED_EXIT`.

    ``--debug`` anywhere in ``argv`` is removed before ``main`` sees it and makes errors
    raise with their full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except ConfigError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except PreemptedError as error:
        print(f"preempted: {error}", file=sys.stderr)
        return PREEMPTED_EXIT
    except TrainingError as error:  # a job that started but could not finish (a full disk, a NaN loss)
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


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

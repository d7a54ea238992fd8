"""Command-line entry points: the top layer, which only parses ``argv`` and calls the library.

`train.py` holds `mvmr-distill` / `mvmr-pretrain`; `release.py` holds `mvmr-export`,
`mvmr-evaluate`, `mvmr-align` and `mvmr-push`. Their arguments are the dataclasses of
:mod:`mvmr_hf.config`, parsed by :func:`parse_arguments`. Every entry point goes through
:func:`run_cli`, so that bad input gets one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from argparse import OPTIONAL, SUPPRESS, Action, ArgumentDefaultsHelpFormatter, Namespace
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from mvmr_hf.config import CommaListAction
from mvmr_hf.config.options import RunArguments
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


class _Formatter(ArgumentDefaultsHelpFormatter):
    """Shows a field taken by position as ``FOLDER``, not ``[FOLDER]``: it is required.

    argparse takes it as optional (nargs ``?``) only so that its ``--folder`` spelling may stand in for it;
    :meth:`_Parser.parse_known_args` requires one of the two.
    """

    def _format_args(self, action: Action, default_metavar: str) -> str:
        if not action.option_strings and action.nargs == OPTIONAL:
            return self._metavar_formatter(action, default_metavar)(1)[0]
        return super()._format_args(action, default_metavar)


class _Parser(HfArgumentParser):
    """HfArgumentParser as every command shows and checks its options.

    Errors are one-line ConfigErrors instead of usage dumps. Options are shown with dashes
    (``--output-dir``: the spelling of the README and of the error messages; transformers'
    ``--output_dir`` still works). The fields named in ``positionals`` are taken by position
    (``mvmr-push FOLDER ORG/NAME``); their ``--folder`` spelling still works, for config files
    and old command lines, but is not shown.
    """

    def __init__(
        self, dataclass_types: Sequence[type], *, prog: str, description: str, positionals: Sequence[str]
    ) -> None:
        super().__init__(dataclass_types, prog=prog, description=description, formatter_class=_Formatter)
        for action in self._actions:
            action.option_strings.sort(key=lambda option: "_" in option)  # stable: the dash spelling first
        self._show_run_options_last()
        for name in positionals:
            self._take_by_position(name)
        self.epilog = self._epilog()

    def _show_run_options_last(self) -> None:
        """Show the options every resumable run shares (:class:`~mvmr_hf.config.options.RunArguments`,
        a base class, so first among its fields) after the command's own, in usage and in their group."""
        shared = {item.name for item in fields(RunArguments)}
        for actions in (self._actions, *(group._group_actions for group in self._action_groups)):
            actions.sort(key=lambda action: action.dest in shared)  # stable: each part keeps its order

    def _take_by_position(self, name: str) -> None:
        """Add the positional argument ``name``; hide its ``--flag``, which stays a way to give it."""
        flag = next(action for action in self._actions if action.dest == name and action.option_strings)
        self.add_argument(
            name, metavar=flag.metavar or name.upper(), nargs=OPTIONAL, default=SUPPRESS, type=flag.type,
            help=flag.help,
        )  # fmt: skip
        flag.help, flag.required, flag.default = SUPPRESS, False, SUPPRESS

    def positional_actions(self) -> list[Action]:
        """The arguments taken by position, in their order."""
        return [action for action in self._actions if not action.option_strings]

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Namespace | None = None
    ) -> tuple[Namespace, list[str]]:
        """argparse's parse, then the positional arguments required and every text a plain ``str``."""
        namespace, remaining = super().parse_known_args(args, namespace)
        missing = [
            action.metavar for action in self.positional_actions() if not hasattr(namespace, action.dest)
        ]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        for key, value in vars(namespace).items():
            if isinstance(value, str):  # CommaListAction marks the lists it joined with a str subclass
                setattr(namespace, key, str(value))
        return namespace, remaining

    def _epilog(self) -> str:
        """The ``--help`` footer of the command, its examples made of the command's own options."""
        options = [
            action for action in self._actions if action.option_strings and action.help is not SUPPRESS
        ]
        example = next(action for action in options if action.nargs is None and not action.required)
        flag, metavar = example.option_strings[0], example.metavar or example.dest.upper()
        by_position = [action.dest for action in self.positional_actions()]
        keys = example.dest + (f"; also {', '.join(by_position)}, given by position" if by_position else "")
        text = (
            "Options can also come from a JSON or YAML file whose keys are the option names with "
            f"underscores ({keys}): pass it first (`{self.prog} run.yaml {flag} {metavar}`) or with "
            "--config; options on the command line override the file."
        )
        lists = [action.option_strings[0] for action in options if isinstance(action, CommaListAction)]
        if lists:
            text += (
                f" A comma-list option given several times means all of its lists (`{lists[0]} A "
                f"{lists[0]} B` is `{lists[0]} A,B`)."
            )
        return text + " --debug shows full tracebacks of errors."

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


def _read_config(path: Path, known: set[str]) -> dict[str, str]:
    """A JSON/YAML file's values as command-line text (lists and mappings comma-joined), None left out."""
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
    texts: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = ",".join(f"{name}={weight}" for name, weight in value.items())
        elif isinstance(value, list):
            value = ",".join(str(item) for item in value)
        if value is not None:
            texts[key] = str(value)
    return texts


_RESTARTS = ("resume", "overwrite")
"""The two ways to start in a folder that holds a run: each contradicts the other."""


def _restart_from_command_line(values: dict[str, str], argv: Sequence[str]) -> dict[str, str]:
    """``values`` of a config file without its resume / overwrite when the command line gives the other.

    A saved ``training_args.json`` records how its run started (the demo's ``--overwrite``); passing
    it with ``--resume`` continues that run, it does not ask for both. Both on the command line are
    still refused (by the arguments' own check).
    """
    given = {name for name in _RESTARTS for arg in argv if arg == f"--{name}" or arg.startswith(f"--{name}=")}
    return {key: value for key, value in values.items() if key not in _RESTARTS or not given - {key}}


def _config_as_flags(parser: _Parser, values: dict[str, str], lists: set[str]) -> list[str]:
    """Give ``parser`` a config file's ``values``: comma lists as defaults, the others as leading flags.

    Flags get the same parsing and checks as typed ones, and a later typed flag wins. A comma list
    given as a flag would instead be extended by the command line's (CommaListAction), so it becomes
    the option's default, which the command line's first occurrence replaces.
    """
    parser.set_defaults(**{key: value for key, value in values.items() if key in lists})
    return [part for key, value in values.items() if key not in lists for part in (f"--{key}", value)]


def parse_arguments(
    dataclass_types: Sequence[type],
    argv: Sequence[str],
    *,
    prog: str,
    description: str = "",
    positionals: Sequence[str] = (),
) -> tuple[Any, ...]:
    """Parse ``argv`` (optionally with a JSON/YAML config file) into instances of ``dataclass_types``.

    ``positionals`` names the fields taken by position, in order (``mvmr-push FOLDER ORG/NAME``).
    Raises ConfigError, with one sentence, for unknown options, bad values and bad files.

    Args:
        dataclass_types: the argument dataclasses (:mod:`mvmr_hf.config`); each field is a flag.
        argv: the command line without the program name. A config file is its first argument
            (``.json``, ``.yaml`` or ``.yml``) or ``--config PATH``; the command line's flags
            override the file's values.
        prog: the program name shown in usage and ``--help``.
        description: the ``--help`` text above the options.
        positionals: the fields taken by position, in order.

    Returns:
        One instance per type of ``dataclass_types``, in that order.
    """
    parser = _Parser(dataclass_types, prog=prog, description=description or "", positionals=positionals)
    config_file, argv = _split_config_file(list(argv))
    if config_file is not None:
        fields_ = [f for dtype in dataclass_types for f in fields(dtype) if f.init]
        values = _restart_from_command_line(_read_config(config_file, {f.name for f in fields_}), argv)
        lists = {f.name for f in fields_ if f.metadata.get("action") is CommaListAction}
        argv = _config_as_flags(parser, values, lists) + argv
    *parsed, remaining = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)} (see --help for the options)")
    return tuple(parsed)

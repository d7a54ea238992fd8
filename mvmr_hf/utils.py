"""Small decisions that several modules make the same way: local path or Hub id, atomic writes, checks.

Each lives here once, so that a data set, a teacher and an evaluated model are told apart from
Hub ids by the same rule, every file a killed run may leave half-written is written the same
way, and every option check says the same kind of sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from mvmr_hf.errors import ConfigError, TrainingError

__all__ = [
    "PARTIAL_SUFFIX",
    "atomic_folder",
    "atomic_write",
    "atomic_write_json",
    "check_int",
    "check_number",
    "deprecated_alias",
    "is_hub_id",
    "is_local_path",
    "partial_path",
    "replace_folder",
]

PARTIAL_SUFFIX = ".tmp"
"""Suffix of a file or folder being written; only a rename removes it, so a name without it is complete."""


def is_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a local path (a Hub id is ``name`` or ``owner/name``).

    A Hub id never starts with ``.``, ``~`` or ``/`` and holds at most one ``/``, so anything else
    that does not exist is a mistyped path, to be reported as such rather than looked up online.
    """
    return (
        Path(name_or_path).expanduser().exists()
        or Path(name_or_path).is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    )


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a valid Hub repository id (``name`` or ``owner/name``), by the Hub's own rule."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def sha256_of_files(paths: Iterable[Path]) -> str:
    """The hex SHA-256 of the files' contents, read in turn as one stream."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete: the same name with :data:`PARTIAL_SUFFIX`."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(partial)`` and rename ``partial`` to ``path``: a reader sees the whole file or none.

    A run killed while writing leaves only the partial file, which never passes for a complete one.
    """
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing behind
        raise
    return path


def atomic_write_json(path: Path, content: object) -> Path:
    """Write ``content`` as indented JSON at ``path`` with :func:`atomic_write`: all of it or nothing."""
    return atomic_write(path, lambda partial: partial.write_text(json.dumps(content, indent=2)))


@contextmanager
def writing(what: str, where: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write in the block (a full disk, a lost mount: any OSError) into one TrainingError line.

    The line names what could not be written, where, why and the space left there; the atomic
    writes of this module leave the previous complete state as it was.
    """
    try:
        yield
    except OSError as error:
        place = Path(where).absolute()
        existing = next(p for p in (place, *place.parents) if p.exists())
        free = shutil.disk_usage(existing).free / 2**30
        raise TrainingError(
            f"could not write {what} in {place} ({error.strerror or error}; {free:.1f} GiB free there): the "
            "previous complete state is intact; free some space or use another folder, then run again "
            "(a training run: with --resume)"
        ) from error


def _new_sibling(target: Path, tag: str) -> Path:
    """A new empty hidden folder next to ``target`` (created with the umask's permissions, unlike mkdtemp)."""
    path = target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def replace_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, replacing an existing ``target`` (both in the same parent).

    The old ``target`` is first moved aside, so ``target`` is always either the old or the new
    folder, never a half-deleted one.
    """
    if not target.exists():
        os.replace(source, target)
        return
    old = _new_sibling(target, "old")
    os.replace(target, old / target.name)
    os.replace(source, target)
    shutil.rmtree(old)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target`` that replaces ``target`` on success.

    On an exception the temporary folder is deleted and ``target`` is left as it was.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = _new_sibling(target, "tmp")
    try:
        yield work
        replace_folder(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` when it is an integer (not a bool) of at least ``minimum``; ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_number(name: str, value: float, *, allow_zero: bool = False) -> float:
    """``value`` when it is positive (or zero, with ``allow_zero``); ConfigError naming ``name``."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} is {value} but must be {'0 or more' if allow_zero else 'positive'}.")
    return value


def deprecated_alias(module: str, aliases: Mapping[str, tuple[ModuleType, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves old names from their new home, with a DeprecationWarning.

    ``aliases`` maps an old name of ``module`` to ``(new_module, new_name)``.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module-level hook of PEP 562)
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, new_name = aliases[name]
        warnings.warn(
            f"{module}.{name} is deprecated: use {target.__name__}.{new_name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(target, new_name)

    return __getattr__

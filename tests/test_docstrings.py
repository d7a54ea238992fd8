"""Every public function, method and constructor with 5 or more parameters documents each in ``Args:``.

Public means what ``tests/test_public_api.py`` and the package mean: a name without a leading
underscore listed in a module's ``__all__`` (a sub-package's ``__init__`` re-exports through its
``__all__``, ``mvmr_hf`` through its ``__all__``), and the public methods and constructor of such a
class. A dataclass documents its fields under ``Attributes:`` (or ``Args:``); the argument
dataclasses of :mod:`mvmr_hf.config`, whose every field carries ``help`` metadata (the ``--help``
text), are documented by it and skipped. Only imports: no model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import mvmr_hf

MIN_PARAMETERS = 5
_ENTRY = re.compile(r"^\**(\w+)\s*(\([^)]*\))?\s*:")


def _public_objects():
    """The public functions and classes defined in mvmr_hf, by qualified name."""
    modules = [mvmr_hf]
    modules += [importlib.import_module(m.name) for m in pkgutil.walk_packages(mvmr_hf.__path__, "mvmr_hf.")]
    found = {}
    for module in modules:
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            if getattr(value, "__module__", "").startswith("mvmr_hf"):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def _parameters(function):
    """The parameter names of ``function``, less ``self`` and ``cls``."""
    names = inspect.signature(function).parameters
    return [name for name in names if name not in ("self", "cls")]


def _documented(doc, sections=("Args",)):
    """The names the docstring's ``sections`` list, Google style: ``name (type): text`` or ``name: text``."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names = set()
    for index, line in enumerate(lines):
        if line.strip() not in {f"{s}:" for s in sections}:
            continue
        header_indent = len(line) - len(line.lstrip())
        entry_indent = None
        for entry in lines[index + 1 :]:
            if not entry.strip():
                continue
            indent = len(entry) - len(entry.lstrip())
            if indent <= header_indent:
                break
            entry_indent = indent if entry_indent is None else entry_indent
            match = _ENTRY.match(entry.strip())
            if indent == entry_indent and match:
                names.add(match.group(1))
    return names


def _is_help_dataclass(cls):
    """A dataclass whose every field carries ``help`` metadata (its ``--help`` text documents it)."""
    fields = dataclasses.fields(cls)
    return bool(fields) and all("help" in f.metadata for f in fields)


def _callables():
    """(label, parameter names, docstring, section names) for every public callable with parameters."""
    for label, value in sorted(_public_objects().items()):
        if inspect.isfunction(value):
            yield label, _parameters(value), value.__doc__, ("Args",)
            continue
        if dataclasses.is_dataclass(value):
            if not _is_help_dataclass(value):
                fields = [f.name for f in dataclasses.fields(value) if f.init]
                yield label, fields, value.__doc__, ("Args", "Attributes")
        elif "__init__" in vars(value):
            doc = (value.__doc__ or "") + "\n\n" + (value.__init__.__doc__ or "")
            yield f"{label}.__init__", _parameters(value.__init__), doc, ("Args",)
        for name, member in vars(value).items():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if not name.startswith("_") and inspect.isfunction(member):
                yield f"{label}.{name}", _parameters(member), member.__doc__, ("Args",)


def _undocumented():
    missing = []
    for label, parameters, doc, sections in _callables():
        if len(parameters) >= MIN_PARAMETERS:
            absent = [p for p in parameters if p not in _documented(doc, sections)]
            if absent:
                missing.append(f"{label}: {', '.join(absent)}")
    return missing


def test_public_callables_with_five_or_more_parameters_document_each_in_args():
    missing = _undocumented()
    assert not missing, "no Args: entry for\n" + "\n".join(missing)


def test_the_check_finds_the_public_callables_and_reads_args_sections():
    labels = {label for label, *_ in _callables()}
    assert "mvmr_hf.evaluation.protocols.evaluate" in labels
    assert "mvmr_hf.evaluation.finetuning.Finetuning.__init__" in labels
    assert "mvmr_hf.loss.objective.MVMRLoss.__init__" in labels
    doc = """Summary.

    Args:
        images (torch.Tensor): float ``(B, 3, H, W)``,
            in [0, 1].
        *rest: more.
        size: side.

    Returns:
        value: not an argument.
    """
    assert _documented(doc) == {"images", "rest", "size"}
    assert _documented("Summary without arguments.") == set()

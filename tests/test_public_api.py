"""Every name of the public API resolves, and importing the package stays light."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import mvmr_hf


def test_every_public_name_resolves():
    for name in mvmr_hf.__all__:
        assert getattr(mvmr_hf, name) is not None, name


def test_each_public_name_is_its_object_even_after_every_submodule_is_imported():
    """No submodule shares a public name: ``from mvmr_hf import train`` is the function, always."""
    for module in pkgutil.walk_packages(mvmr_hf.__path__, prefix="mvmr_hf."):
        importlib.import_module(module.name)
    for name in mvmr_hf.__all__:
        value = getattr(mvmr_hf, name)
        assert not isinstance(value, types.ModuleType), f"mvmr_hf.{name} is a module"
        target = mvmr_hf._LAZY.get(name)
        if target is not None:
            module_name, attribute = target if isinstance(target, tuple) else (target, name)
            assert value is getattr(importlib.import_module(module_name), attribute), name
        if inspect.isfunction(inspect.unwrap(value)) or name[0].islower():
            assert callable(value), name
    from mvmr_hf import evaluate, train

    assert inspect.isfunction(train)
    assert train.__name__ == "train"
    assert inspect.isfunction(evaluate)
    assert evaluate.__name__ == "evaluate"


def test_import_does_not_pull_in_transformers_or_datasets():
    code = "import sys, mvmr_hf; print(any(m in sys.modules for m in ('transformers', 'datasets', 'timm')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

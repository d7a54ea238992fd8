"""Every name of the public API resolves, and importing the package stays light."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

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


def _imports(path, module, package_root):
    """The mvmr_hf modules that ``module`` (at ``path``) imports, anywhere in its body, from its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")[: -node.level + (path.name == "__init__.py")]
                base = ".".join([*parts, *filter(None, [node.module])])
            found.add(base)
            for alias in node.names:  # `from mvmr_hf import config` imports the submodule mvmr_hf.config
                found.add(f"{base}.{alias.name}")
    modules = {
        ".".join(p.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in package_root.rglob("*.py")
    }
    return {name for name in found if name in modules and name != module}


LAYERS = (
    "mvmr_hf.errors",
    "mvmr_hf.utils",
    "mvmr_hf.distributed",
    "mvmr_hf.loss",
    "mvmr_hf.data",
    "mvmr_hf.models",
    "mvmr_hf.config",
    "mvmr_hf.storage",
    "mvmr_hf.release",
    "mvmr_hf.training",
    "mvmr_hf.evaluation",
    "mvmr_hf.cli",
)
"""The layers, lowest first (docs/architecture.md): a module imports from its own layer and those below."""


def _import_graph():
    """Every mvmr_hf module and the mvmr_hf modules it imports, function-level imports included."""
    root = Path(mvmr_hf.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = _imports(path, module, root)
    return graph


def _layer(module):
    """The index in LAYERS of ``module``'s top-level module or sub-package; None for ``mvmr_hf`` itself."""
    if module == "mvmr_hf":
        return None
    top = ".".join(module.split(".")[:2])
    assert top in LAYERS, f"{top} is in no layer: place it in LAYERS and docs/architecture.md"
    return LAYERS.index(top)


def test_the_package_import_graph_has_no_cycle():
    """Every import between mvmr_hf's modules, function-level ones too, points down a layering."""
    graph = _import_graph()
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError(" -> ".join([*on_path[on_path.index(module) :], module]))
        if module in done:
            return
        on_path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        on_path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    for module, imported in graph.items():  # the command line is the top layer: the library never imports it
        if not module.startswith("mvmr_hf.cli"):
            assert not any(name.startswith("mvmr_hf.cli") for name in imported), f"{module} imports the CLI"


def test_each_layer_imports_only_from_the_layers_below_it():
    """``mvmr_hf`` itself (the lazy public API over every layer) is the one module outside the order."""
    upward = [
        f"{module} imports {imported}"
        for module, imports in sorted(_import_graph().items())
        for imported in sorted(imports)
        if None not in (_layer(module), _layer(imported)) and _layer(imported) > _layer(module)
    ]
    assert not upward, "imports up the layers: " + "; ".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check reads function-level imports too: a data module importing training is caught."""
    source = tmp_path / "views.py"
    source.write_text("def f():\n    from mvmr_hf.training.loop import train\n")
    root = Path(mvmr_hf.__file__).parent
    imported = _imports(source, "mvmr_hf.data.views", root)
    assert imported == {"mvmr_hf.training.loop"}
    assert _layer("mvmr_hf.training.loop") > _layer("mvmr_hf.data.views")

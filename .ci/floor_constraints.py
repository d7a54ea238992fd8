"""Print pip constraints that pin each direct requirement of the project to its declared floor.

``make floors`` installs the project with them and runs the fast tests, so that every ``>=`` in
``pyproject.toml`` is a version that was tested. torch and torchvision are left to the machine:
their floors are the versions of the CUDA node that ``make gpu-check`` runs on (a CPU wheel of an
old torch is not on the package index this project's CI reaches).

    python .ci/floor_constraints.py test > constraints.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as pip vendors it
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MACHINE_PACKAGES = {"torch", "torchvision"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def direct_requirements(extras: list[str]) -> list[Requirement]:
    """The project's requirements with ``extras``; an extra naming others (``mvmr_hf[test]``) adds theirs."""
    project = _pyproject()["project"]
    requirements, pending = [Requirement(text) for text in project["dependencies"]], list(extras)
    while pending:
        for text in project["optional-dependencies"][pending.pop()]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                pending += sorted(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def build_requirements() -> list[Requirement]:
    """What building the project needs (``[build-system] requires``)."""
    return [Requirement(text) for text in _pyproject()["build-system"]["requires"]]


def floors(extras: list[str]) -> list[str]:
    """``name==floor`` for every direct requirement with a ``>=`` floor (the extras' included)."""
    pins = {}
    for requirement in direct_requirements(extras):
        name = canonicalize_name(requirement.name)
        low = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
        if low and name not in MACHINE_PACKAGES:
            pins[name] = low[0]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:])))

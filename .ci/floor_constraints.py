"""Print pip constraints that pin each direct requirement of the project to its declared floor.

``make floors`` installs the project with them and runs the fast tests, so that every ``>=`` in
``pyproject.toml`` is a version that was tested. torch and torchvision are left to the machine:
their floors are the versions of the CUDA node that ``make gpu-check`` runs on (a CPU wheel of an
old torch is not on the package index this project's CI reaches).

    python .ci/floor_constraints.py test > constraints.txt
    python .ci/floor_constraints.py --share-machine-packages .venv-floors

The second form lends the floors' environment the running interpreter's torch, torchvision and what
they need (CUDA libraries, triton: about 6 GB), linked rather than installed a second time: a CI
runner's disk held one copy and ran out on the second.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
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


def machine_closure(project_names: set[str]) -> list[importlib.metadata.Distribution]:
    """The installed torch, torchvision and everything they require, extras followed, except the
    project's own direct requirements (numpy, pillow), which the floors' environment pins itself."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = [(name, frozenset()) for name in sorted(MACHINE_PACKAGES)]
    while pending:
        name, extras = pending.pop()
        if name in seen or name in project_names:
            continue
        seen[name] = distribution = importlib.metadata.distribution(name)
        for text in distribution.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return list(seen.values())


def share_machine_packages(venv: Path) -> None:
    """Link the machine's packages into a layer beside this interpreter's environment and put the
    layer on ``venv``'s path with a ``.pth`` file. The layer lies outside ``venv``, so pip there sees
    the packages as installed but never uninstalls them ("outside environment")."""
    project_names = {canonicalize_name(r.name) for r in direct_requirements(["dev"]) + build_requirements()}
    project_names -= MACHINE_PACKAGES
    layer = Path(sys.prefix) / "machine-packages"
    shutil.rmtree(layer, ignore_errors=True)
    layer.mkdir()
    for distribution in machine_closure(project_names):
        tops = {file.parts[0] for file in distribution.files or []} - {"..", "__pycache__"}
        for top in tops:
            if not (layer / top).exists():
                (layer / top).symlink_to(Path(distribution.locate_file(top)).resolve())
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "machine-packages.pth").write_text(f"{layer}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="*", help="the extras whose floors to print (dev, test)")
    parser.add_argument(
        "--share-machine-packages",
        type=Path,
        metavar="VENV",
        help="lend VENV this interpreter's torch and torchvision instead of printing",
    )
    args = parser.parse_args()
    if args.share_machine_packages is not None:
        share_machine_packages(args.share_machine_packages)
    else:
        print("\n".join(floors(args.extras)))

"""Put in a folder exactly the wheels an offline machine lacks to install this project (``make gpu-wheels``).

Run on a machine that reaches the package index. The offline machine is described by its Python
version, its platform tag and the packages it already has (``pip list --format=freeze`` run there):
starting from the project's requirements (``[project] dependencies``, the chosen extras and the
build requirements), every requirement that an installed package already satisfies is left to it;
any other is downloaded with ``pip download --no-deps`` for that Python and platform, and the
requirements of the downloaded wheel are followed in turn. So the folder holds only what is
missing, and ``pip install --no-index --find-links FOLDER`` on the offline machine (inside an
environment that sees its packages) resolves without the index.

    python .ci/offline_wheels.py --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --have node-packages.txt --extras test --dest .whl
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from floor_constraints import build_requirements, direct_requirements  # this script's folder
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def installed(freeze: Path) -> dict[str, Version | None]:
    """``name==version`` lines of ``pip list --format=freeze`` as {canonical name: version}.

    A name alone stands for a package known to be there at an unrecorded version (``None``): it is
    taken to satisfy every requirement on it.
    """
    have: dict[str, Version | None] = {}
    for line in freeze.read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name:
            have[canonicalize_name(name)] = Version(version) if version else None
    return have


def markers(python_version: str) -> dict[str, str]:
    """The environment markers of a CPython ``python_version`` on x86-64 Linux."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` entries of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(metadata).decode())
    return [Requirement(text) for text in headers.get_all("Requires-Dist") or []]


def download(requirement: Requirement, dest: Path, python_version: str, platform: str) -> Path:
    """Download the newest wheel of ``requirement`` for the target into ``dest``; return its path."""
    bare = Requirement(str(requirement))
    bare.marker, bare.extras = None, set()
    with tempfile.TemporaryDirectory(dir=dest) as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, "--platform", platform, "--implementation", "cp",
             "--dest", scratch, str(bare)],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(scratch).glob("*.whl")
        return wheel.rename(dest / wheel.name)


def collect(
    have: dict[str, Version | None], extras: list[str], dest: Path, python_version: str, platform: str
) -> list[Path]:
    """Download what ``have`` lacks of the project's requirements, recursively; return the wheels.

    A package the machine has is left to it, but the extras asked of it (``pkg[extra]``) may need
    packages it lacks: their requirements are read from the wheel of the version it has,
    downloaded aside and not kept.
    """
    queue = [*direct_requirements(extras), *build_requirements()]
    environment = markers(python_version)
    fetched: dict[str, tuple[Version, Path]] = {}
    expanded: set[tuple[str, str]] = set()  # (package, extra) whose requirements are queued
    with tempfile.TemporaryDirectory() as aside:
        while queue:
            requirement = queue.pop(0)
            name = canonicalize_name(requirement.name)
            wanted_extras = sorted(requirement.extras)
            present = have.get(name, False)
            if present is None or (present and requirement.specifier.contains(present, prereleases=True)):
                if not wanted_extras:
                    continue
                wheel = download(Requirement(f"{name}=={present}" if present else name), Path(aside),
                                 python_version, platform)  # fmt: skip
            else:
                if name not in fetched:
                    wheel = download(requirement, dest, python_version, platform)
                    fetched[name] = (parse_wheel_filename(wheel.name)[1], wheel)
                    print(f"{wheel.name}  (for {requirement})", flush=True)
                    wanted_extras = ["", *wanted_extras]
                version, wheel = fetched[name]
                if not requirement.specifier.contains(version, prereleases=True):
                    raise SystemExit(f"error: {requirement} conflicts with {wheel.name}, already fetched for "
                                     "another requirement")  # fmt: skip
            for extra in wanted_extras:
                if (name, extra) in expanded:
                    continue
                expanded.add((name, extra))
                here = {**environment, "extra": extra}
                queue += [d for d in wheel_requirements(wheel) if not d.marker or d.marker.evaluate(here)]
    return [wheel for _, wheel in fetched.values()]


def main(argv: list[str]) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--python-version", required=True, help="the offline Python, e.g. 3.12")
    cli.add_argument("--platform", required=True, help="its platform tag, e.g. manylinux_2_28_x86_64")
    cli.add_argument("--have", type=Path, required=True, help="`pip list --format=freeze` of that machine")
    cli.add_argument("--extras", default="", help="comma-separated extras of the project to include")
    cli.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels (emptied first)")
    args = cli.parse_args(argv)
    if not args.have.is_file():
        print(f"error: {args.have} does not exist: run `pip list --format=freeze > FILE` on the offline "
              "machine and pass that FILE", file=sys.stderr)  # fmt: skip
        return 2
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    extras = [extra for extra in args.extras.split(",") if extra]
    wheels = collect(installed(args.have), extras, args.dest, args.python_version, args.platform)
    megabytes = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {megabytes:.1f} MiB, in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""requirements.lock is what a fresh machine installs: it must satisfy pyproject.toml, pin every
package exactly with hashes, and be what this suite runs on."""

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def locked() -> dict[str, Version]:
    """name -> version of every `name==version \\` entry; asserts each has a hash line after it."""
    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = {}
    for i, line in enumerate(lines):
        match = PIN.match(line)
        if match:
            assert lines[i + 1].strip().startswith("--hash=sha256:"), f"{line}: no hash"
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    assert not [line for line in lines if line and line[0].isalpha() and not PIN.match(line)]
    return pins


def declared() -> list[Requirement]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, build = pyproject["project"], pyproject["build-system"]["requires"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras, *build]]


def test_lock_satisfies_pyproject():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: run bash scripts/lock.sh"
        # A local version (torch's +cpu) satisfies its public version's pin.
        version = Version(pins[name].public)
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject.toml asks {requirement}: "
            "run bash scripts/lock.sh"
        )


def test_suite_runs_on_the_locked_versions():
    """Every locked package is installed at its locked version: what passed here is what the lock gives."""
    wrong = {}
    for name, version in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), installed and str(installed))
    assert not wrong, f"installed versions differ from requirements.lock (locked, installed): {wrong}"

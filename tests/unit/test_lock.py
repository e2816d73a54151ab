"""The lock (requirements/lock.txt) is what `make` installs, and it covers every dependency.

A fresh clone must install the same packages on any later day until the lock is changed on
purpose (`make lock`, a commit of its own). These tests tie the lock to pyproject.toml, to the
environment the tests run in, and to the committed gRPC stubs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tb_reranker.server import protogen

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"
LOCK_INPUT = REPO / "requirements" / "lock.in"
PROJECT = "tb-reranker"


def parse_lock(text: str) -> dict[str, list[Requirement]]:
    """name -> the lock's pins of it (several when markers split it by platform or Python)."""
    pins: dict[str, list[Requirement]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (operator_version,) = requirement.specifier  # exactly one `==` pin per line
        assert operator_version.operator == "==", line
        pins.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return pins


def locked_version(pins: dict[str, list[Requirement]], name: str, env: dict) -> Version | None:
    """The version the lock selects for ``name`` in environment ``env``, or None."""
    for requirement in pins.get(canonicalize_name(name), []):
        if requirement.marker is None or requirement.marker.evaluate(env):
            return Version(next(iter(requirement.specifier)).version)
    return None


@pytest.fixture(scope="module")
def lock() -> dict[str, list[Requirement]]:
    return parse_lock(LOCK.read_text())


def project_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    lines += [line for line in LOCK_INPUT.read_text().splitlines() if line and line[0] != "#"]
    return [Requirement(line) for line in lines]


def test_the_lock_pins_every_direct_dependency_within_its_range(lock):
    env = default_environment()
    for requirement in project_requirements():
        version = locked_version(lock, requirement.name, env)
        assert version is not None, f"{requirement.name} is not in the lock: run `make lock`"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"the lock's {requirement.name}=={version} is outside pyproject's {requirement}"
        )


def test_the_lock_covers_every_transitive_dependency_of_this_environment(lock):
    """Walk the installed dependency graph from the project (with its dev extra): each package
    reached must be in the lock, at the lock's version. A package pip could choose freely, or
    one installed past the lock, fails here."""
    env = default_environment()
    seen: set[str] = set()
    todo = [(PROJECT, ("dev",))]
    problems = []
    while todo:
        name, extras = todo.pop()
        key = f"{canonicalize_name(name)}{sorted(extras)}"
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        if canonicalize_name(name) != PROJECT:
            version = locked_version(lock, name, env)
            if version is None:
                problems.append(f"{name} {dist.version}: not in the lock")
            elif Version(dist.version) != version:
                problems.append(f"{name} {dist.version}: the lock says {version}")
        for line in dist.requires or []:
            requirement = Requirement(line)
            active = [
                e
                for e in ("", *extras)
                if requirement.marker is None or requirement.marker.evaluate({**env, "extra": e})
            ]
            if active:
                todo.append((requirement.name, tuple(sorted(requirement.extras))))
    assert len(seen) > 50  # the walk reached the whole graph (torch, grpc, pymilvus, …)
    assert not problems, "installed outside the lock (make recreates .venv from it):\n" + "\n".join(
        problems
    )


def test_make_installs_from_the_lock_and_make_lock_refreshes_it():
    make = subprocess.run(
        ["make", "-n", "-B", "/nonexistent/venv/.installed", "lock", "VENV=/nonexistent/venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in make.splitlines() if " install " in line]
    assert installs and all("-c requirements/lock.txt" in line for line in installs), make
    assert any("--build-constraint requirements/lock.txt" in line for line in installs), make
    assert re.search(r"uv pip compile pyproject.toml requirements/lock.in --extra dev", make)
    assert "-o requirements/lock.txt" in make
    assert LOCK.read_text().startswith("# This file was autogenerated by uv")


def test_committed_stubs_come_from_the_locked_grpcio_tools(lock):
    """The stub check (test_proto_stubs) regenerates with the installed grpcio-tools: it must be
    the lock's, and the committed stubs must name that version."""
    locked = locked_version(lock, "grpcio-tools", default_environment())
    assert Version(metadata.version("grpcio-tools")) == locked
    grpc_stub = next(protogen.PB_ROOT.rglob("*_pb2_grpc.py")).read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub).group(1)
    assert Version(generated) == locked, "stubs from another grpcio-tools: run `make proto`"
    runtime = locked_version(lock, "grpcio", default_environment())
    assert runtime >= locked, "the locked grpcio is older than the stubs require"


def test_parse_lock_refuses_anything_but_exact_pins():
    assert parse_lock("a==1.0\n    # via b\nc==2 ; sys_platform == 'linux'\n").keys() == {"a", "c"}
    with pytest.raises(AssertionError):
        parse_lock("a>=1.0\n")
    assert sys.version_info >= (3, 11)

"""docker/constraints-{cpu,gpu}.txt against pyproject.toml: the image installs its
dependencies under these pins, so every direct dependency must be pinned there, to a
version its range in pyproject.toml admits. A dependency added to pyproject.toml without
regenerating the files (their header says how) would be resolved freely in the image,
against pins chosen for the old set: the image would not get what CI tested, or would not
resolve at all."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11, as the images

ROOT = Path(__file__).resolve().parents[2]
# Both images run Linux (markers such as uvloop's are evaluated for it).
IMAGE_MARKERS = {"sys_platform": "linux", "platform_system": "Linux"}
# Installed by their own steps (docker/install-python-deps.sh), not under the pins.
OWN_STEPS = {"torch", "onnxruntime", "onnxruntime-gpu"}


def _pins(variant: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "docker" / f"constraints-{variant}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints-{variant}.txt: expected name==version (got {line!r})"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements(variant: str) -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    lines = project["dependencies"] + project["optional-dependencies"][variant]
    found = [Requirement(line) for line in lines]
    return [r for r in found if r.marker is None or r.marker.evaluate(IMAGE_MARKERS)]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_direct_dependency_is_pinned_within_its_range(variant: str) -> None:
    pins = _pins(variant)
    problems = []
    for requirement in _requirements(variant):
        name = canonicalize_name(requirement.name)
        if name in OWN_STEPS:
            continue
        if name not in pins:
            problems.append(f"{requirement}: not pinned")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement}: pinned to {pins[name]}")
    assert not problems, f"docker/constraints-{variant}.txt, regenerate it: " + "; ".join(problems)

"""The documentation stands on its own: every link stays inside the repository.

Users of the repository have nothing beside it, so a Markdown link must name a
file of the repository (or a web page); the licence the package and the
Dockerfile name must be there.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("docs/*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Features documented by their own files, which docs/protocol.md points to with
# marked stubs; they arrive with those features.
PENDING: set[str] = set()  # documents linked before they exist (none now)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_resolve(document: Path) -> None:
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web page or an anchor
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{document.name} links outside: {target}"
        relative = path.relative_to(ROOT).as_posix()
        assert path.exists() or relative in PENDING, f"{document.name}: {target} is missing"


def test_readme_points_to_the_protocol_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "](docs/protocol.md)" in readme
    assert "shared/" not in readme


def test_licence_is_the_mit_licence_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "MIT"}
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in licence
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert "LICENSE" in allowed
    for name in allowed:
        assert (ROOT / name.rstrip("/")).exists(), f".dockerignore lets in a missing {name}"

"""wsbroker.d.ts describes the API of SPEC §14 (checked by TypeScript's own
compiler, a test-only tool installed by ``npm ci --prefix clients/js``), and the
module stays what §14 promises: one file, no dependencies.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parent.parent / "clients" / "js"
TSC = CLIENT / "node_modules" / ".bin" / "tsc"

needs_tsc = pytest.mark.skipif(
    not TSC.exists() or shutil.which("node") is None,
    reason="TypeScript is not installed: npm ci --prefix clients/js (scripts/test does it)")


def tsc(project: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TSC), "--noEmit", "-p", project], cwd=CLIENT,
                          capture_output=True, text=True, timeout=120)


@needs_tsc
def test_the_spec_example_type_checks() -> None:
    result = tsc("tsconfig.json")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_tsc
def test_misuse_is_a_type_error_on_every_line() -> None:
    """A wrong option type, unknown events, a wrong state: each line of misuse.ts fails."""
    result = tsc("types-test/tsconfig.misuse.json")
    lines = {int(match) for match in re.findall(r"misuse\.ts\((\d+),", result.stdout)}
    source = (CLIENT / "types-test" / "misuse.ts").read_text().splitlines()
    expected = {number for number, line in enumerate(source, 1)
                if line and not line.startswith(("//", "import"))}
    assert lines == expected, result.stdout


def test_the_module_has_no_dependencies() -> None:
    source = (CLIENT / "wsbroker.js").read_text()
    assert not re.search(r"^\s*import\s", source, re.MULTILINE)
    assert not re.search(r"\bimport\(|\brequire\(", source)
    package = json.loads((CLIENT / "package.json").read_text())
    assert "dependencies" not in package
    assert set(package["devDependencies"]) == {"typescript", "terser"}

"""Every node serves the browser client (SPEC §9, §14): ``GET /wsbroker.js`` and
``GET /wsbroker.d.ts``, the same bytes as the repository's ``clients/js``, always
(not only with ``--dev``), cacheable with an ETag and importable from any origin.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import http_url
from tests.helpers import SECRET, WAIT, ServerProcess, free_port, http_get
from wsbroker.server import Node

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "clients" / "js"
FILES = {"/wsbroker.js": "text/javascript", "/wsbroker.d.ts": "application/typescript"}


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize("path", FILES)
async def test_node_serves_the_repository_file_with_cache_and_cors_headers(
    node: Node, path: str
) -> None:
    assert not node.settings.dev
    status, headers, body = await asyncio.to_thread(get, http_url(node) + path)
    assert status == 200
    assert body == (CLIENT / path.lstrip("/")).read_bytes()
    assert headers["Content-Type"].startswith(FILES[path])
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Cache-Control"] == "public, no-cache"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["ETag"].startswith('"') and len(headers["ETag"]) > 10


async def test_a_matching_if_none_match_gets_304_without_a_body(node: Node) -> None:
    url = http_url(node) + "/wsbroker.js"
    _, headers, _ = await asyncio.to_thread(get, url)
    etag = headers["ETag"]
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, again, body = await asyncio.to_thread(get, url, {"If-None-Match": sent})
        assert (status, body) == (304, b""), sent
        assert again["ETag"] == etag and again["Access-Control-Allow-Origin"] == "*"
    status, _, body = await asyncio.to_thread(get, url, {"If-None-Match": '"stale"'})
    assert status == 200 and body


def test_the_repository_files_are_the_packaged_ones() -> None:
    """One source: clients/js links to the files the package ships."""
    for name in ("wsbroker.js", "wsbroker.d.ts"):
        assert (CLIENT / name).resolve() == REPO / "wsbroker" / "static" / name


def test_a_non_editable_install_serves_the_same_bytes(tmp_path: Path) -> None:
    """`pip install .` (not editable) ships the client as package data."""
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(REPO)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    assert (target / "wsbroker" / "static" / "wsbroker.js").is_file()
    port = free_port()
    server = ServerProcess("--jwt-secret", SECRET, port=port, tmp=tmp_path,
                           env={"PYTHONPATH": str(target)})
    # Run from the temporary folder, so that only the installed copy is importable.
    with open(server.stdout_path, "wb") as out, open(server.stderr_path, "wb") as err:
        server.process = subprocess.Popen(
            [sys.executable, "-c", "import wsbroker, sys; print(wsbroker.__file__, flush=True);"
             "from wsbroker.cli import main; sys.exit(main(sys.argv[1:]))", *server.args],
            stdout=out, stderr=err, env=server.env, cwd=tmp_path)
    try:
        server.wait_healthy()
        assert server.stdout.startswith(str(target)), server.stdout
        for path in FILES:
            status, _, body = http_get(server.http + path)
            assert status == 200
            assert body.encode() == (CLIENT / path.lstrip("/")).read_bytes()
    finally:
        server.stop()

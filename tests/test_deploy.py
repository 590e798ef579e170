"""The deployment files: the Dockerfile's steps run without Docker, the rest parsed.

There is no Docker engine in CI, so the image is proven in two halves: its
invariants are read from the Dockerfile itself (non-root user, EXPOSE 8765,
HEALTHCHECK on /healthz, STOPSIGNAL SIGTERM, exec-form ENTRYPOINT, WSB_HOST),
and its steps are replayed: the build context the .dockerignore lets in is
built into a wheel, the wheel (with the ``speed`` extra) is installed into a
fresh venv, and the ENTRYPOINT is started with the image's ENV and reached
through the HEALTHCHECK's own command. docker-compose.yml and the Kubernetes
manifests are parsed and checked for consistency with each other and with the
node's options; deploy/make-certs.sh is run and its certificate served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SECRET, WAIT, Client, ServerProcess, free_port, make_token
from wsbroker.config import OPTIONS, parse_duration
from wsbroker.keepalive import PING_INTERVAL, SWEEP

LONGEST_SILENCE = PING_INTERVAL + SWEEP
"""The longest a healthy connection goes without a byte: a quiet client is pinged then."""

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KNOWN_ENV = {option.env for option in OPTIONS}
BOUND = 30.0


# -- the Dockerfile, parsed --------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the final stage has no {keyword}"
        return found[-1]

    @property
    def env(self) -> dict[str, str]:
        """The stage's ENV, in order (later values win)."""
        result: dict[str, str] = {}
        for args in self.all("ENV"):
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                result[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                result[key] = value
        return result

    def run_commands(self) -> list[str]:
        """Each RUN split at `&&`, without its --mount/--network flags."""
        commands = []
        for args in self.all("RUN"):
            args = re.sub(r"^(?:--\S+\s+)*", "", args)
            commands += [part.strip() for part in args.split("&&")]
        return commands


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def env(self) -> dict[str, str]:
        return self.final.env

    @property
    def entrypoint(self) -> list[str]:
        value = json.loads(self.final.last("ENTRYPOINT"))
        assert isinstance(value, list)
        return [str(item) for item in value]

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options, exec-form command) of the final stage's HEALTHCHECK."""
        options_text, _, command = self.final.last("HEALTHCHECK").partition("CMD ")
        options = dict(option.lstrip("-").split("=", 1) for option in shlex.split(options_text))
        value = json.loads(command)
        assert isinstance(value, list), "HEALTHCHECK CMD must be in exec form"
        return options, [str(item) for item in value]

    @property
    def healthcheck_command(self) -> list[str]:
        return self.healthcheck[1]


def dockerfile(path: Path = ROOT / "Dockerfile") -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert match, f"cannot read FROM {args!r}"
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages or keyword == "ARG", f"{keyword} before the first FROM"
            if stages:
                stages[-1].instructions.append((keyword, args))
    return Dockerfile(stages)


def test_dockerfile_invariants() -> None:
    image = dockerfile()
    assert len(image.stages) >= 2, "multi-stage: a builder and a runtime"
    builder, final = image.stages[0], image.final
    assert builder.name == "builder"
    assert any("pip wheel" in run for run in builder.all("RUN")), "the builder builds wheels"
    assert final.base == "python:3.12-slim"

    # The runtime stage gets no source: only the builder's wheels, without an index.
    assert not final.all("ADD")
    assert all("--from=builder" in copy for copy in final.all("COPY"))
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert installs and all("--no-index" in run and "from=builder" in run for run in installs)
    assert any("wsbroker[speed]" in run for run in installs), "uvloop (the speed extra)"

    user = final.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the node must not run as root"
    index = {key: i for i, (key, _) in enumerate(final.instructions)}
    assert index["USER"] > max(i for i, (key, args) in enumerate(final.instructions)
                               if key == "RUN"), "USER after the last RUN"
    assert "8765" in final.last("EXPOSE").split()
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert image.entrypoint == ["wsbroker", "serve"], "exec form: wsbroker gets SIGTERM itself"
    assert not final.all("CMD"), "no CMD: extra `docker run` arguments are serve flags"

    env = image.env
    assert env["WSB_HOST"] == "0.0.0.0"
    assert env.get("WSB_PORT", "8765") == "8765"
    unknown = {key for key in env if key.startswith("WSB_")} - KNOWN_ENV
    assert not unknown, f"ENV names no option: {unknown}"

    options, command = image.healthcheck
    assert command[0] == "python" and "/healthz" in " ".join(command)
    assert {"interval", "timeout", "retries"} <= set(options)
    assert "curl" not in " ".join(command) and "wget" not in " ".join(command)


def test_dockerignore_lets_in_only_the_package() -> None:
    patterns = _dockerignore()
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "wsbroker"} <= allowed
    assert not allowed & {".venv", ".git", "tests", "benchmarks", "deploy"}


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _copy_build_context(destination: Path) -> None:
    """What `COPY . .` sees in the builder: the allow-list of .dockerignore."""
    destination.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for pattern in _dockerignore():
        if not pattern.startswith("!"):
            continue
        source = ROOT / pattern[1:].rstrip("/")
        if source.is_dir():
            shutil.copytree(source, destination / source.name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / source.name)


def _run(argv: list[Any], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=300, **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_image_steps_build_install_and_serve(tmp_path: Path) -> None:
    """The Dockerfile's own pip commands, replayed: the builder's (wheel of the build
    context, then wheels of every dependency with the speed extra) and the runtime's
    (install from those wheels only, no index) into a fresh venv. Then ENTRYPOINT
    with the image's ENV, HEALTHCHECK passes, SIGTERM (STOPSIGNAL) exits 0."""
    image = dockerfile()
    builder, final = image.stages[0], image.final
    context, wheels, venv = tmp_path / "context", tmp_path / "wheels", tmp_path / "venv"
    _copy_build_context(context)
    tool_env = {k: v for k, v in os.environ.items() if not k.startswith("WSB_")}
    _run([sys.executable, "-m", "venv", venv], env=tool_env)
    # `python` is the venv's, as it is the image's Python; /wheels is a tmp dir.
    shell_env = {**tool_env, "PATH": f"{venv / 'bin'}:{tool_env.get('PATH', '/usr/bin:/bin')}"}
    for stage in (builder, final):
        steps = [c for c in stage.run_commands() if "pip " in c]
        skipped = [c for c in stage.run_commands() if c not in steps]
        assert all(c.split()[0] in ("groupadd", "useradd") for c in skipped), skipped
        assert steps, f"no pip step in the {stage.name} stage"
        for command in steps:
            _run(["sh", "-c", command.replace("/wheels", str(wheels))], cwd=context,
                 env={**shell_env, **stage.env})
    assert len(list(wheels.glob("wsbroker-*.whl"))) == 1
    python = venv / "bin" / "python"
    assert {p.name.split("-")[0].lower() for p in wheels.iterdir()} >= {"uvloop", "websockets"}

    # The installed copy, not this checkout: with its static files and uvloop.
    probe = _run([python, "-c", "import pathlib, uvloop, wsbroker; "
                  "print(pathlib.Path(wsbroker.__file__).parent)"], cwd=tmp_path, env=tool_env)
    package = Path(probe.stdout.strip())
    assert package.is_relative_to(venv), package
    assert any((package / "static").iterdir()), "the wheel lacks wsbroker/static"

    port = free_port()
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
           "LANG": "C.UTF-8", **image.env, "WSB_JWT_SECRET": SECRET, "WSB_PORT": str(port)}
    assert env["WSB_HOST"] == "0.0.0.0"
    err = tmp_path / "node.err"
    with open(err, "wb") as stderr:
        node = subprocess.Popen(image.entrypoint, env=env, cwd=tmp_path, stderr=stderr,
                                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOUND
        while not _healthz_ok(port):
            assert node.poll() is None, f"node exited:\n{err.read_text()}"
            assert time.monotonic() < deadline, f"no /healthz 200:\n{err.read_text()}"
            time.sleep(0.1)
        check = subprocess.run(image.healthcheck_command, env=env, capture_output=True,
                               text=True, timeout=BOUND)
        assert check.returncode == 0, f"HEALTHCHECK failed: {check.stderr}"
        # The image's WSB_LOG_FORMAT: one JSON object per line.
        lines = [json.loads(line) for line in err.read_text().splitlines()]
        assert any(line["msg"].startswith("node ") for line in lines), lines
        node.send_signal(signal.SIGTERM)  # what STOPSIGNAL sends
        assert node.wait(BOUND) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(WAIT)
    # The healthcheck fails when nothing answers (else it would prove nothing).
    check = subprocess.run(image.healthcheck_command, env=env, capture_output=True, timeout=BOUND)
    assert check.returncode != 0


def _healthz_ok(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/healthz"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)
    return False


# -- YAML: docker-compose.yml and the Kubernetes manifests ----------------------------------


def load_yaml(path: Path) -> list[Any]:
    """All documents of a YAML file, with PyYAML if any Python here has it, else skip.

    PyYAML is not a test dependency; the system Python often has it.
    """
    try:
        import yaml
    except ImportError:
        pass
    else:
        return list(yaml.safe_load_all(path.read_text()))
    for python in ("/usr/bin/python3", shutil.which("python3")):
        if python and Path(python).exists():
            result = subprocess.run(
                [python, "-c", "import json, sys, yaml; "
                 "print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))", str(path)],
                capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                documents: list[Any] = json.loads(result.stdout)
                return documents
            if "No module named 'yaml'" not in result.stderr:
                raise AssertionError(f"{path} is not valid YAML:\n{result.stderr}")
    pytest.skip("PyYAML is not installed in any Python here: YAML files not parsed")


def _seconds(value: Any) -> float:
    return parse_duration(str(value)) if not isinstance(value, int | float) else float(value)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects of deploy/kubernetes/, by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in load_yaml(path):
            if document:
                assert document["kind"] not in objects, f"two {document['kind']}s"
                objects[document["kind"]] = document
    return objects


def test_kubernetes_manifests_are_consistent(manifests: dict[str, dict[str, Any]]) -> None:
    assert {"Deployment", "Service", "Ingress", "PodDisruptionBudget", "Secret"} <= set(manifests)
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert "sessionAffinity" not in service["spec"] or \
        service["spec"]["sessionAffinity"] == "None", "no stickiness needed"

    (container,) = pod["spec"]["containers"]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert port_names.get("http") == 8765
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in port_names

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    # Termination grace > preStop + drain + 15 s: closing handshakes (5 s at most)
    # and the stop (about 6 s at most), with a margin (docs/protocol.md).
    env = {item["name"]: item for item in container.get("env", [])}
    drain = _seconds(env["WSB_DRAIN_SECONDS"]["value"])
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    match = re.search(r"sleep\(?\s*(\d+)", pre_stop)
    sleep = float(match.group(1)) if match else 0.0
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + drain + 15

    # Credentials come from the Secret, whose keys are option variables.
    secret = manifests["Secret"]
    sources = [ref["secretRef"]["name"] for ref in container.get("envFrom", [])]
    sources += [item["valueFrom"]["secretKeyRef"]["name"] for item in env.values()
                if "secretKeyRef" in item.get("valueFrom", {})]
    assert secret["metadata"]["name"] in sources
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert {"WSB_REDIS_URL", "WSB_JWT_SECRET"} <= secret_keys
    assert not (secret_keys | set(env)) - KNOWN_ENV, "a variable names no wsbroker option"

    # Runs as the image's non-root user.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == dockerfile().final.last("USER").split(":")[0]

    ingress = manifests["Ingress"]
    annotations = ingress["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{name}"]) > LONGEST_SILENCE
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"]
                for path in rule["http"]["paths"]]
    assert backends and all(b["name"] == service["metadata"]["name"] for b in backends)
    assert all(b["port"].get("name") == service_port["name"] for b in backends)


def test_ingress_routes_only_public_paths_and_logs_no_token(
    manifests: dict[str, dict[str, Any]],
) -> None:
    """/metrics (and the probes) never reach the internet; the ingress-nginx access log,
    whose default format carries `/ws?token=…`, is off for this Ingress."""
    ingress = manifests["Ingress"]
    paths = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert {path["pathType"] for path in paths} == {"Exact"}
    assert "/ws" in {path["path"] for path in paths}
    assert not {path["path"] for path in paths} & {"/", "/metrics", "/healthz", "/readyz"}
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/enable-access-log"] == "false"


def test_compose_file_is_consistent() -> None:
    (compose,) = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert {"redis", "wsbroker-1", "wsbroker-2", "haproxy", "certs"} <= set(services)
    node_ids = set()
    for name in ("wsbroker-1", "wsbroker-2"):
        node = services[name]
        assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).exists()
        env = node["environment"]
        assert env["WSB_REDIS_URL"].startswith("redis://redis:")
        assert not {key for key in env if key.startswith("WSB_")} - KNOWN_ENV
        node_ids.add(env["WSB_NODE_ID"])
        assert _seconds(node["stop_grace_period"]) >= _seconds(env["WSB_DRAIN_SECONDS"]) + 15
        assert node["ulimits"]["nofile"]["soft"] >= 65536
        assert "ports" not in node, "nodes are reached through the proxy only"
        trusted = env["WSB_TRUSTED_PROXIES"].split(",")
        assert services["haproxy"]["networks"]["default"]["ipv4_address"] in trusted
    assert len(node_ids) == 2
    haproxy = services["haproxy"]
    assert haproxy["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    mounts = " ".join(haproxy["volumes"])
    assert "./haproxy.cfg:" in mounts and "./certs:" in mounts
    assert "./make-certs.sh:" in " ".join(services["certs"]["volumes"])
    assert (DEPLOY / "make-certs.sh").exists() and (DEPLOY / "haproxy.cfg").exists()


def test_proxy_idle_timeouts_exceed_the_ping_interval() -> None:
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    tunnel = re.search(r"^\s*timeout tunnel (\S+)", haproxy, re.MULTILINE)
    assert tunnel and parse_duration(tunnel.group(1)) > LONGEST_SILENCE
    nginx = (DEPLOY / "nginx.conf").read_text()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        found = re.search(rf"^\s*{directive} (\S+);", nginx, re.MULTILINE)
        assert found and parse_duration(found.group(1)) > LONGEST_SILENCE


# -- deploy/make-certs.sh ---------------------------------------------------------------------


@pytest.fixture
def made_certs(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path / "certs"
    first = _run(["sh", DEPLOY / "make-certs.sh", out])
    assert "wrote" in first.stdout
    yield out


def test_make_certs_is_idempotent_and_keeps_keys_private(made_certs: Path) -> None:
    before = (made_certs / "haproxy.pem").read_bytes()
    again = _run(["sh", DEPLOY / "make-certs.sh", made_certs])
    assert "keeping" in again.stdout
    assert (made_certs / "haproxy.pem").read_bytes() == before
    for name in ("server.key", "haproxy.pem"):
        assert (made_certs / name).stat().st_mode & 0o077 == 0, name
    assert sorted(p.name for p in made_certs.iterdir()) == [
        "ca.crt", "haproxy.pem", "server.crt", "server.key"]


async def test_make_certs_output_serves_wss_to_clients_trusting_its_ca(
    made_certs: Path, server_process: Callable[..., ServerProcess],
) -> None:
    node = server_process("--jwt-secret", SECRET, "--tls-cert", str(made_certs / "server.crt"),
                          "--tls-key", str(made_certs / "server.key"), wait_ready=False)
    context = ssl.create_default_context(cafile=str(made_certs / "ca.crt"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # as Python >= 3.13 does by default
    for host in ("localhost", "127.0.0.1"):
        deadline = time.monotonic() + BOUND
        while True:
            try:
                async with Client.connect(f"wss://{host}:{node.port}/ws", make_token(),
                                          ssl=context) as client:
                    assert client.welcome is not None
                break
            except OSError:
                assert node.process is not None and node.process.poll() is None, node.stderr
                assert time.monotonic() < deadline, node.stderr
                await asyncio.sleep(0.1)

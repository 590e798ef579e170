"""Starting, pinning, probing and stopping the processes a benchmark run needs.

Why pinning: on a 2-core machine the server under test gets core 0 to itself and
everything that generates load (load generator, publisher, redis-server) shares
core 1, so the server's figures are not disturbed by its own load and a
saturated generator shows up as such instead of silently stealing server time.
Every process started here is stopped by its own PID (terminate, then kill).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A currently free loopback TCP port (tiny race accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Lift our soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pinned(cmd: Sequence[str], cpu: int) -> list[str]:
    """Prefix ``cmd`` with ``taskset -c cpu`` when taskset and that CPU exist."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu), *cmd]
    return list(cmd)


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP on 127.0.0.1:port, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads), in seconds.

    Summed from each thread's ``schedstat`` (nanoseconds) when the kernel has it,
    else utime + stime from ``stat`` (clock ticks, 10 ms granularity). Neither
    includes softirq time: the kernel's loopback TCP work a sender triggers is
    charged to its core, not to it (see ``core_jiffies``).
    """
    try:
        return (
            sum(
                int(task.joinpath("schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Managed:
    """A started process, its log file, and how to stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL — this process only, by its PID."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the harness dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(
    name: str, cmd: Sequence[str], cpu: int, logdir: Path, env: dict[str, str] | None = None
) -> Managed:
    """Start ``cmd`` pinned to ``cpu``, stdout+stderr to ``logdir/name.log``."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(cmd, cpu),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    return Managed(name, proc, log)


def start_redis(logdir: Path, cpu: int) -> tuple[Managed, int]:
    """A throwaway redis-server: loopback only, no persistence, own directory.

    The pub/sub output-buffer limit is lifted so that an overloaded server under
    test shows up as latency in the figures rather than Redis dropping its
    subscription connection.
    """
    port = free_port()
    datadir = logdir / "redis"
    datadir.mkdir(exist_ok=True)
    cmd = [
        shutil.which("redis-server") or "/usr/bin/redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(datadir),
        "--client-output-buffer-limit",
        "pubsub 0 0 0",
    ]
    managed = start("redis", cmd, cpu, logdir)
    try:
        wait_port(port, 10, managed.proc)
        ping_redis(port)
    except Exception:
        managed.stop()
        raise
    return managed, port


def ping_redis(port: int, timeout: float = 5.0) -> None:
    """Raise unless redis answers PING with PONG."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis on port {port} does not answer PING")
        time.sleep(0.1)


def core_jiffies(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat, to see if a core saturated.

    Busy includes irq and softirq time, which no process is charged for.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return sum(values) - idle, sum(values)
    return 0, 0

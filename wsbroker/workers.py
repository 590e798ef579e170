"""``serve --workers N``: a parent that keeps N worker nodes up on one port.

Each worker is a whole node (``serve --worker-of ID``) listening with
``SO_REUSEPORT``, so the kernel spreads connections over them; Redis connects
them. The parent owns nothing but the workers:

* it restarts a worker that dies, after a backoff (0.5 s doubling to 8 s per
  worker), and says so in the log;
* it marks a dead worker's metrics dead (prometheus-client multiprocess
  ``mark_process_dead``), so the summed live gauges count live workers only;
* it gives up, stopping the others and exiting 1, when workers crash more than
  :data:`MAX_CRASHES` times within :data:`CRASH_WINDOW` seconds: a fleet that
  cannot stay up must be seen by the process manager, not hidden by restarts;
* SIGTERM/SIGINT, at any moment (start-up included), are forwarded to the
  workers, which drain; the parent exits 0 once they all have.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import multiprocess

log = logging.getLogger("wsbroker.workers")

MAX_CRASHES = 5
"""Worker deaths tolerated within :data:`CRASH_WINDOW`; one more and the parent gives up."""

CRASH_WINDOW = 60.0
RESTART_BASE = 0.5
RESTART_CAP = 8.0
POLL = 0.05
"""Seconds between looks at the workers (the parent does nothing else)."""

EXIT_FAILED = 1


@dataclass(slots=True)
class _Worker:
    node_id: str
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None
    crashes: list[float] = field(default_factory=list)


class Supervisor:
    """Starts, watches and restarts the workers; see the module docstring."""

    def __init__(self, command: Callable[[str], list[str]], node_ids: list[str], *,
                 env: dict[str, str], metrics_dir: str) -> None:
        self._command = command
        self._env = env
        self._metrics_dir = metrics_dir
        self._workers = [_Worker(node_id) for node_id in node_ids]
        self._crashes: list[float] = []
        self._stopping: int | None = None

    def run(self, started: Callable[[], None] = lambda: None) -> int:
        """Run until a signal (0 once every worker drained) or too many crashes (1)."""
        previous = {signum: signal.signal(signum, self._on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            for worker in self._workers:
                self._start(worker)
            started()
            return self._watch()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stopping is None:
            log.info("received signal %d: draining %d workers", signum, len(self._workers))
        self._stopping = signum
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        worker.process = subprocess.Popen(self._command(worker.node_id), env=self._env)
        log.info("worker %s started (pid %d)", worker.node_id, worker.process.pid)

    def _watch(self) -> int:
        failed = unclean = False
        while True:
            now = time.monotonic()
            for worker in self._workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    worker.process = None
                    multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                    if self._stopping is None and not failed:
                        failed = not self._crashed(worker, process, now)
                    elif process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                        unclean = True  # a worker that did not drain cleanly
                elif (worker.restart_at is not None and now >= worker.restart_at
                      and self._stopping is None and not failed):
                    self._start(worker)
            if failed and self._stopping is None:
                self._stopping = signal.SIGTERM
                self._forward(signal.SIGTERM)
            if self._stopping is not None and all(w.process is None for w in self._workers):
                return EXIT_FAILED if failed or unclean else 0
            time.sleep(POLL)

    def _crashed(self, worker: _Worker, process: subprocess.Popen[bytes], now: float) -> bool:
        """Record a death; schedule the restart, or False when it is one too many."""
        self._crashes = [at for at in self._crashes if now - at < CRASH_WINDOW] + [now]
        worker.crashes = [at for at in worker.crashes if now - at < CRASH_WINDOW] + [now]
        how = _exit_description(process.returncode)
        if len(self._crashes) > MAX_CRASHES:
            log.error("worker %s (pid %d) %s: %d worker crashes within %.0f s, giving up; "
                      "stopping the other workers", worker.node_id, process.pid, how,
                      len(self._crashes), CRASH_WINDOW)
            return False
        delay = min(RESTART_CAP, RESTART_BASE * 2 ** (len(worker.crashes) - 1))
        log.warning("worker %s (pid %d) %s; restarting it in %.1f s", worker.node_id,
                    process.pid, how, delay)
        worker.restart_at = now + delay
        return True


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def worker_command(serve_argv: list[str], metrics_dir: str) -> Callable[[str], list[str]]:
    """The command line of the worker with a given node id."""
    def command(node_id: str) -> list[str]:
        return [sys.executable, "-m", "wsbroker", "serve", *serve_argv,
                "--worker-of", node_id, "--metrics-dir", metrics_dir]
    return command


def worker_env(metrics_dir: str, jwt_secret: str | None, argv: list[str]) -> dict[str, str]:
    """The workers' environment: the metrics directory, and the secret (never in argv,
    where ``ps`` shows it), the one ``--dev`` generated included."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    if jwt_secret and "--jwt-secret" not in " ".join(argv):
        env["WSB_JWT_SECRET"] = jwt_secret
    return env

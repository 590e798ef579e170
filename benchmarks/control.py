"""The harness's handles on its load processes: the load generator and the publisher.

Both run as subprocesses pinned to the load core; the generator lives for a
whole scenario (its connections are the scenario), the publisher for one rate
step. Every wait here has a deadline, so a wedged child cannot hang the harness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks import processes

LOAD_CPU = 1


class Loadgen:
    """A running ``benchmarks.loadgen`` and its line-based command channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls,
        port: int,
        path: str,
        subscribers: int,
        channels: int,
        channel_name: str,
        concurrency: int,
        logdir: Path,
        on_progress: Callable[[dict[str, Any]], None],
        limit_s: float,
        token_secret: str | None = None,
    ) -> tuple[Loadgen, dict[str, Any]]:
        """Start the generator, let it connect everyone, return it with its ``ready``."""
        cmd = processes.pinned(
            [
                processes.PYTHON,
                "-m",
                "benchmarks.loadgen",
                "--port",
                str(port),
                "--path",
                path,
                "--subscribers",
                str(subscribers),
                "--channels",
                str(channels),
                "--channel-name",
                channel_name,
                "--concurrency",
                str(concurrency),
                *(["--token-secret", token_secret] if token_secret else []),
            ],
            LOAD_CPU,
        )
        with (logdir / "loadgen.log").open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=processes.REPO,
                preexec_fn=processes.die_with_parent,
            )
        gen = cls(proc)
        try:
            while True:
                event = await gen._read(limit_s)
                if event["event"] == "ready":
                    return gen, event
                on_progress(event)
        except BaseException:
            await gen.close()
            raise

    async def _read(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        if not line:
            raise RuntimeError("load generator exited (see loadgen.log in the run directory)")
        event: dict[str, Any] = orjson.loads(line)
        return event

    async def command(self, cmd: str, limit_s: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return its reply event."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps({"cmd": cmd, **fields}) + b"\n")
        await self.proc.stdin.drain()
        return await self._read(limit_s)

    async def close(self) -> None:
        """Ask the generator to quit; kill it (by PID) if it does not."""
        if self.proc.returncode is None:
            try:
                await self.command("quit", limit_s=10)
                await asyncio.wait_for(self.proc.wait(), 10)
            except (OSError, RuntimeError, TimeoutError, ValueError):
                pass
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run_publisher(
    redis_port: int,
    channels: int,
    channel_name: str,
    rate: float,
    duration: float,
    step: int,
    size: int,
    history_size: int = 0,
) -> dict[str, Any]:
    """Publish one rate step through Redis and return the publisher's summary.

    ``history_size`` > 0 publishes with ``FCALL wsb_publish`` (a history channel)."""
    cmd = processes.pinned(
        [
            processes.PYTHON,
            "-m",
            "benchmarks.publisher",
            "--port",
            str(redis_port),
            "--channels",
            str(channels),
            "--channel-name",
            channel_name,
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--step",
            str(step),
            "--size",
            str(size),
            *(["--history-size", str(history_size)] if history_size else []),
        ],
        LOAD_CPU,
    )
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=processes.REPO,
        preexec_fn=processes.die_with_parent,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), duration + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"publisher failed ({proc.returncode}): {err.decode()[-500:]}")
    result: dict[str, Any] = orjson.loads(out)
    return result

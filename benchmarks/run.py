"""Orchestration: scenarios × servers × rate steps, and the command line.

One Redis serves the whole run. For each scenario, each server in turn: start
it on core 0, measure its idle RSS, connect its subscribers (→ connects/s, KiB
per connection). Then for each rate step, on each server in turn: tell its
generator to start counting, publish for ``--duration`` seconds, wait for the
deliveries to drain, and read the server's CPU time around it (→ µs of server
CPU per delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import control, processes, report, servers
from wsbroker.bench.progress import Progress

FD_MARGIN = 64  # descriptors a server needs besides its client sockets


def csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def csv_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark wsbroker against a plain-websockets floor server.",
    )
    p.add_argument("--servers", default="wsbroker,floor",
                   help="comma list of wsbroker,floor,node,history (node: Node.js ws + ioredis; "
                        "history: wsbroker with every channel a history channel, published "
                        "with FCALL)")
    p.add_argument("--subscribers", type=csv_ints, default=[1000], help="comma list")
    p.add_argument(
        "--channels",
        type=csv_ints,
        default=[1, 100],
        help="comma list; subscribers are spread evenly over the channels",
    )
    p.add_argument(
        "--rates",
        type=csv_floats,
        default=[10, 30, 100, 300],
        help="published messages/s (all channels together), one step each",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per step")
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of unmeasured publishing per server before the first step (0 = none)",
    )
    p.add_argument("--size", type=int, default=100, help="payload bytes per message")
    p.add_argument(
        "--unique-tokens",
        action="store_true",
        help="a distinct token per connection (default: one token shared by all, as a "
        "reconnect storm presents; wsbroker remembers verified tokens)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="seconds after the last publish to wait for deliveries",
    )
    p.add_argument("--peak", action="store_true", help="raise the rate until loss or slow p99")
    p.add_argument(
        "--peak-start",
        type=float,
        default=10_000,
        help="first peak step, in deliveries/s (rate = this ÷ subscribers per channel)",
    )
    p.add_argument("--peak-factor", type=float, default=1.4, help="rate multiplier per step")
    p.add_argument("--peak-max-steps", type=int, default=15)
    p.add_argument("--peak-p99-ms", type=float, default=1000.0, help="p99 ceiling for a pass")
    p.add_argument(
        "--idle",
        type=int,
        metavar="N",
        default=0,
        help="idle-memory mode: connect N subscribers, report RSS per connection",
    )
    p.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(servers.KNOWN)
    if unknown:
        p.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if args.idle:
        args.subscribers = [args.idle]
    return args


def step_rates(args: argparse.Namespace, subscribers: int, channels: int) -> list[float]:
    """The rate steps of a scenario: the given list, or the geometric peak ladder."""
    if not args.peak:
        return list(args.rates)
    per_channel = max(1, subscribers // channels)
    start = max(1.0, args.peak_start / per_channel)
    return [round(start * args.peak_factor**i, 1) for i in range(args.peak_max_steps)]


def published_per_channel(sent: int, channels: int) -> list[int]:
    """How many of ``sent`` round-robin messages went to each channel."""
    return [sent // channels + (1 if c < sent % channels else 0) for c in range(channels)]


def step_failed(step: dict[str, Any], args: argparse.Namespace) -> bool:
    """A step fails when anything was lost or duplicated, or p99 is over the ceiling."""
    return bool(
        step["undelivered_at_deadline"]
        or step["dups"]
        or step["latency_ms"]["p99"] > args.peak_p99_ms
    )


async def run_step(
    ctx: Context,
    gen: control.Loadgen,
    target: servers.Target,
    label: str,
    rate: float,
    step_id: int,
    per_channel: list[int],
    channel_name: str,
    duration: float,
) -> dict[str, Any]:
    """Publish one rate step and measure it from both ends."""
    args, pid = ctx.args, target.managed.pid
    channels = len(per_channel)
    cpu0 = processes.cpu_seconds(pid)
    load0 = processes.core_jiffies(control.LOAD_CPU)
    srv0 = processes.core_jiffies(servers.SERVER_CPU)
    await gen.command("begin", step=step_id)
    begin_ns = time.time_ns()
    publisher = asyncio.create_task(
        control.run_publisher(
            ctx.redis_port, channels, channel_name, rate, duration, step_id, args.size,
            servers.HISTORY_SIZE if target.name == "history" else 0,
        )
    )
    target_total = round(rate * duration) * sum(per_channel) // channels
    while not publisher.done():
        await asyncio.wait({publisher}, timeout=0.5)
        st = await gen.command("stats")
        done = f"{st['unique']:,}/~{target_total:,}"
        ctx.progress.status(f"{label} rate {rate:g}/s: delivered {done}")
    pub = publisher.result()
    counts = published_per_channel(pub["sent"], channels)
    expected = sum(n * subs for n, subs in zip(counts, per_channel, strict=True))

    deadline = time.monotonic() + args.drain_timeout
    last, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        st = await gen.command("stats")
        if st["unique"] >= expected:
            break
        if st["unique"] != last:
            last, last_change = st["unique"], time.monotonic()
        elif time.monotonic() - last_change > 1.0:
            break
        ctx.progress.status(f"{label} rate {rate:g}/s: draining {st['unique']:,}/{expected:,}")
        await asyncio.sleep(0.2)
    end = await gen.command("end", limit_s=120)
    cpu1 = processes.cpu_seconds(pid)
    load1 = processes.core_jiffies(control.LOAD_CPU)
    srv1 = processes.core_jiffies(servers.SERVER_CPU)

    delivered = end["unique"]
    active_s = max(pub["elapsed_s"], (end["last_ns"] - begin_ns) / 1e9, 1e-3)
    server_cpu = cpu1 - cpu0
    straggled = 0
    if delivered < expected:  # let stragglers arrive so the next step starts clean
        straggled = await quiesce(ctx, gen, label, delivered) - delivered
    lat = end["latency_us"]
    step: dict[str, Any] = {
        "rate": rate,
        "step": step_id,
        "published": pub["sent"],
        "acked": pub["acked"],
        "publish_rate": pub["achieved_rate"],
        "expected": expected,
        "delivered": delivered,
        "undelivered_at_deadline": expected - delivered,
        "lost": expected - delivered - straggled,
        "dups": end["dups"],
        "gaps": end["gaps"],
        "late_from_previous_step": end["late"],
        "deliveries_per_s": delivered / max(end["delivery_span_s"], pub["elapsed_s"], 1e-3),
        "latency_ms": {k: lat[k] / 1000 for k in ("p50", "p99", "max", "mean")},
        "server_cpu_s": server_cpu,
        "server_cpu_fraction": server_cpu / active_s,
        "server_cpu_us_per_delivery": server_cpu * 1e6 / delivered if delivered else None,
        "generator_cpu_fraction": end["cpu_s"] / active_s,
        "publisher_cpu_fraction": pub["cpu_s"] / max(pub["elapsed_s"], 1e-3),
        "server_core_busy": busy_fraction(srv0, srv1, active_s),
        "load_core_busy": busy_fraction(load0, load1, active_s),
        "connections_lost": end["lost"],
        "close_codes": end["close_codes"],
    }
    step["flags"] = flags(step)
    step["failed"] = step_failed(step, args)
    return step


def busy_fraction(before: tuple[int, int], after: tuple[int, int], active_s: float) -> float:
    """Share of a core busy (softirq included) while deliveries were flowing.

    The jiffies are read around the whole step, drain wait included; the wait is
    idle, so busy time is divided by the active part (first publish → last delivery).
    """
    return min(1.0, (after[0] - before[0]) / processes.CLK_TCK / active_s)


def flags(step: dict[str, Any]) -> list[str]:
    """Warnings that make a step's figures suspect or explain them."""
    out = []
    if step["generator_cpu_fraction"] > 0.85:
        out.append("generator>85%cpu")
    if step["load_core_busy"] > 0.95:
        out.append("load-core-busy")
    if step["publish_rate"] < 0.95 * step["rate"]:
        out.append("publisher-behind")
    if step["server_core_busy"] > 0.95:
        out.append("server-core-busy")
    if step["acked"] < step["published"]:
        out.append("redis-unacked")
    if step["connections_lost"]:
        out.append("connections-lost")
    return out


async def quiesce(ctx: Context, gen: control.Loadgen, label: str, delivered: int) -> int:
    """Wait (bounded) until deliveries stop arriving; return the final count."""
    deadline = time.monotonic() + 20
    last, last_change = delivered, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last_change < 1.0:
        await asyncio.sleep(0.25)
        st = await gen.command("stats")
        if st["unique"] != last:
            last, last_change = st["unique"], time.monotonic()
        ctx.progress.status(f"{label}: waiting for stragglers ({last:,})")
    return last


async def background_busy(seconds: float) -> list[float]:
    """How busy each of the two cores is before we load them (other tenants, leftovers)."""
    cores = (servers.SERVER_CPU, control.LOAD_CPU)
    before = [processes.core_jiffies(c) for c in cores]
    await asyncio.sleep(seconds)
    after = [processes.core_jiffies(c) for c in cores]
    return [(a[0] - b[0]) / max(1, a[1] - b[1]) for a, b in zip(after, before, strict=True)]


class Context:
    """What every scenario run shares: arguments, Redis, the log dir, the display."""

    def __init__(self, args: argparse.Namespace, redis_port: int, logdir: Path) -> None:
        self.args = args
        self.redis_port = redis_port
        self.logdir = logdir
        self.progress = Progress()
        self.step_ids = iter(range(1, 1 << 30))


@dataclass
class Contender:
    """One server in a scenario: its process, its load generator, its results."""

    name: str
    label: str
    run: dict[str, Any]
    target: servers.Target | None = None
    gen: control.Loadgen | None = None
    per_channel: list[int] = field(default_factory=list)
    out: bool = False  # failed to start, errored, or (peak mode) failed a step
    best: dict[str, Any] | None = None

    @property
    def channel_name(self) -> str:
        """Each server gets its own Redis channels, so only it works during its step."""
        return f"{self.name}.bench"


async def run_scenario(ctx: Context, subscribers: int, channels: int) -> list[dict[str, Any]]:
    """Every server through one scenario, rate steps interleaved; errors are recorded.

    All servers stay up with their clients connected, and each rate is run on
    each server in turn (order alternating per step), so background noise on a
    shared machine hits them alike instead of spoiling one server's whole run.
    """
    args = ctx.args
    mode = "idle" if args.idle else "peak" if args.peak else "steps"
    contenders = [
        Contender(
            name,
            f"[{name} {subscribers}×{channels}ch]",
            {
                "server": name,
                "scenario": {"subscribers": subscribers, "channels": channels, "mode": mode},
                "steps": [],
            },
        )
        for name in args.servers
    ]
    try:
        for c in contenders:
            await set_up(ctx, c, subscribers, channels)
        if not args.idle:
            await run_rates(ctx, contenders, subscribers, channels)
    finally:
        for c in contenders:
            if c.gen is not None:
                await c.gen.close()
            if c.target is not None:
                c.target.managed.stop()
    return [c.run for c in contenders]


async def set_up(ctx: Context, c: Contender, subscribers: int, channels: int) -> None:
    """Start one server, connect its subscribers, and measure connects/s and RSS."""
    args, label, run = ctx.args, c.label, c.run
    ctx.progress.status(f"{label} measuring background load")
    run["background_busy"] = await background_busy(1.0)
    if max(run["background_busy"]) > 0.15:
        shares = "/".join(f"{b:.0%}" for b in run["background_busy"])
        ctx.progress.done(f"{label} warning: cores already busy {shares} before starting")
    ctx.progress.status(f"{label} starting server")
    try:
        c.target = servers.start_server(c.name, ctx.redis_port, ctx.logdir)
        await asyncio.sleep(0.5)
        rss_before = processes.rss_kib(c.target.managed.pid)

        def on_progress(event: dict[str, Any]) -> None:
            ctx.progress.status(
                f"{label} connecting {event['subscribed']:,}/{subscribers:,}"
                f" ({event['failed']} failed)"
            )

        cpu_before = processes.cpu_seconds(c.target.managed.pid)
        c.gen, ready = await control.Loadgen.start(
            c.target.port,
            c.target.path,
            subscribers,
            channels,
            c.channel_name,
            args.concurrency,
            ctx.logdir,
            on_progress,
            limit_s=120,
            token_secret=c.target.secret if args.unique_tokens else None,
        )
        connect_cpu_s = processes.cpu_seconds(c.target.managed.pid) - cpu_before
        await asyncio.sleep(1.0 if args.idle else 0.5)
        rss_after = processes.rss_kib(c.target.managed.pid)
    except Exception as exc:  # record it and go on with the other servers
        fail(ctx, c, exc)
        return
    ok = ready["subscribed"]
    c.per_channel = ready["per_channel"]
    c.out = not ok
    run["connect"] = {
        "subscribed": ok,
        "failed": ready["failed"],
        "failures": ready["failures"],
        "seconds": ready["connect_s"],
        "per_s": ok / ready["connect_s"] if ready["connect_s"] else 0.0,
        "generator_cpu_fraction": ready["connect_cpu_s"] / max(ready["connect_s"], 1e-3),
        # The server's own cost, whoever set the pace (the generator may, at small counts).
        "server_cpu_us_per_connect": connect_cpu_s * 1e6 / ok if ok else None,
    }
    run["rss_kib"] = {
        "before": rss_before,
        "after": rss_after,
        "per_connection": (rss_after - rss_before) / ok if ok else None,
    }
    ctx.progress.done(
        f"{label} {ok:,} subscribed in {ready['connect_s']:.2f}s"
        f" ({run['connect']['per_s']:,.0f}/s), {ready['failed']} failed;"
        f" RSS {rss_before:,}→{rss_after:,} KiB"
    )
    if ready["failed"]:
        ctx.progress.done(f"{label} connect failures: {ready['failures']}")


def fail(ctx: Context, c: Contender, exc: Exception) -> None:
    """Record an error for one server, show its log tail, and take it out of the run."""
    c.run["error"] = f"{type(exc).__name__}: {exc}"
    c.out = True
    ctx.progress.done(f"{c.label} ERROR {c.run['error'].splitlines()[0]}")
    tail = logtail(ctx.logdir, c.name)
    if tail:
        ctx.progress.done(f"log of {c.name}:\n{tail}")


async def run_rates(
    ctx: Context, contenders: list[Contender], subscribers: int, channels: int
) -> None:
    """The rate steps of one scenario, interleaved across servers (and peak verdicts)."""
    args = ctx.args
    rates = step_rates(args, subscribers, channels)
    if args.warmup > 0:  # first-message costs (lazy imports, allocator growth) stay unmeasured
        for c in contenders:
            if c.out:
                continue
            assert c.gen is not None and c.target is not None
            try:
                await run_step(
                    ctx, c.gen, c.target, f"{c.label} warm-up", rates[0],
                    next(ctx.step_ids), c.per_channel, c.channel_name, args.warmup,
                )  # fmt: skip
            except Exception as exc:
                fail(ctx, c, exc)
    for i, rate in enumerate(rates, 1):
        order = contenders if i % 2 else contenders[::-1]
        for c in order:
            if c.out:
                continue
            assert c.gen is not None and c.target is not None
            try:
                step = await run_step(
                    ctx, c.gen, c.target, f"{c.label} step {i}/{len(rates)}", rate,
                    next(ctx.step_ids), c.per_channel, c.channel_name, args.duration,
                )  # fmt: skip
            except Exception as exc:
                fail(ctx, c, exc)
                continue
            c.run["steps"].append(step)
            ctx.progress.done(f"{c.label} {report.step_line(step)}")
            if args.peak:
                c.out = step["failed"]
                c.best = c.best if step["failed"] else step
        if all(c.out for c in contenders):
            break
    if args.peak:
        for c in contenders:
            best = c.best
            c.run["peak"] = (
                {"rate": best["rate"], "deliveries_per_s": best["deliveries_per_s"]}
                if best
                else None
            )


def check_fd_budget(args: argparse.Namespace, hard: int) -> str | None:
    """Each side of every connection needs a descriptor in its own process."""
    need = max(args.subscribers) + FD_MARGIN
    if need > hard:
        return (
            f"{max(args.subscribers):,} subscribers need about {need:,} file descriptors"
            f" per process but the hard RLIMIT_NOFILE is {hard:,};"
            f" use at most {hard - FD_MARGIN:,} or raise the hard limit"
        )
    return None


async def amain(args: argparse.Namespace) -> int:
    main_task = asyncio.current_task()
    assert main_task is not None  # SIGTERM unwinds like Ctrl-C: every child gets stopped
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    hard = processes.raise_fd_limit()
    problem = check_fd_budget(args, hard)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if "taskset" not in processes.pinned(["x"], 1)[0]:
        print("note: taskset or a second CPU is missing; processes are not pinned")
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="wsbench-") as tmp:
        logdir = Path(tmp)
        redis, redis_port = processes.start_redis(logdir, control.LOAD_CPU)
        ctx = Context(args, redis_port, logdir)
        runs = []
        try:
            for subscribers in args.subscribers:
                for channels in args.channels if not args.idle else args.channels[:1]:
                    runs += await run_scenario(ctx, subscribers, channels)
        finally:
            redis.stop()
    results = {
        "meta": {
            "started": started.isoformat(),
            "finished": dt.datetime.now(dt.UTC).isoformat(),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pinned": "taskset" in processes.pinned(["x"], 1)[0],
            "fd_limit": hard,
            "peers": servers.node_peer_versions() if "node" in args.servers else {},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
        "runs": runs,
    }
    path = report.write_json(results, args.results, started)
    print(report.render(results))
    print(f"\nresults: {path}")
    if not args.no_plot and not args.idle:
        print(report.plot(results, path.with_suffix(".png")))
    return 0 if all("error" not in r for r in runs) else 1


def logtail(logdir: Path, name: str) -> str:
    path = logdir / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-15:]) if path.exists() else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(AttributeError, OSError):  # keep the harness off the server core
        os.sched_setaffinity(0, {control.LOAD_CPU})
    try:
        return asyncio.run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130

"""Turning measurements into something to read: the table, the JSON file, the plot.

The table puts wsbroker and its peers (the floor, Node's ``ws``) side by side
per scenario and rate, with a ``wsbroker ÷ <peer>`` row per figure: above 1
means wsbroker spends more (memory, CPU, latency) or, for rates, achieves more.
matplotlib is optional: without it the PNG is skipped with a note.
"""

from __future__ import annotations

import datetime as dt
import importlib
from pathlib import Path
from typing import Any

import orjson

PEERS = ("floor", "node")


def ratio_label(peer: str) -> str:
    return f"wsbroker ÷ {peer}"


HISTORY_RATIO = "history ÷ wsbroker"


def write_json(results: dict[str, Any], directory: Path, started: dt.datetime) -> Path:
    """Write ``<directory>/<UTC timestamp>.json`` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return path


def num(value: float | None, digits: int = 2) -> str:
    """Compact number: thousands separators for big values, fixed decimals for small."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def step_line(step: dict[str, Any]) -> str:
    """One-line summary of a finished rate step (for the progress log)."""
    lat = step["latency_ms"]
    verdict = " FAIL" if step["failed"] else ""
    flags = f" [{', '.join(step['flags'])}]" if step["flags"] else ""
    return (
        f"rate {step['rate']:g}/s: {step['delivered']:,}/{step['expected']:,} delivered"
        f" ({num(step['deliveries_per_s'])}/s), p50 {num(lat['p50'])} p99 {num(lat['p99'])}"
        f" max {num(lat['max'])} ms, {num(step['server_cpu_us_per_delivery'])} µs CPU/delivery,"
        f" gen {step['generator_cpu_fraction']:.0%}{verdict}{flags}"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        rest = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *rest]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _scenarios(results: dict[str, Any]) -> dict[tuple[int, int, str], list[dict[str, Any]]]:
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for run in results["runs"]:
        s = run["scenario"]
        groups.setdefault((s["subscribers"], s["channels"], s["mode"]), []).append(run)
    return groups


def _by_server(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["server"]: r for r in runs}


def _connect_table(runs: list[dict[str, Any]]) -> str:
    header = ["server", "connects/s", "µs CPU/conn", "failed", "RSS before KiB",
              "RSS after KiB", "KiB/conn"]
    header.append("bg busy % c0/c1")
    rows = []
    for run in runs:
        background = "/".join(f"{100 * b:.0f}" for b in run.get("background_busy", []))
        if "connect" not in run:
            rows.append([run["server"], "error", "", "", "", "", "", background])
            continue
        c, m = run["connect"], run["rss_kib"]
        rows.append(
            [
                run["server"],
                num(c["per_s"]),
                num(c.get("server_cpu_us_per_connect")),
                str(c["failed"]),
                f"{m['before']:,}",
                f"{m['after']:,}",
                num(m["per_connection"]),
                background,
            ]
        )
    srv = _by_server(runs)
    for peer in PEERS:
        if {"wsbroker", peer} <= srv.keys() and all("connect" in srv[k] for k in srv):
            w, f = srv["wsbroker"], srv[peer]
            rows.append(
                [
                    ratio_label(peer),
                    ratio(w["connect"]["per_s"], f["connect"]["per_s"]),
                    ratio(w["connect"].get("server_cpu_us_per_connect"),
                          f["connect"].get("server_cpu_us_per_connect")),
                    "",
                    "",
                    "",
                    ratio(w["rss_kib"]["per_connection"], f["rss_kib"]["per_connection"]),
                    "",
                ]
            )
    return _table(header, rows)


STEP_FIGURES: list[tuple[str, Any]] = [
    ("deliv/s", lambda s: s["deliveries_per_s"]),
    ("p50 ms", lambda s: s["latency_ms"]["p50"]),
    ("p99 ms", lambda s: s["latency_ms"]["p99"]),
    ("max ms", lambda s: s["latency_ms"]["max"]),
    ("µs CPU/deliv", lambda s: s["server_cpu_us_per_delivery"]),
    ("srv CPU %", lambda s: 100 * s["server_cpu_fraction"]),
    ("srv core %", lambda s: 100 * s["server_core_busy"]),
]


def _steps_table(runs: list[dict[str, Any]]) -> str:
    header = ["rate msg/s", "server", "deliv/s", "loss", "dups"]
    header += [name for name, _ in STEP_FIGURES[1:]] + ["gen CPU %", "load core %", "flags"]
    depth = max(len(r["steps"]) for r in runs)
    rows = []
    for i in range(depth):  # same index = same rate: every server runs the same ladder
        steps = {r["server"]: r["steps"][i] for r in runs if i < len(r["steps"])}
        rate = next(iter(steps.values()))["rate"]
        for server, s in steps.items():
            figures = [num(get(s)) for _, get in STEP_FIGURES]
            rows.append(
                [
                    f"{rate:g}",
                    server,
                    figures[0],
                    f"{s['undelivered_at_deadline']:,}",
                    str(s["dups"]),
                    *figures[1:],
                    f"{100 * s['generator_cpu_fraction']:.0f}",
                    f"{100 * s['load_core_busy']:.0f}",
                    ",".join(s["flags"]) + (" FAIL" if s["failed"] else ""),
                ]
            )
        for peer in PEERS:
            if {"wsbroker", peer} <= steps.keys():
                w, f = steps["wsbroker"], steps[peer]
                cells = [ratio(get(w), get(f)) for _, get in STEP_FIGURES]
                rows.append(["", ratio_label(peer), cells[0], "", "", *cells[1:], "", "", ""])
        if {"wsbroker", "history"} <= steps.keys():  # the price of offsets and recovery
            h, w = steps["history"], steps["wsbroker"]
            cells = [ratio(get(h), get(w)) for _, get in STEP_FIGURES]
            rows.append(["", HISTORY_RATIO, cells[0], "", "", *cells[1:], "", "", ""])
    return _table(header, rows)


def _peak_lines(runs: list[dict[str, Any]]) -> str:
    peaks = {r["server"]: (r.get("peak") or {}).get("deliveries_per_s") for r in runs}
    parts = [f"{server} {num(value)}" for server, value in peaks.items()]
    line = "peak lossless deliveries/s (p99 under the ceiling): " + ", ".join(parts)
    for peer in PEERS:
        if "wsbroker" in peaks and peer in peaks:
            line += f"; {ratio_label(peer)} = {ratio(peaks['wsbroker'], peaks[peer])}"
    return line


def render(results: dict[str, Any]) -> str:
    """The whole human-readable report."""
    out = []
    for (subscribers, channels, mode), runs in _scenarios(results).items():
        title = f"{subscribers:,} subscribers × {channels} channel{'s' * (channels > 1)} ({mode})"
        out += ["", f"== {title} ==", _connect_table(runs)]
        for run in runs:
            if "error" in run:
                out.append(f"{run['server']}: ERROR {run['error'].splitlines()[0]}")
        if mode != "idle" and any(r["steps"] for r in runs):
            out += ["", _steps_table(runs)]
        if mode == "peak":
            out += ["", _peak_lines(runs)]
    if any(r["steps"] for r in results["runs"]):
        out += FOOTNOTES
    return "\n".join(out)


FOOTNOTES = [
    "",
    "loss = deliveries missing at the drain deadline; µs CPU/deliv = server process CPU"
    " time ÷ deliveries;",
    "srv/gen CPU % = the process's share of one core while delivering; srv/load core % ="
    " the whole core,",
    "softirq (loopback TCP) and other tenants included. Ratios > 1: wsbroker spends or"
    " achieves more.",
]


def plot(results: dict[str, Any], path: Path) -> str:
    """Latency and deliveries/s against the published rate, if matplotlib is there."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, (ax_lat, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in results["runs"]:
        steps = run["steps"]
        if not steps:
            continue
        s = run["scenario"]
        name = f"{run['server']} {s['subscribers']}×{s['channels']}ch"
        rates = [st["rate"] for st in steps]
        ax_lat.plot(rates, [st["latency_ms"]["p99"] for st in steps], marker="o", label=name)
        ax_rate.plot(rates, [st["deliveries_per_s"] for st in steps], marker="o", label=name)
    for ax, ylabel in ((ax_lat, "p99 latency (ms)"), (ax_rate, "deliveries/s achieved")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("published messages/s")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"

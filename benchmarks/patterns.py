"""Permission checks against the number of patterns a token carries.

``python -m benchmarks.patterns`` times ``PatternSet.matches`` (what every
``subscribe``/``publish`` asks) for tokens of 1 … 1,024 patterns, half exact
names and half wildcards, against a channel no pattern grants (the whole set
must be ruled out) and one the last pattern grants. Beside it, the same check
as a scan of every pattern, which is what it was before the index. The cost
of the indexed check should stay flat as the count grows; the scan's grows
linearly. (Tokens are capped at 256 patterns per claim; 1,024 shows the trend.)
"""

from __future__ import annotations

import argparse
import timeit

from wsbroker.channels import Pattern, PatternSet


def token_patterns(count: int) -> list[str]:
    """A plausible mix: rooms by name, team wildcards, per-user trees."""
    kinds = (lambda i: f"room.{i}", lambda i: f"team.{i}.*", lambda i: f"room.{i}.chat",
             lambda i: f"user.{i}.>")
    return [kinds[i % len(kinds)](i) for i in range(count)]


def per_check_ns(check: object, channel: str, number: int) -> float:
    timer = timeit.Timer(lambda: check(channel))  # type: ignore[operator]
    return min(timer.repeat(repeat=5, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="checks per timing")
    args = parser.parse_args()
    print(f"{'patterns':>8} | {'indexed, denied':>15} | {'indexed, granted':>16} | "
          f"{'scan, denied':>12} | {'scan, granted':>13}   (ns per check)")
    for count in (1, 4, 16, 64, 256, 1024):
        texts = token_patterns(count)
        indexed = PatternSet.parse(texts)
        compiled = [Pattern.parse(text) for text in texts]

        def scan(channel: str, compiled: list[Pattern] = compiled) -> bool:
            return any(pattern.matches(channel) for pattern in compiled)

        last = texts[-1].replace("*", "x").replace(">", "inbox")
        denied = "team.999999.general"
        assert indexed.matches(last) and scan(last)
        assert not indexed.matches(denied) and not scan(denied)
        number = args.number if count <= 256 else args.number // 4
        print(f"{count:>8} | {per_check_ns(indexed.matches, denied, args.number):>15.0f} | "
              f"{per_check_ns(indexed.matches, last, args.number):>16.0f} | "
              f"{per_check_ns(scan, denied, number):>12.0f} | "
              f"{per_check_ns(scan, last, number):>13.0f}")


if __name__ == "__main__":
    main()

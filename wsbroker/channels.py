"""Channel names and the ``*`` / ``>`` patterns that grant access to them (SPEC §3).

A channel is one or more dot-separated segments of ``A–Z a–z 0–9 _ - : @ = +``,
1–255 characters in all. Patterns use the same segments plus ``*`` (exactly one
segment) and ``>`` (one or more trailing segments, last position only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

MAX_CHANNEL_LENGTH = 255

_SEGMENT = r"[A-Za-z0-9_\-:@=+]+"
_CHANNEL_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")


class InvalidPattern(ValueError):
    """A permission pattern that is not a valid channel pattern."""


def is_valid_channel(name: object) -> bool:
    """True for a concrete channel name (no wildcards)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_CHANNEL_LENGTH
        and _CHANNEL_RE.fullmatch(name) is not None
    )


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled channel pattern; ``matches`` is a segment-wise comparison."""

    text: str
    segments: tuple[str, ...]
    tail: bool  # ends in ``>``

    @classmethod
    def parse(cls, text: str) -> Pattern:
        return _parse_pattern(text)

    def matches(self, channel: str) -> bool:
        parts = channel.split(".")
        if self.tail:
            if len(parts) <= len(self.segments):
                return False
        elif len(parts) != len(self.segments):
            return False
        return all(want in ("*", got) for want, got in zip(self.segments, parts, strict=False))


@lru_cache(maxsize=4096)
def _parse_pattern(text: str) -> Pattern:
    if not isinstance(text, str) or not 0 < len(text) <= MAX_CHANNEL_LENGTH:
        raise InvalidPattern(f"{text!r} is not a channel pattern")
    parts = text.split(".")
    tail = parts[-1] == ">"
    body = parts[:-1] if tail else parts
    for part in body:
        if part != "*" and re.fullmatch(_SEGMENT, part) is None:
            raise InvalidPattern(f"{text!r} is not a channel pattern")
    return Pattern(text, tuple(body), tail)


class _Node:
    """One segment position in a :class:`PatternSet`'s index of wildcard patterns."""

    __slots__ = ("children", "end", "star", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}  # literal next segment → node
        self.star: _Node | None = None  # ``*`` as the next segment
        self.end = False  # a pattern ends here
        self.tail = False  # a pattern ends here with ``>``: any 1+ further segments

    def add(self, pattern: Pattern) -> None:
        node = self
        for segment in pattern.segments:
            if segment == "*":
                node.star = node.star or _Node()
                node = node.star
            else:
                node = node.children.setdefault(segment, _Node())
        if pattern.tail:
            node.tail = True
        else:
            node.end = True

    def matches(self, parts: list[str], index: int = 0) -> bool:
        if index == len(parts):
            return self.end
        if self.tail:
            return True
        child = self.children.get(parts[index])
        if child is not None and child.matches(parts, index + 1):
            return True
        return self.star is not None and self.star.matches(parts, index + 1)


@dataclass(frozen=True, slots=True)
class PatternSet:
    """Patterns that together grant a right; empty grants nothing.

    A check costs the same however many patterns a token carries: exact names
    are one set lookup, and wildcard patterns share a tree of segments, walked
    once along the channel's own segments (only ``*`` branches can add a path,
    and only where a pattern has one).
    """

    patterns: tuple[Pattern, ...]
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _wildcards: _Node | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact = {p.text for p in self.patterns if not p.tail and "*" not in p.segments}
        wildcards = [p for p in self.patterns if p.text not in exact]
        root: _Node | None = None
        if wildcards:
            root = _Node()
            for pattern in wildcards:
                root.add(pattern)
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_wildcards", root)

    @classmethod
    def parse(cls, texts: Iterable[object]) -> PatternSet:
        """Compile patterns; raises :class:`InvalidPattern` for anything invalid."""
        compiled = []
        for text in texts:
            if not isinstance(text, str):
                raise InvalidPattern(f"{text!r} is not a channel pattern")
            compiled.append(_parse_pattern(text))
        return cls(tuple(compiled))

    def matches(self, channel: str) -> bool:
        if channel in self._exact:
            return True
        return self._wildcards is not None and self._wildcards.matches(channel.split("."))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __str__(self) -> str:
        return ",".join(pattern.text for pattern in self.patterns)

"""Channel names and the ``*`` / ``>`` patterns that grant access to them (SPEC §3).

A channel is one or more dot-separated segments of ``A–Z a–z 0–9 _ - : @ = +``,
1–255 characters in all. Patterns use the same segments plus ``*`` (exactly one
segment) and ``>`` (one or more trailing segments, last position only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class PatternSet:
    """Patterns that together grant a right; empty grants nothing."""

    patterns: tuple[Pattern, ...]

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
        return any(pattern.matches(channel) for pattern in self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __str__(self) -> str:
        return ",".join(pattern.text for pattern in self.patterns)

"""Channel names and patterns (SPEC §3), table-driven."""

from __future__ import annotations

import random

import pytest

from wsbroker.channels import InvalidPattern, Pattern, PatternSet, is_valid_channel

VALID = ["a", "prices.AAPL", "user.42.inbox", "A-Z_a:z@0=9+x", "x" * 255, "a.b.c.d.e"]
INVALID = ["", ".", "a..b", ".a", "a.", "a b", "a*", "*", ">", "prices.*", "a.>", "é",
           "x" * 256, "a/b", "a#b", None, 42, ["a"]]


@pytest.mark.parametrize("name", VALID)
def test_valid_channel_names(name: str) -> None:
    assert is_valid_channel(name)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_channel_names(name: object) -> None:
    assert not is_valid_channel(name)


MATCHES = [
    ("prices.*", "prices.AAPL", True),
    ("prices.*", "prices.AAPL.bid", False),
    ("prices.*", "prices", False),
    ("user.42.>", "user.42.inbox", True),
    ("user.42.>", "user.42.a.b", True),
    ("user.42.>", "user.42", False),
    ("user.42.>", "user.43.inbox", False),
    (">", "anything", True),
    (">", "any.thing.at.all", True),
    ("*", "one", True),
    ("*", "one.two", False),
    ("*.b.>", "a.b.c", True),
    ("*.b.>", "a.c.c", False),
    ("exact.name", "exact.name", True),
    ("exact.name", "exact.name.more", False),
    ("exact.name", "exact", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.d", False),
]


@pytest.mark.parametrize(("pattern", "channel", "expected"), MATCHES)
def test_pattern_matching(pattern: str, channel: str, expected: bool) -> None:
    assert Pattern.parse(pattern).matches(channel) is expected


@pytest.mark.parametrize("text", ["", "a..b", ".a", "a.", "a.>.b", ">.a", "a>", "a*", "a.**",
                                  "x" * 256, "a b"])
def test_invalid_patterns_are_refused(text: str) -> None:
    with pytest.raises(InvalidPattern):
        Pattern.parse(text)


def test_pattern_set_grants_any_match_and_empty_grants_nothing() -> None:
    patterns = PatternSet.parse(["prices.*", "user.42.>"])
    assert patterns.matches("prices.AAPL")
    assert patterns.matches("user.42.x.y")
    assert not patterns.matches("user.43.x")
    assert not PatternSet.parse([]).matches("anything")
    with pytest.raises(InvalidPattern):
        PatternSet.parse(["ok", 7])


def test_indexed_pattern_set_agrees_with_each_pattern() -> None:
    """The set's index (exact names, a segment tree of wildcards) grants exactly what
    checking every pattern one by one would, over many random patterns and channels."""
    rng = random.Random(15)
    words = ["a", "b", "c", "user", "42"]

    def pattern() -> str:
        segments = [rng.choice([*words, "*"]) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            segments.append(">")
        return ".".join(segments)

    for _ in range(200):
        texts = [pattern() for _ in range(rng.randint(0, 12))]
        patterns = PatternSet.parse(texts)
        for _ in range(50):
            channel = ".".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            expected = any(Pattern.parse(text).matches(channel) for text in texts)
            assert patterns.matches(channel) == expected, (texts, channel)

"""History rules and the in-process history, without sockets (SPEC §7)."""

from __future__ import annotations

import pytest

from wsbroker.config import ConfigError, load_settings
from wsbroker.history import HistoryRule, HistoryRules, MemoryHistory, parse_rule
from wsbroker.protocol import decode_payload


def test_a_rule_is_pattern_size_and_optional_ttl() -> None:
    assert parse_rule("chat.>=1000:24h") == HistoryRule("chat.>", 1000, 86400)
    assert parse_rule("prices.*=10") == HistoryRule("prices.*", 10, 0)
    assert parse_rule("a=5:90") == HistoryRule("a", 5, 90)
    assert parse_rule(" a = 5 : 7d ") == HistoryRule("a", 5, 7 * 86400)


@pytest.mark.parametrize("text", ["chat.>", "chat.>=", "=5", "chat.>=0", "a..b=5",
                                  "chat.>=5:soon", "chat.>=5:0", "chat.>=-1", "a=2000000"])
def test_malformed_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(text)


def test_the_first_matching_pattern_wins() -> None:
    rules = HistoryRules.parse(["chat.vip=5", "chat.>=100:1h", ">=10"])
    assert rules.rule_for("chat.vip") == HistoryRule("chat.vip", 5)
    assert rules.rule_for("chat.room") == HistoryRule("chat.>", 100, 3600)
    assert rules.rule_for("news") == HistoryRule(">", 10)
    assert HistoryRules.parse(["chat.>=1"]).rule_for("news") is None
    assert not HistoryRules()


def test_settings_parse_history_once_and_name_the_flag() -> None:
    settings = load_settings({"history": ["chat.>=100:24h", "feed.*=10"]}, {})
    assert settings.history.rule_for("feed.x") == HistoryRule("feed.*", 10)
    env = load_settings({}, {"WSB_HISTORY": "chat.>=3"})
    assert env.history.rule_for("chat.a") == HistoryRule("chat.>", 3)
    with pytest.raises(ConfigError, match="--history"):
        load_settings({"history": ["chat.>=lots"]}, {})
    with pytest.raises(ConfigError, match="--redis-prefix"):
        load_settings({"history": ["chat.>=3"], "redis_prefix": "{ws}:"}, {})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_history_numbers_trims_and_reads() -> None:
    history = MemoryHistory()
    rule = HistoryRule("a", 3)
    payloads = [history.publish("a", b"%d" % n, "u" if n == 1 else None, rule)
                for n in range(1, 6)]
    assert [published.offset for _, published in payloads] == [1, 2, 3, 4, 5]
    assert decode_payload(payloads[0][0]).sender == "u"
    stream = history.since("a", 0, 10, rule)
    assert (stream.offset, [o for o, _ in stream.entries]) == (5, [3, 4, 5])
    assert [o for o, _ in history.since("a", 3, 10, rule).entries] == [4, 5]
    assert [o for o, _ in history.since("a", 3, 1, rule).entries] == [4]
    assert history.since("a", 5, 10, rule).entries == []
    assert [o for o, _ in history.newest("a", 2, rule).entries] == [4, 5]


def test_memory_history_expires_ttl_after_the_last_publish_with_a_new_epoch() -> None:
    clock = Clock()
    history = MemoryHistory(clock)
    rule = HistoryRule("a", 10, ttl=60)
    _, first = history.publish("a", b"1", None, rule)
    clock.now += 50
    history.publish("a", b"2", None, rule)  # refreshes the TTL
    clock.now += 50
    assert history.since("a", 0, 10, rule).offset == 2  # reading does not refresh it
    clock.now += 11
    fresh = history.since("a", 0, 10, rule)
    assert (fresh.offset, fresh.entries) == (0, [])
    assert fresh.epoch != first.epoch
    _, again = history.publish("a", b"3", None, rule)
    assert (again.offset, again.epoch) == (1, fresh.epoch)


def test_memory_history_sweeps_expired_channels() -> None:
    clock = Clock()
    history = MemoryHistory(clock)
    short, kept = HistoryRule("s.>", 5, ttl=1), HistoryRule("k.>", 5)
    for index in range(100):
        history.publish(f"s.{index}", b"1", None, short)
    history.publish("k.1", b"1", None, kept)
    clock.now += 2
    history.sweep()
    assert len(history) == 1


def test_memory_history_reads_any_range_of_a_long_stream() -> None:
    history = MemoryHistory()
    rule = HistoryRule("a", 1000)
    for index in range(1, 1501):
        history.publish("a", b"%d" % index, None, rule)
    for after, count in ((0, 5), (500, 3), (700, 1000), (1495, 10), (1200, 7), (1499, 1)):
        got = [offset for offset, _ in history.since("a", after, count, rule).entries]
        first = max(after + 1, 501)
        assert got == list(range(first, min(first + count, 1501))), (after, count)
    assert [o for o, _ in history.newest("a", 3, rule).entries] == [1498, 1499, 1500]
    assert len(history.newest("a", 5000, rule).entries) == 1000

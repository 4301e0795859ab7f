"""Stream entry ids and durations as Redis wants them: pure functions, no I/O. One copy, used by
the streams I/O, the janitor's trimming, the semantic log follower and the flight locks."""

from __future__ import annotations

from datetime import timedelta


def millis(value: timedelta) -> int:
    """A duration as whole milliseconds for a Redis argument, at least 1: in BLOCK, PX and
    PEXPIRE a 0 means "for ever" or is an error, never "at once"."""
    return max(int(value.total_seconds() * 1000), 1)


def entry_time_ms(message_id: str) -> int:
    """The millisecond timestamp in a stream entry id (`1700000000000-0`)."""
    return int(message_id.split("-", 1)[0])


def id_order(message_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def older_id(a: str, b: str) -> str:
    return a if id_order(a) <= id_order(b) else b


def next_id(message_id: str) -> str:
    """The smallest id after `message_id`."""
    ms, seq = id_order(message_id)
    return f"{ms}-{seq + 1}"

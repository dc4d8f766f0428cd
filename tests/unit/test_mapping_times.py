"""Times on the wire: `timestamp` computes what protobuf's `Timestamp.FromDatetime` does."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import timestamp_pb2

from server.rpc.mapping import timestamp


def test_timestamp_matches_from_datetime_for_aware_offset_and_naive_times() -> None:
    rng = random.Random(7)
    first, last = -62135596800 + 2 * 86400, 253402300799 - 2 * 86400  # years 1 to 9999
    for _ in range(3000):
        seconds = rng.randint(first, last)
        utc = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            seconds=seconds, microseconds=rng.randint(0, 999_999)
        )
        offset = timezone(timedelta(minutes=rng.randint(-23 * 60, 23 * 60)))
        for value in (utc, utc.astimezone(offset), utc.replace(tzinfo=None)):
            expected = timestamp_pb2.Timestamp()
            expected.FromDatetime(value)
            assert timestamp(value) == expected, value
    assert timestamp(None) is None

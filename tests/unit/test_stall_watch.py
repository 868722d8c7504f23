"""StallWatch: when the processor warns that records wait but none are fetched (the embedded
broker's empty fetches far behind a long log of small batches)."""

from __future__ import annotations

from stream.kafka.lag import StallWatch


def test_warns_after_the_stall_and_then_once_per_period() -> None:
    watch = StallWatch(after_s=30)
    assert watch.observe(5, lag=100, now=0) is None  # records flow
    assert watch.observe(0, lag=100, now=10) is None
    assert watch.observe(0, lag=100, now=29.9) is None
    assert watch.observe(0, lag=100, now=30) == 30  # 30 s since the last record
    assert watch.observe(0, lag=100, now=45) is None  # warned 15 s ago
    assert watch.observe(0, lag=100, now=60) == 60  # still stalled: warn again


def test_no_warning_when_nothing_waits_or_records_come() -> None:
    watch = StallWatch(after_s=30)
    for t in range(0, 100, 5):
        assert watch.observe(0, lag=0, now=t) is None  # idle, caught up: not a stall
    for t in range(100, 200, 5):
        assert watch.observe(1, lag=500, now=t) is None  # behind but reading: not a stall


def test_a_record_restarts_the_clock() -> None:
    watch = StallWatch(after_s=30)
    watch.observe(0, lag=10, now=0)
    assert watch.observe(0, lag=10, now=25) is None
    watch.observe(3, lag=10, now=26)  # a fetch brought records
    assert watch.observe(0, lag=10, now=50) is None  # 24 s since then
    assert watch.observe(0, lag=10, now=56) == 30


def test_the_first_observation_starts_the_clock() -> None:
    watch = StallWatch(after_s=30)
    assert watch.observe(0, lag=10, now=1000) is None  # not stalled since time 0
    assert watch.observe(0, lag=10, now=1030) == 30

"""Replay a click file into the input topic at a steady rate.

Sources: `synthetic` (the seeded demo data set, generated in memory), a directory holding a
`clicks.csv` (as `streamrec generate` writes), a `.csv` file with `user_id,item_id,ts`, or a
`.jsonl` file of click events. By default each event is re-stamped with the time it is sent, so
end-to-end latency is meaningful; `keep_ts=True` keeps the file's timestamps.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from stream.badinput import malformed_records
from stream.codec import ClickEvent
from stream.producer import ClickProducer
from stream.synthetic import SyntheticConfig, generate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    sent: int
    malformed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def iter_source(source: str) -> Iterator[ClickEvent]:
    if source == "synthetic":
        _, clicks = generate(SyntheticConfig())
        for c in clicks:
            yield ClickEvent(c.user_id, c.item_id, c.ts)
        return
    path = Path(source)
    if path.is_dir():
        path = path / "clicks.csv"
    if not path.is_file():
        raise FileNotFoundError(f"replay source {source!r}: no such file (or clicks.csv in it)")
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    raw = orjson.loads(line)
                    yield ClickEvent(
                        raw["user_id"], raw["item_id"], raw["ts"], raw.get("event_type", "click")
                    )
        return
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            yield ClickEvent(row["user_id"], row["item_id"], int(row["ts"]))


def replay(
    events: Iterator[ClickEvent],
    producer: ClickProducer,
    *,
    rate: float,
    limit: int | None = None,
    keep_ts: bool = False,
    bad_ratio: float = 0.0,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> ReplayReport:
    """Send events at `rate` per second (0 = as fast as possible); optionally inject malformed
    records at `bad_ratio` of the stream to exercise the dead-letter path."""
    rng = random.Random(seed)
    start = time.monotonic()
    sent = malformed = 0
    for event in events:
        if limit is not None and sent >= limit:
            break
        if should_stop is not None and should_stop():
            break
        if rate > 0:
            # Pace against the schedule, not the previous send, so the average rate holds.
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        now = time.time_ns() // 1_000_000
        ts = event.ts if keep_ts else now
        producer.send_event(ClickEvent(event.user_id, event.item_id, ts, event.event_type), now)
        sent += 1
        if bad_ratio and rng.random() < bad_ratio:
            _, key, value = rng.choice(malformed_records(event.user_id, event.item_id, now))
            producer.send_raw(key, value)
            malformed += 1
    producer.flush()
    report = ReplayReport(sent, malformed, time.monotonic() - start)
    logger.info(
        "replayed %d events (+%d malformed) in %.1fs: %.0f events/s",
        report.sent,
        report.malformed,
        report.seconds,
        report.rate,
    )
    return report

"""What one request costs the embedded broker in CPU: produce (acks=all), commits, fetches.

`python -m benchmarks.broker_cost --out benchmarks/results/broker_cost.json`

Each kind runs alone for `--seconds` against a fresh Tansu process with a 3-partition topic.
The broker's CPU time over that window (benchmarks.cpu) divided by the requests made is its
cost per request; `fetch` reads back what the produce kinds wrote and is also given per 1,000
records. `tailing` holds a produce rate while 0-3 consumers read the topic as it grows. The
latency benchmark's CPU split showed the broker near one core at a quarter of the max rate;
this says what its requests cost and what the consumers waiting on it add.

`growth` holds a produce rate of one-record batches for `--growth-seconds` while one consumer
reads along, and samples every `--growth-every` seconds: the record batches stored so far, the
broker's cores, its CPU per fetch request (the consumer's librdkafka statistics count them) and
the consumer's delay. On Tansu 0.6.0 the cost of a fetch grows with the batches the log holds,
so a broker that has run for a while is slower than a fresh one (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from benchmarks.cpu import CpuMeter
from benchmarks.meta import run_metadata, write_result
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.admin import create_topics

PARTITIONS = 3


def measure(broker_pid: int, request: Callable[[int], None], seconds: float) -> dict[str, float]:
    """Call `request(i)` for `seconds`; its rate and the broker's CPU per call."""
    meter = CpuMeter({"broker": broker_pid})
    start, calls = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        request(calls)
        calls += 1
    used = meter.cores()
    cores, rate = used["broker"], calls / (time.monotonic() - start)
    return {
        "per_s": rate, "broker_cores": cores, "broker_ms_per_request": 1000 * cores / rate,
        "steal": used["steal"],  # cores the host withheld: a slow window, not a slow broker
    }  # fmt: skip


@contextmanager
def fresh_topic() -> Iterator[tuple[EmbeddedBroker, str]]:
    """A fresh broker process and an empty topic of PARTITIONS partitions on it."""
    with EmbeddedBroker() as broker:
        topics = TopicSettings(partitions=PARTITIONS)
        create_topics(KafkaSettings(bootstrap_servers=broker.bootstrap_servers), topics)
        yield broker, topics.clicks


def run(seconds: float, batch_sizes: list[int]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    with fresh_topic() as (broker, topic):
        servers = broker.bootstrap_servers
        producer = Producer({"bootstrap.servers": servers, "acks": "all", "linger.ms": 5})

        for size in batch_sizes:
            # `size` records over every partition, then wait for their acks (as the processor
            # does once per batch, and as a client does every linger.ms).
            def produce(i: int, size: int = size) -> None:
                for j in range(size):
                    producer.produce(topic, key=str(j).encode(), value=b"x" * 200)
                producer.flush()

            kinds[f"produce_{size}_flush"] = {
                "records": size,
                **measure(broker.pid, produce, seconds),
            }

        consumer = Consumer(
            {"bootstrap.servers": servers, "group.id": "broker-cost", "enable.auto.commit": False,
             "session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
        )  # fmt: skip
        try:
            consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])

            def commit(i: int) -> None:
                offsets = [TopicPartition(topic, p, 1 + i % 50) for p in range(PARTITIONS)]
                consumer.commit(offsets=offsets, asynchronous=False)

            kinds["commit_sync"] = {
                "partitions": PARTITIONS,
                **measure(broker.pid, commit, seconds),
            }

            # Reading back what the produce kinds wrote, from the start, as fast as it comes.
            consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            # Outside the window: the first fetch after an assign also looks up offsets and can
            # take longer than a short window (CI's 0.3 s run read nothing in it once).
            deadline = time.monotonic() + 10.0
            while not consumer.consume(1, timeout=0.5) and time.monotonic() < deadline:
                pass
            records = [0]

            def fetch(i: int) -> None:
                records[0] += len(consumer.consume(1000, timeout=0.1))

            row = measure(broker.pid, fetch, seconds)
            per_s = records[0] / seconds
            kinds["fetch"] = {
                **row,
                "records_per_s": per_s,
                "broker_ms_per_1k_records": 1e6 * row["broker_cores"] / max(per_s, 1e-9),
            }
        finally:
            consumer.close()
    return kinds


def tailing(
    seconds: float, rate: float, tailers: int, linger_ms: int, fetch_wait_ms: int
) -> dict[str, float]:
    """The broker's cores while a client produces `rate` records/s (linger `linger_ms`) and
    `tailers` consumers read the topic as it grows (as the processor and a subscriber do)."""
    with fresh_topic() as (broker, topic):
        servers = broker.bootstrap_servers
        stop = threading.Event()

        def tail(n: int) -> None:
            consumer = Consumer(
                {"bootstrap.servers": servers, "group.id": f"tail-{n}",
                 "fetch.wait.max.ms": fetch_wait_ms, "enable.auto.commit": False}
            )  # fmt: skip
            consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            try:
                while not stop.is_set():
                    consumer.consume(1000, timeout=0.05)
            finally:
                consumer.close()

        threads = [threading.Thread(target=tail, args=(n,)) for n in range(tailers)]
        for thread in threads:
            thread.start()
        producer = Producer({"bootstrap.servers": servers, "linger.ms": linger_ms})
        try:
            time.sleep(1.0)  # the consumers' first fetches
            meter, start, sent = CpuMeter({"broker": broker.pid}), time.monotonic(), 0
            while (elapsed := time.monotonic() - start) < seconds:
                while sent < elapsed * rate:
                    producer.produce(topic, key=str(sent % 1000).encode(), value=b"x" * 120)
                    sent += 1
                producer.poll(0)
                time.sleep(0.001)
            cores = meter.cores()
            producer.flush()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    return {
        "records_per_s": sent / seconds, "tailers": tailers, "linger_ms": linger_ms,
        "fetch_wait_ms": fetch_wait_ms, "broker_cores": cores["broker"], "steal": cores["steal"],
    }  # fmt: skip


TAILING = [(0, 5, 20), (1, 5, 20), (3, 5, 20), (3, 50, 20), (3, 5, 100)]  # tailers, linger, wait


def growth(
    seconds: float, rate: float, every: float, reader: bool = True
) -> list[dict[str, float]]:
    """Samples of the broker's cost as its log grows: a client sends `rate` records/s, one
    record per batch (as a client at linger.ms 0-5 does at low rates), and one consumer reads
    them as they come (fetch wait 20 ms, the processor's); without `reader` nobody fetches,
    which separates the produce requests' share. Each value is its send time."""
    with fresh_topic() as (broker, topic):
        servers = broker.bootstrap_servers
        fetches = [0]

        def on_stats(raw: str) -> None:
            brokers = json.loads(raw).get("brokers", {}).values()
            fetches[0] = sum(b.get("req", {}).get("Fetch", 0) for b in brokers)

        producer = Producer({"bootstrap.servers": servers, "linger.ms": 0, "batch.num.messages": 1})
        consumer = Consumer(
            {"bootstrap.servers": servers, "group.id": "growth", "enable.auto.commit": False,
             "fetch.wait.max.ms": 20, "statistics.interval.ms": 500, "stats_cb": on_stats}
        )  # fmt: skip
        samples: list[dict[str, float]] = []
        try:
            if reader:
                consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            start = time.monotonic()
            sent = received = 0
            delays: list[float] = []
            meter, window, fetched0 = CpuMeter({"broker": broker.pid}), start, fetches[0]
            while (now := time.monotonic()) - start < seconds:
                while sent < (now - start) * rate:
                    producer.produce(
                        topic, value=repr(time.time()).encode(), partition=sent % PARTITIONS
                    )
                    sent += 1
                producer.poll(0)
                for msg in consumer.consume(1000, timeout=0.002) if reader else ():
                    if msg.error() is None:
                        received += 1
                        delays.append(time.time() - float(msg.value() or b"nan"))
                if now - window >= every:
                    cores = meter.cores()
                    requests, span = fetches[0] - fetched0, now - window
                    samples.append({
                        "seconds": now - start, "batches_stored": sent, "received": received,
                        "broker_cores": cores["broker"], "steal": cores["steal"],
                        "fetches_per_s": requests / span,
                        "broker_ms_per_fetch": 1000 * cores["broker"] * span / max(requests, 1),
                        "delay_ms_p50": 1000 * float(np.median(delays)) if delays else math.nan,
                    })  # fmt: skip
                    meter.start()
                    window, fetched0, delays = now, fetches[0], []
        finally:
            consumer.close()
            producer.flush(5)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/broker_cost.json"))
    parser.add_argument("--seconds", type=float, default=5.0, help="per request kind")
    parser.add_argument("--batch-sizes", default="1,20,200", help="records per produce+flush")
    parser.add_argument("--tail-rate", type=float, default=3800.0, help="records/s, tailing runs")
    parser.add_argument("--growth-seconds", type=float, default=60.0)
    parser.add_argument("--growth-every", type=float, default=5.0)
    parser.add_argument("--growth-rate", type=float, default=1000.0, help="one-record batches/s")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    kinds = run(args.seconds, sizes)
    for name, row in kinds.items():
        print(f"{name}: {row['per_s']:.0f}/s, broker {row['broker_cores']:.2f} cores, "
              f"{row['broker_ms_per_request']:.2f} ms of broker CPU each")  # fmt: skip
    tails = [tailing(args.seconds, args.tail_rate, *setting) for setting in TAILING]
    for row in tails:
        print(f"{row['tailers']} tailing (fetch wait {row['fetch_wait_ms']} ms), producer "
              f"linger {row['linger_ms']} ms: broker {row['broker_cores']:.2f} cores")  # fmt: skip
    grown = growth(args.growth_seconds, args.growth_rate, args.growth_every)
    alone = growth(args.growth_seconds, args.growth_rate, args.growth_every, reader=False)
    for row in grown:
        print(f"{row['batches_stored']:.0f} batches stored: broker {row['broker_cores']:.2f} "
              f"cores, {row['broker_ms_per_fetch']:.2f} ms per fetch, consumer delay p50 "
              f"{row['delay_ms_p50']:.0f} ms")  # fmt: skip
    result = {
        **run_metadata(), "seconds": args.seconds, "kinds": kinds, "tailing": tails,
        "growth": {
            "rate": args.growth_rate, "partitions": PARTITIONS, "samples": grown,
            "produce_only": alone,  # the same sends with no reader: the produce requests' share
        },
    }  # fmt: skip
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`streamrec train --from-topic clicks`: the click topic itself becomes the training data.

    streamrec train --from-topic clicks --bootstrap-servers host:9092 --out runs/r1 \\
        --catalogue models/ [--until-offset N | --until-ts MS] [--publish models/]

Every partition is read from its start to its end at the time of reading (or to offset N,
exclusive, in each partition); clicks are decoded and validated with the processor's codec, so
exactly the events serving accepts become training data (malformed records, unknown items when
a catalogue is given, and clicks after --until-ts are skipped and counted; a user's `forget`
request removes their earlier clicks). Each user's clicks
are ordered by event time, then partition and offset, and written as a `synthetic:DIR` data set
(items.csv + clicks.csv, model/data.py). The model is trained on it, exported as a bundle with a
new model version and, with --publish, made the models root's CURRENT bundle, which a running
processor hot-reloads: clicks -> model -> recommendations -> clicks.

This module never imports torch, model/ or the ONNX exporter: the CLI hands it a
`train_and_export(args) -> (checkpoint, bundle dir) | None` callable (export/cli.py) that
imports them when the subcommand runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from stream.batch import Forget, control_of, decode_control
from stream.codec import ClickEvent, decode_click
from stream.config import CodecLimits, KafkaSettings, ProcessorSettings
from stream.errors import KafkaError as StreamKafkaError
from stream.errors import StreamError
from stream.kafka.admin import partition_count
from stream.kafka.clients import make_consumer

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]
Catalogue = list[tuple[str, str, str]]  # (item_id, title, genres)


class _Anything:
    def __contains__(self, item: object) -> bool:
        return True


@dataclass(frozen=True)
class Click:
    user_id: str
    item_id: str
    ts: int  # event time, epoch ms
    partition: int
    offset: int


@dataclass
class ReadReport:
    records: int = 0
    valid: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    seconds: float = 0.0


def read_clicks(
    kafka: KafkaSettings,
    topic: str,
    *,
    known_items: Container[str] | None = None,
    until_offset: int | None = None,
    until_ts: int | None = None,
    limits: CodecLimits | None = None,
    timeout_s: float = 300.0,
) -> tuple[list[Click], ReadReport]:
    """Valid clicks of every partition from its start to its end (or until_offset, exclusive);
    clicks with ts > until_ts (epoch ms) are skipped. Never commits: a throwaway group."""
    started = time.monotonic()
    report, clicks = ReadReport(), []
    catalogue = known_items if known_items is not None else _Anything()
    limits = limits or CodecLimits()
    now_ms = int(time.time() * 1000)
    partitions = partition_count(kafka, topic)
    group = f"streamrec-retrain-{uuid.uuid4().hex[:8]}"
    consumer = make_consumer(kafka, group, **{"enable.partition.eof": True})
    pending = set(range(partitions))
    forgotten: dict[str, int] = {}  # user -> offset of their latest forget request
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        while pending:
            if time.monotonic() - started > timeout_s:
                raise StreamError(
                    f"reading {topic} took over {timeout_s:.0f}s; raise --read-timeout"
                )
            for msg in consumer.consume(10_000, timeout=0.2):
                partition, offset, err = msg.partition(), msg.offset(), msg.error()
                assert partition is not None
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise StreamKafkaError(f"reading {topic} failed: {err.str()}", err.name())
                    pending.discard(partition)
                    continue
                assert offset is not None
                if until_offset is not None and offset >= until_offset:
                    pending.discard(partition)
                    continue
                report.records += 1
                control = control_of(msg)
                if control is not None:
                    request = decode_control(control, msg.key(), msg.value())
                    if isinstance(request, Forget):
                        forgotten[request.user_id] = offset
                    continue
                event = decode_click(
                    msg.key(), msg.value(), known_items=catalogue, now_ms=now_ms, limits=limits
                )
                if not isinstance(event, ClickEvent):
                    report.skipped[event.reason] += 1
                elif until_ts is not None and event.ts > until_ts:
                    report.skipped["after_until_ts"] += 1
                else:
                    clicks.append(Click(event.user_id, event.item_id, event.ts, partition, offset))
    finally:
        consumer.close()
    # A forget request erases the user's earlier clicks from training data too (same key, so
    # same partition: offsets compare).
    kept = [c for c in clicks if c.offset > forgotten.get(c.user_id, -1)]
    if len(kept) < len(clicks):
        report.skipped["forgotten"] += len(clicks) - len(kept)
    clicks = kept
    report.valid, report.seconds = len(clicks), time.monotonic() - started
    return clicks, report


def write_dataset(out_dir: Path, clicks: list[Click], catalogue: Catalogue | None) -> Path:
    """A `synthetic:DIR` data set: items.csv (the catalogue, or the clicked items in order of
    first click) and clicks.csv ordered by event time, partition, offset."""
    if not clicks:
        raise StreamError("the topic holds no valid clicks up to the bound: nothing to train on")
    ordered = sorted(clicks, key=lambda c: (c.ts, c.partition, c.offset))
    if catalogue is None:
        first_seen = dict.fromkeys(c.item_id for c in ordered)
        catalogue = [(item, "", "") for item in first_seen]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("item_id", "title", "genres"))
        writer.writerows(catalogue)
    with (out_dir / "clicks.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("user_id", "item_id", "ts"))
        writer.writerows((c.user_id, c.item_id, c.ts) for c in ordered)
    return out_dir


def read_catalogue(path: Path) -> Catalogue:
    """Items of a bundle, a models root (its CURRENT bundle), a synthetic data directory or an
    items.csv with item_id,title[,genres]."""
    from export.bundle import load_bundle
    from stream.reload import resolve

    path = resolve(path)
    if (path / "manifest.json").is_file():
        bundle = load_bundle(path)
        titles = bundle.title_map()
        return [(i, titles.get(i, ""), "") for i in bundle.item_ids[1:]]
    items_csv = path / "items.csv" if path.is_dir() else path
    if not items_csv.is_file():
        raise StreamError(f"{path}: no bundle, models root or items.csv to take the catalogue from")
    with items_csv.open(newline="", encoding="utf-8") as fh:
        return [
            (r["item_id"], r.get("title") or "", r.get("genres") or "") for r in csv.DictReader(fh)
        ]


# args -> (checkpoint, bundle dir), None when training failed (export.cli.train_and_export)
TrainAndExport = Callable[[argparse.Namespace], "tuple[Path, Path] | None"]


def add_from_topic_args(
    train: argparse.ArgumentParser, settings_of: Any, train_and_export: TrainAndExport
) -> None:
    """Give `streamrec train` the --from-topic options; `settings_of(args)` builds the
    ProcessorSettings (flags, environment, --config) for the Kafka connection and
    `train_and_export(args)` trains on `args.data` and writes the bundle."""
    g = train.add_argument_group("training from the click topic (instead of --data)")
    g.add_argument("--from-topic", metavar="TOPIC", help="read the training clicks from TOPIC")
    g.add_argument("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,...]")
    g.add_argument("--config", type=Path, help="JSON settings file (Kafka connection)")
    g.add_argument("--until-offset", type=int, help="per partition, offsets below this only")
    g.add_argument("--until-ts", type=int, help="only clicks with ts <= this (epoch ms)")
    g.add_argument(
        "--catalogue", type=Path, help="bundle, models root or items.csv: the item catalogue"
    )
    g.add_argument("--bundle-out", type=Path, help="bundle directory (default OUT/bundle)")
    g.add_argument("--model-version", help="the new bundle's model version (default: generated)")
    g.add_argument("--publish", type=Path, metavar="ROOT", help="publish to a models root")
    g.add_argument("--read-timeout", type=float, default=300.0, help="seconds to read the topic")
    plain: Handler = train.get_default("func")

    def handler(args: argparse.Namespace) -> int:
        if args.from_topic is None:
            return plain(args)
        return run_from_topic(args, settings_of(args), train_and_export)

    train.set_defaults(func=handler)


def run_from_topic(
    args: argparse.Namespace, settings: ProcessorSettings, train_and_export: TrainAndExport
) -> int:
    if args.data is not None:
        print("train: give --data or --from-topic, not both", file=sys.stderr)
        return 2
    catalogue = read_catalogue(args.catalogue) if args.catalogue else None
    known = {item for item, _, _ in catalogue} if catalogue is not None else None
    clicks, report = read_clicks(
        settings.kafka,
        args.from_topic,
        known_items=known,
        until_offset=args.until_offset,
        until_ts=args.until_ts,
        limits=settings.limits,
        timeout_s=args.read_timeout,
    )
    logger.info(
        "read %d records of %s in %.1f s: %d valid clicks, skipped %s",
        report.records,
        args.from_topic,
        report.seconds,
        report.valid,
        dict(report.skipped),
    )
    data_dir = write_dataset(Path(args.out) / "data", clicks, catalogue)
    args.data = f"synthetic:{data_dir}"
    trained = train_and_export(args)
    if trained is None:
        return 1
    checkpoint, bundle_dir = trained
    from export.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if args.publish is not None:
        from stream.reload import publish

        publish(bundle_dir, args.publish)
    summary = {
        "topic": args.from_topic,
        "records": report.records,
        "clicks": report.valid,
        "skipped": dict(report.skipped),
        "users": len({c.user_id for c in clicks}),
        "items": bundle.num_items,
        "data": str(data_dir),
        "checkpoint": str(checkpoint),
        "bundle": str(bundle_dir),
        "model_version": bundle.model_version,
        "published": str(args.publish) if args.publish is not None else None,
    }
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0

"""`streamrec`: one command, many subcommands.

Serving subcommands need only the serving core; `train`, `evaluate` and `export` import torch
inside their handlers, so `streamrec --help` and `streamrec run` work without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from export.bundle import load_bundle
from export.errors import ExportError
from stream.config import ProcessorSettings
from stream.errors import StreamError
from stream.logs import setup_logging

logger = logging.getLogger("streamrec")
Handler = Callable[[argparse.Namespace], int]


def _kafka_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,...]")
    p.add_argument("--config", type=Path, help="JSON settings file (below env and flags)")
    p.add_argument("--clicks-topic")
    p.add_argument("--recs-topic")
    p.add_argument("--dlq-topic")
    p.add_argument("--items-topic")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(args: argparse.Namespace, **flags: Any) -> ProcessorSettings:
    """Defaults < config file < STREAMREC_* environment < command-line flags."""
    merged: dict[str, Any] = {}
    if getattr(args, "config", None):
        merged = json.loads(Path(args.config).read_text(encoding="utf-8"))
    merged = _deep_merge(merged, ProcessorSettings().model_dump(exclude_unset=True))
    cli: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if getattr(args, "bootstrap_servers", None):
        cli["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    topics = {
        name: getattr(args, f"{name}_topic", None)
        for name in ("clicks", "recs", "dlq", "items")
        if getattr(args, f"{name}_topic", None)
    }
    if getattr(args, "partitions", None):
        topics["partitions"] = args.partitions
    if topics:
        cli["topics"] = topics
    return ProcessorSettings(**_deep_merge(merged, cli))


def _install_stop(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        logger.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# -- handlers --------------------------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from stream.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port, host=args.host)
    stopping: list[int] = []
    _install_stop(lambda: stopping.append(1))
    with broker:
        print(f"embedded broker (Tansu) ready on {broker.bootstrap_servers}", flush=True)
        while not stopping and broker.running():
            time.sleep(0.2)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from stream.kafka.admin import create_topics

    settings = load_settings(args)
    result = create_topics(settings.kafka, settings.topics)
    for name, outcome in result.items():
        print(f"{name}: {outcome}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from stream.synthetic import SyntheticConfig, generate, write_dataset

    config = SyntheticConfig(num_users=args.users, num_items=args.items, seed=args.seed)
    items, clicks = generate(config)
    write_dataset(args.out, items, clicks, config)
    print(f"wrote {len(items)} items and {len(clicks)} clicks to {args.out}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from stream.producer import ClickProducer
    from stream.replay import iter_source, replay

    settings = load_settings(args)
    stopping: list[int] = []
    _install_stop(lambda: stopping.append(1))
    producer = ClickProducer(settings.kafka, settings.topics.clicks, settings.limits)
    report = replay(
        iter_source(args.source),
        producer,
        rate=args.rate,
        limit=args.limit,
        keep_ts=args.keep_ts,
        bad_ratio=args.bad_ratio,
        should_stop=lambda: bool(stopping),
    )
    print(
        f"sent {report.sent} events (+{report.malformed} malformed) in {report.seconds:.1f}s "
        f"({report.rate:.0f} events/s)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stream.processor import Processor

    settings = load_settings(
        args,
        bundle=args.bundle,
        state_dir=args.state_dir,
        group=args.group,
        top_k=args.top_k,
        batch_max=args.batch_max,
        onnx_threads=args.onnx_threads,
        metrics_addr=args.metrics_addr,
        processing_guarantee=args.processing_guarantee,
        text_encoder=args.text_encoder,
        follow_items=False if args.no_follow_items else None,
        explain=False if args.no_explain else None,
    )
    logger.info("kafka: %s", settings.kafka.redacted())
    if args.engine == "faust":
        # Imported here: faust is an optional extra (`pip install streamrec[faust]`).
        from stream.faust_engine import run as run_faust

        return run_faust(settings)
    processor = Processor(settings)
    _install_stop(processor.stop)
    processor.run()
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from stream.producer import ClickProducer

    settings = load_settings(args)
    with ClickProducer(settings.kafka, settings.topics.clicks) as producer:
        producer.forget(args.user_id)
    logging.getLogger("streamrec.audit").info("forget requested for user %s", args.user_id)
    print(
        f"forget request for {args.user_id} queued on {settings.topics.clicks}; the processor "
        "deletes the session and writes tombstones to the changelog and the output topic"
    )
    return 0


def cmd_items_publish(args: argparse.Namespace) -> int:
    from stream.producer import ItemProducer

    settings = load_settings(args)
    genres = [g for g in (args.genres or "").split("|") if g.strip()]
    with ItemProducer(settings.kafka, settings.topics.items, settings.limits) as items:
        item = items.publish(args.item_id, args.title, genres, args.year)
    print(f"published {item.item_id} on {settings.topics.items}: {item.text()!r}")
    return 0


def cmd_items_withdraw(args: argparse.Namespace) -> int:
    from stream.producer import ItemProducer

    settings = load_settings(args)
    with ItemProducer(settings.kafka, settings.topics.items, settings.limits) as items:
        items.withdraw(args.item_id)
    print(f"withdrew {args.item_id} (a tombstone on {settings.topics.items})")
    return 0


def cmd_models_publish(args: argparse.Namespace) -> int:
    from stream.reload import publish

    target = publish(args.bundle, args.root)
    print(f"published {target.name} to {args.root} (CURRENT -> {target.name})")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from stream.watch import Watcher, run_watch

    settings = load_settings(args, group=args.group)
    titles = _titles(args.bundle)
    watcher = Watcher(settings.kafka, settings.topics, settings.group, follow=args.follow)
    stopping: list[int] = []
    _install_stop(lambda: stopping.append(1))
    run_watch(watcher, titles, args.duration, should_stop=lambda: bool(stopping))
    return 0


def cmd_lag(args: argparse.Namespace) -> int:
    from stream.kafka.lag import LagProbe

    settings = load_settings(args, group=args.group)
    with LagProbe(settings.kafka, settings.group, settings.topics.clicks) as probe:
        probe.wait_until_fetched(10)
        rows = probe.snapshot()
    print(f"{'TOPIC':<16}{'PARTITION':>10}{'COMMITTED':>12}{'END':>12}{'LAG':>10}")
    for r in rows:
        print(
            f"{settings.topics.clicks:<16}{r.partition:>10}{_dash(r.committed):>12}"
            f"{_dash(r.end):>12}{_dash(r.lag):>10}"
        )
    print(f"total lag: {sum(r.lag or 0 for r in rows)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream.demo import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            workdir=args.workdir,
            duration_s=args.duration,
            rate=args.rate,
            train_seconds=args.train_seconds,
            partitions=args.partitions or 6,
        )
    )


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _titles(bundle: Path | None) -> dict[str, str]:
    """Titles from a bundle, or from the current bundle of a models root."""
    from stream.reload import resolve

    return {} if bundle is None else load_bundle(resolve(bundle)).title_map()


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", help="JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("topics", help="topic administration")
    tsub = p.add_subparsers(dest="topics_command", required=True)
    c = tsub.add_parser("create", help="create clicks, recs (compacted) and DLQ topics")
    _kafka_args(c)
    c.add_argument("--partitions", type=int, help="partitions per topic (default 6)")
    c.set_defaults(func=cmd_topics)

    p = sub.add_parser("generate", help="write the seeded synthetic catalogue and clicks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("replay", help="replay a click data set into the input topic")
    _kafka_args(p)
    p.add_argument("--source", default="synthetic", help="synthetic | DIR | FILE.csv | FILE.jsonl")
    p.add_argument("--rate", type=float, default=500.0, help="events/s (0 = unthrottled)")
    p.add_argument("--limit", type=int)
    p.add_argument("--keep-ts", action="store_true", help="keep the file's timestamps")
    p.add_argument("--bad-ratio", type=float, default=0.0, help="inject malformed records")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="run the stream processor")
    _kafka_args(p)
    p.add_argument("--bundle", type=Path, help="a bundle, or a models root (hot reload)")
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--group")
    p.add_argument("--top-k", type=int)
    p.add_argument("--batch-max", type=int)
    p.add_argument("--onnx-threads", type=int)
    p.add_argument(
        "--metrics-addr", help="host:port for /metrics /livez /readyz (default 127.0.0.1:9108)"
    )
    p.add_argument(
        "--processing-guarantee",
        choices=["at-least-once", "exactly-once"],
        help="at-least-once (default) or exactly-once (Kafka transactions; Apache Kafka only)",
    )
    p.add_argument("--text-encoder", type=Path, help="exported text encoder for new items")
    p.add_argument("--no-follow-items", action="store_true", help="ignore the items topic")
    p.add_argument("--no-explain", action="store_true", help="no `because` per recommended item")
    p.add_argument(
        "--engine",
        choices=["default", "faust"],
        default="default",
        help="default, or faust: the same pipeline as a faust-streaming app (the faust extra)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("forget", help="delete a user's session and latest list (audited)")
    _kafka_args(p)
    p.add_argument("user_id")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("items", help="the item catalogue topic: publish or withdraw items")
    isub = p.add_subparsers(dest="items_command", required=True)
    c = isub.add_parser("publish", help="publish an item (item schema v1); new ones go live")
    _kafka_args(c)
    c.add_argument("--item-id", required=True)
    c.add_argument("--title", required=True)
    c.add_argument("--genres", help='pipe-separated, e.g. "Action|Crime"')
    c.add_argument("--year", type=int)
    c.set_defaults(func=cmd_items_publish)
    c = isub.add_parser("withdraw", help="withdraw an item (a tombstone)")
    _kafka_args(c)
    c.add_argument("item_id")
    c.set_defaults(func=cmd_items_withdraw)

    p = sub.add_parser("models", help="models root: versioned bundles + CURRENT pointer")
    msub = p.add_subparsers(dest="models_command", required=True)
    c = msub.add_parser("publish", help="copy a bundle into a models root and make it current")
    c.add_argument("bundle", type=Path)
    c.add_argument("--root", type=Path, required=True)
    c.set_defaults(func=cmd_models_publish)

    p = sub.add_parser("watch", help="live view: top-k lists, throughput, lag, DLQ")
    _kafka_args(p)
    p.add_argument("--group")
    p.add_argument("--bundle", type=Path, help="bundle whose items.csv gives titles")
    p.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    p.add_argument("--follow", type=int, default=4, help="users to show")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("lag", help="per-partition committed offset, end offset and lag")
    _kafka_args(p)
    p.add_argument("--group")
    p.set_defaults(func=cmd_lag)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded broker, live")
    p.add_argument("--workdir", type=Path, default=Path(".demo"))
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--partitions", type=int)
    p.set_defaults(func=cmd_demo)

    # The model and export commands register themselves; they import torch only when run.
    from export.cli import add_commands as add_export_commands
    from export.cli import train_and_export
    from model.cli import add_commands as add_model_commands

    add_model_commands(sub)
    add_export_commands(sub)
    # `train --from-topic`: the click topic as training data (stream/retrain.py).
    from stream.retrain import add_from_topic_args

    add_from_topic_args(sub.choices["train"], load_settings, train_and_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_json)
    handler: Handler = args.func
    try:
        return handler(args)
    except (StreamError, ExportError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

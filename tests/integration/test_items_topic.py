"""New items at run time, on the real broker: a brand-new item published on the items topic is
embedded by the running processor (ONNX text encoder + the bundle's text projection) and
recommended to users whose sessions match it, without a restart; `because` names session items.

The bundle is a real text-aware SASRec (model/sasrec.py TextSASRec) trained for a few seconds on
the synthetic catalogue. The new item is a "sequel" of a popular catalogue item X (X's title
with "II", X's genres); the matching users' sessions are the clicks that most often lead to X
in the synthetic stream. Which X and which of those sessions to use is read off the bundle
before the processor starts (the new item's expected rank, computed with onnxruntime from the
same files the processor loads): the test checks the serving path, not how well a 20-second
model generalises (benchmarks/ measures cold start).
"""

from __future__ import annotations

import csv
import itertools
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from confluent_kafka import Message, Producer

from export.bundle import Bundle, load_bundle
from export.item_text import TEXT_DIM, TEXT_FORMAT
from stream.catalogue import TextProjection
from stream.codec import ItemRecord, ItemTombstone, decode_item
from stream.config import CodecLimits, KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.processor import Processor
from stream.producer import ClickProducer, ItemProducer
from stream.text import TextEncoder
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader, wait_for
from tests.integration.test_pipeline import latest_by_user
from tests.text_fixtures import cached_text_encoder

NEW_ITEM = "new-sequel-0001"
TOP_K = 10
# The new item's expected rank for a matching session: inside the top 10, with room for the
# incremental path's float16 cache (its scores differ from model.onnx's in the 4th digit).
MATCH_RANK = 7
UNRELATED_RANK = 40  # and for an unrelated one: far outside it


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Bundle:
    from export.onnx_export import export_bundle
    from model.config import SASRecConfig, TrainConfig
    from model.data import load_dataset
    from model.train import train

    dataset = load_dataset(f"synthetic:{synthetic_dir}")
    model_cfg = SASRecConfig(
        num_items=dataset.num_items,
        max_len=20,
        d_model=32,
        text_dim=TEXT_DIM,
        text_encoder="sentence-transformers/all-MiniLM-L6-v2",
        text_format=TEXT_FORMAT,
    )
    train_cfg = TrainConfig(epochs=3, batch_size=64, max_seconds=20, threads=1)
    work = tmp_path_factory.mktemp("text-train")
    ckpt = train(dataset, model_cfg, train_cfg, work, progress=False)
    return load_bundle(export_bundle(ckpt, work / "bundle"))


@dataclass(frozen=True)
class Plan:
    item: ItemRecord  # the new item
    sequel_of: str
    matching: dict[str, list[str]]  # user -> session
    unrelated: dict[str, list[str]]


class Oracle:
    """What the processor should compute, from the bundle's own files."""

    def __init__(self, bundle: Bundle, encoder: TextEncoder) -> None:
        self.bundle, self.encoder = bundle, encoder
        self.index = bundle.item_index()
        self.session = ort.InferenceSession(str(bundle.model_path))
        projection = TextProjection.from_bundle(bundle)
        assert projection is not None, "the text-aware bundle must carry its text projection"
        self.projection = projection

    def rank_of_new(self, item: ItemRecord, session: list[str]) -> int:
        """1-based rank of the new item among all items not in the session."""
        window = [self.index[i] for i in session][-self.bundle.max_len :]
        item_seq = np.zeros((1, self.bundle.max_len), dtype=np.int64)
        item_seq[0, self.bundle.max_len - len(window) :] = window
        scores, hidden = self.session.run(["scores", "hidden"], {"item_seq": item_seq})
        new_vector, bias = self.projection(self.encoder.encode([item.text()]), [item.text()])
        new_score = float((hidden @ new_vector.T)[0, 0])  # (1, D) vector
        if bias is not None:
            new_score += float(bias[0])
        scores = scores[0].copy()
        scores[[0, *window]] = -np.inf
        return 1 + int(np.sum(scores > new_score))


def plan_new_item(bundle: Bundle, synthetic_dir: Path, encoder: TextEncoder) -> Plan:
    with (synthetic_dir / "items.csv").open(encoding="utf-8", newline="") as fh:
        items = {r["item_id"]: r for r in csv.DictReader(fh)}
    with (synthetic_dir / "clicks.csv").open(encoding="utf-8", newline="") as fh:
        by_user: defaultdict[str, list[str]] = defaultdict(list)
        for row in csv.DictReader(fh):
            by_user[row["user_id"]].append(row["item_id"])
    before: defaultdict[str, Counter[str]] = defaultdict(Counter)  # item -> what precedes it
    for seq in by_user.values():
        for a, b in itertools.pairwise(seq):
            if a != b:
                before[b][a] += 1
    popular = Counter(i for seq in by_user.values() for i in seq)
    oracle = Oracle(bundle, encoder)
    tried = []
    for x, _ in popular.most_common(100):
        meta = items[x]
        title = meta["title"].replace(" (", " II (", 1)
        item = ItemRecord(NEW_ITEM, title, tuple(meta["genres"].split("|")))
        leading = []  # the clicks that most often lead to X: its chain predecessor, and theirs
        for p, _ in before[x].most_common(5):
            pp = [a for a, _ in before[p].most_common(2) if a not in (x, p)][:1]
            leading.append([*pp, p])
        ranks = [oracle.rank_of_new(item, s) for s in leading]
        tried.append((x, ranks))
        sessions = [s for s, r in zip(leading, ranks, strict=True) if r <= MATCH_RANK]
        if len(sessions) < 2:
            continue
        genres = set(meta["genres"].split("|"))
        far = [
            [i]
            for i, m in items.items()
            if not genres & set(m["genres"].split("|"))
            and oracle.rank_of_new(item, [i]) >= UNRELATED_RANK
        ][:3]
        if len(far) < 2:
            continue
        matching = {f"fan-{n}": s for n, s in enumerate(sessions)}
        unrelated = {f"other-{n}": s for n, s in enumerate(far)}
        return Plan(item, x, matching, unrelated)
    pytest.fail(f"no popular item's sequel ranks in the top {MATCH_RANK} after its chain: {tried}")


def send_sessions(kafka: KafkaSettings, topic: str, sessions: dict[str, list[str]]) -> None:
    with ClickProducer(kafka, topic) as clicks:
        for user, items in sessions.items():
            for item in items:
                clicks.send(user, item)


def outputs_for(reader: TopicReader, users: dict[str, list[str]]) -> dict[str, dict[str, object]]:
    """Each user's latest list once every user has one reflecting all their clicks."""

    def done(messages: list[Message]) -> bool:
        latest = latest_by_user(messages)
        return all(
            u in latest and len(latest[u]["items"]) == TOP_K  # type: ignore[arg-type]
            for u in users
        )

    latest = latest_by_user(reader.read_until(done))
    return {u: latest[u] for u in users}


def listed(record: dict[str, object]) -> list[str]:
    return [str(i["item_id"]) for i in record["items"]]  # type: ignore[attr-defined]


def assert_because_names_session_items(
    records: dict[str, dict[str, object]], sessions: dict[str, list[str]], max_len: int
) -> None:
    for user, record in records.items():
        window = set(sessions[user][-max_len:])
        for entry in record["items"]:  # type: ignore[attr-defined]
            assert entry["because"] in window, (user, entry, window)


def test_a_new_item_is_recommended_to_matching_sessions_without_a_restart(
    kafka: KafkaSettings,
    text_bundle: Bundle,
    synthetic_dir: Path,
    tmp_path: Path,
) -> None:
    encoder = cached_text_encoder()
    plan = plan_new_item(text_bundle, synthetic_dir, encoder)
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSettings(
        clicks=f"clicks-{suffix}",
        recs=f"recs-{suffix}",
        dlq=f"dlq-{suffix}",
        items=f"items-{suffix}",
        partitions=3,
    )
    create_topics(kafka, topics)
    settings = ProcessorSettings(
        kafka=kafka,
        topics=topics,
        group=f"g-{suffix}",
        bundle=text_bundle.path,
        state_dir=tmp_path / "state",
        top_k=TOP_K,
        text_encoder=encoder.path,
        log_every_s=3600,
        metrics_addr="",
    )
    with TopicReader(kafka, topics.recs) as recs, RunningProcessor(settings) as processor:
        # Before: the same sessions get lists without it (it does not exist yet) ...
        early = {f"early-{u}": s for u, s in plan.matching.items()}
        send_sessions(kafka, topics.clicks, early)
        before = outputs_for(recs, early)
        assert all(NEW_ITEM not in listed(r) for r in before.values())

        # ... then the item is published while the processor runs.
        with ItemProducer(kafka, topics.items) as items:
            items.publish(plan.item.item_id, plan.item.title, plan.item.genres)
        wait_for(lambda: runtime_items(processor) == 1, what="the new item is placed")

        sessions = {**plan.matching, **plan.unrelated}
        send_sessions(kafka, topics.clicks, sessions)
        after = outputs_for(recs, sessions)
        for user in plan.matching:
            assert NEW_ITEM in listed(after[user]), (user, plan.matching[user], after[user])
        for user in plan.unrelated:
            assert NEW_ITEM not in listed(after[user]), (user, after[user])
        assert_because_names_session_items({**before, **after}, {**early, **sessions}, 20)

        # A click on the new item is a valid click now, and it is not recommended back.
        fan = {"clicked-new": [*plan.matching["fan-0"], NEW_ITEM]}
        send_sessions(kafka, topics.clicks, fan)
        assert NEW_ITEM not in listed(outputs_for(recs, fan)["clicked-new"])

        # Withdrawn: a tombstone takes it out of every later list.
        with ItemProducer(kafka, topics.items) as items:
            items.withdraw(NEW_ITEM)
        wait_for(lambda: runtime_items(processor) == 0, what="the new item is withdrawn")
        late = {f"late-{u}": s for u, s in plan.matching.items()}
        send_sessions(kafka, topics.clicks, late)
        assert all(NEW_ITEM not in listed(r) for r in outputs_for(recs, late).values())
    sample = processor.metrics.registry.get_sample_value
    assert not sample("streamrec_dead_letters_total", {"reason": "unknown_item"})


def runtime_items(processor: Processor) -> float:
    return processor.metrics.registry.get_sample_value("streamrec_runtime_items") or 0.0


def test_invalid_item_records_are_dead_lettered_once_across_restarts(
    kafka: KafkaSettings, settings: ProcessorSettings, tmp_path: Path
) -> None:
    topics = settings.topics.model_copy(update={"items": f"items-{uuid.uuid4().hex[:8]}"})
    create_topics(kafka, topics)
    settings = settings.model_copy(update={"topics": topics, "text_encoder": tmp_path / "none"})
    raw = Producer(kafka.librdkafka())
    raw.produce(topics.items, key=b"bad-1", value=b"{not json")
    raw.produce(topics.items, key=None, value=None)  # a tombstone naming no item
    raw.produce(
        topics.items,
        key=b"bad-2",
        value=orjson.dumps({"schema_version": 2, "item_id": "bad-2", "title": "T"}),
    )
    raw.flush(10)
    with ItemProducer(kafka, topics.items) as items:
        items.publish("fine-1", "Heat (1995)", ["Action"])
    for _ in range(2):  # a restart reads the topic again but sends no dead letter twice
        with RunningProcessor(settings) as processor:
            follower = processor.items_follower
            assert follower is not None
            # Dead letters are acknowledged before a poll counts its records.
            wait_for(lambda f=follower: f.records == 4, what="the items topic is read")
            assert unplaced(processor) == 1  # the valid item: an ID-only bundle cannot place it
    # One end marker per DLQ partition: whatever precedes them is all the DLQ holds.
    for partition in range(topics.partitions):
        raw.produce(topics.dlq, key=b"end", value=b"end", partition=partition)
    raw.flush(10)
    with TopicReader(kafka, topics.dlq) as dlq:
        ends = topics.partitions
        everything = dlq.read_until(lambda m: sum(x.value() == b"end" for x in m) == ends)
    dead = [m for m in everything if m.value() != b"end"]
    headers = [{k: v.decode() for k, v in m.headers() or []} for m in dead]
    assert Counter(h["streamrec.dlq.reason"] for h in headers) == {
        "not_json": 1,
        "key_mismatch": 1,
        "unsupported_version": 1,
    }
    assert {h["streamrec.dlq.topic"] for h in headers} == {topics.items}


def unplaced(processor: Processor) -> float:
    return processor.metrics.registry.get_sample_value("streamrec_items_unplaced_total") or 0.0


def test_items_cli_publishes_and_withdraws(kafka: KafkaSettings) -> None:
    from tests.integration.test_cli import run_cli

    topic = f"items-{uuid.uuid4().hex[:8]}"
    create_topics(kafka, TopicSettings(items=topic, partitions=2))
    common = ["--bootstrap-servers", kafka.bootstrap_servers, "--items-topic", topic]
    published = run_cli(
        "items", "publish", *common, "--item-id", "n7", "--title", "Heat", "--year", "1995",
        "--genres", "Action|Crime",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert "Heat (1995). Genres: Action, Crime" in published.stdout
    refused = run_cli("items", "publish", *common, "--item-id", " ", "--title", "Heat")
    assert refused.returncode == 2 and "empty_field" in refused.stderr
    withdrawn = run_cli("items", "withdraw", *common, "n7")
    assert withdrawn.returncode == 0, withdrawn.stderr
    with TopicReader(kafka, topic) as reader:
        records = reader.read_until(lambda m: len(m) >= 2)
    limits = CodecLimits()
    decoded = [decode_item(m.key(), m.value(), limits) for m in records]
    assert decoded == [ItemRecord("n7", "Heat", ("Action", "Crime"), 1995), ItemTombstone("n7")]

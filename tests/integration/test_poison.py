"""A poison event: valid on the wire, but the model cannot score the sequence it creates.

Real broker, real RocksDB, the real ONNX scorer; only the model defect is simulated: a wrapper
around the real OnnxScorer raises ScoringError for any batch whose windows contain one
designated item index, as a model with a broken embedding row or a NaN-producing path would.
The processor must dead-letter that one event (reason scoring_failed), still serve every other
user of the batch, and move on: the partition is not blocked and its offsets are committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from export.bundle import load_bundle
from stream.config import ProcessorSettings
from stream.errors import ScoringError
from stream.kafka.lag import LagProbe
from stream.scoring import OnnxScorer
from stream.state import RocksSessionStore
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader, wait_for
from tests.integration.test_pipeline import caught_up, latest_by_user, make_clicks, send


class PoisonScorer:
    """The real ONNX scorer, except that a batch containing `poison` fails like a model defect."""

    def __init__(self, scorer: OnnxScorer, poison: int) -> None:
        self._scorer = scorer
        self.model_version, self.max_len = scorer.model_version, scorer.max_len
        self.poison = poison
        self.refused = 0

    def score(self, item_seq: np.ndarray) -> np.ndarray:
        if (item_seq == self.poison).any():
            self.refused += 1
            raise ScoringError(f"the model cannot score item index {self.poison} (simulated)")
        return self._scorer.score(item_seq)


def test_a_poison_event_is_dead_lettered_and_does_not_block_its_partition(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    bundle = load_bundle(bundle_dir)
    clicks = make_clicks(bundle_dir, users=20, per_user=5, seed=11)
    clicked = {item for events in clicks.values() for item, _ in events}
    poison = next(i for i in range(1, bundle.num_items + 1) if bundle.item_ids[i] not in clicked)
    poison_item = bundle.item_ids[poison]
    # user-007's third and last click is the poison item; everyone else clicks on for two more
    # rounds, so the poison event sits in the middle of its partition.
    victim = "user-007"
    _, ts = clicks[victim][2]
    clicks[victim] = [*clicks[victim][:2], (poison_item, ts)]
    sent = send(settings.kafka, settings.topics.clicks, clicks, 0, 5)
    assert sent == 19 * 5 + 3

    with TopicReader(settings.kafka, settings.topics.clicks) as inputs:
        records = inputs.read_until(lambda m: len(m) >= sent)
    (poison_msg,) = [m for m in records if poison_item.encode() in (m.value() or b"")]
    p, o = poison_msg.partition(), poison_msg.offset()
    after = {(m.key() or b"").decode() for m in records if m.partition() == p and m.offset() > o}
    assert after - {victim}, "the test needs other users' events after the poison one"

    runner = RunningProcessor(settings)
    wrapper = PoisonScorer(runner.processor.scorer, poison)  # type: ignore[arg-type]
    runner.processor.scorer = wrapper
    others = {u: ev for u, ev in clicks.items() if u != victim}
    with (
        runner as processor,
        TopicReader(settings.kafka, settings.topics.dlq) as dlq,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
        LagProbe(settings.kafka, settings.group, settings.topics.clicks) as probe,
    ):
        (dead,) = dlq.read_until(lambda m: len(m) >= 1)
        outputs = recs.read_until(caught_up(others, 5))
        assert probe.wait_until_fetched(30), "no high watermark for every partition"

        def drained() -> bool:
            probe.pump(0.1)
            return all(pl.lag == 0 for pl in probe.snapshot())

        wait_for(drained, what="committed offsets at the end of every partition")
        committed = {pl.partition: pl.committed for pl in probe.snapshot()}
        registry = processor.metrics.registry
        scoring_errors = registry.get_sample_value("streamrec_errors_total", {"kind": "scoring"})
        dead_letters = registry.get_sample_value(
            "streamrec_dead_letters_total", {"reason": "scoring_failed"}
        )
    # Everything is processed and committed, so every dead letter is acknowledged: the DLQ's
    # end offsets count them (a probe of a group that never commits sees them all as lag).
    with LagProbe(settings.kafka, "nobody", settings.topics.dlq) as dlq_probe:
        assert dlq_probe.wait_until_fetched(30)
        assert sum(pl.lag or 0 for pl in dlq_probe.snapshot()) == 1, "only the poison event"

    # The poison event is in the DLQ: original bytes and key, reason and source in headers.
    headers = {k: v for k, v in dead.headers() or []}
    assert headers["streamrec.dlq.reason"] == b"scoring_failed"
    assert b"cannot score" in headers["streamrec.dlq.detail"]
    assert headers["streamrec.dlq.topic"].decode() == settings.topics.clicks
    assert (int(headers["streamrec.dlq.partition"]), int(headers["streamrec.dlq.offset"])) == (p, o)
    assert int(headers["streamrec.dlq.ts"]) > 0
    assert dead.key() == victim.encode() and dead.value() == poison_msg.value()

    # Every other user has their list for their last click, the later ones in p included.
    latest = latest_by_user(outputs)
    for user, events in others.items():
        assert latest[user]["event_ts"] == events[-1][1], user
    for msg in outputs:
        record = orjson.loads(msg.value() or b"{}")
        assert (record["partition"], record["offset"]) != (p, o), "an output for the poison event"
    assert committed[p] is not None and committed[p] > o
    assert wrapper.refused >= 2, "the batch call and the victim's own row both failed"
    assert scoring_errors is not None and scoring_errors >= 1
    assert dead_letters == 1

    # The event was valid: the victim's session keeps it (only the output was skipped).
    store = RocksSessionStore(settings.state_dir / "sessions")
    try:
        session = store.get(victim)
    finally:
        store.close()
    assert session is not None and session.items == [i for i, _ in clicks[victim]]

"""Incremental inference end to end: real broker, real RocksDB, the real exported step pair.

The same clicks go through a processor with inference=full and one with inference=incremental,
round by round, so both emit one list per click; the lists must be the same (ids, and scores
within the export's stated tolerance), through window slides past max_len, several clicks of a
user in one batch, a cache too small for every user (evictions to RocksDB and back) and a
restart of the incremental processor (entries written back on close, read on the next click).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Message

from export.bundle import load_bundle
from export.step_export import STEP_RTOL
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.errors import ScoringError
from stream.incremental import IncrementalScorer, make_scorer
from stream.kafka.admin import create_topics
from stream.scoring import OnnxScorer, full_scores, session_inputs
from stream.state import RocksSessionStore, Session
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader
from tests.integration.test_ops import _copy_as_version
from tests.integration.test_pipeline import Clicks, caught_up, make_clicks, send

Record = dict[str, object]


def by_click(messages: list[Message]) -> dict[tuple[str, int, int], Record]:
    """Every output keyed by (user, partition, offset) of the click it answers."""
    out = {}
    for msg in messages:
        record = orjson.loads(msg.value() or b"{}")
        out[(record["user_id"], record["partition"], record["offset"])] = record
    return out


def assert_same_lists(inc: Record, full: Record) -> int:
    """Scores rank by rank within the tolerance; returns how many ranks hold other ids (a
    near-tie that the fp16 cache ordered the other way)."""
    a, b = inc["items"], full["items"]
    assert isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
    tol = STEP_RTOL * (1 + max(abs(e["score"]) for e in b))
    for x, y in zip(a, b, strict=True):
        assert abs(x["score"] - y["score"]) <= tol, (inc, full)
    return sum(x["item_id"] != y["item_id"] for x, y in zip(a, b, strict=True))


def varied_clicks(bundle_dir: Path) -> Clicks:
    """12 users: 4 past two slides (35 clicks, max_len 20, stride 10), 4 past one, 4 short."""
    clicks = make_clicks(bundle_dir, users=12, per_user=35, seed=21)
    for k, user in enumerate(sorted(clicks)):
        clicks[user] = clicks[user][: (35, 25, 12)[k % 3]]
    return clicks


@pytest.fixture
def pair(
    settings: ProcessorSettings, kafka: KafkaSettings, tmp_path: Path
) -> tuple[ProcessorSettings, ProcessorSettings]:
    """(incremental, full) on the same clicks topic, each with its own recs topic and state.
    The incremental cache holds 8 of the 12 users (d=32, 2 blocks, L=20: ~5 KB each)."""
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSettings(
        clicks=settings.topics.clicks, recs=f"recs-full-{suffix}", dlq=f"dlq-full-{suffix}",
        partitions=settings.topics.partitions,
    )  # fmt: skip
    create_topics(kafka, topics)
    inc = settings.model_copy(update={"inference": "incremental", "kv_cache_mb": 0.04})
    full = settings.model_copy(
        update={
            "inference": "full", "topics": topics, "group": f"{settings.group}-full",
            "state_dir": tmp_path / "full",
        }
    )  # fmt: skip
    return inc, full


def test_incremental_lists_equal_the_full_models_through_slides_and_a_restart(
    pair: tuple[ProcessorSettings, ProcessorSettings], bundle_dir: Path
) -> None:
    inc, full = pair
    bundle = load_bundle(bundle_dir)
    assert bundle.step is not None and (bundle.max_len, bundle.step.stride) == (20, 10)
    clicks = varied_clicks(bundle_dir)
    users = sorted(clicks)
    # Two halves of 6 take turns, so a batch fits the cache of 8 and the other half's users
    # are evicted to RocksDB and read back on their next click.
    halves = [{u: clicks[u] for u in users[h::2]} for h in (0, 1)]
    kafka, topic = inc.kafka, inc.topics.clicks
    with (
        TopicReader(kafka, inc.topics.recs) as inc_recs,
        TopicReader(kafka, full.topics.recs) as full_recs,
        RunningProcessor(full),
    ):

        def rounds(start: int, stop: int, per_round: int = 1) -> None:
            for k in range(start, stop, per_round):
                upto = min(k + per_round, stop)
                for half in halves:
                    send(kafka, topic, half, k, upto)
                    inc_recs.read_until(caught_up(half, upto))
                    full_recs.read_until(caught_up(half, upto))

        with RunningProcessor(inc) as first:
            rounds(0, 22)
            before = first.scorer
            assert isinstance(before, IncrementalScorer)
            assert before.cache.stats["evicted"] > 0 and before.cache.stats["loaded"] > 0
        with RunningProcessor(inc) as second:
            rounds(22, 28, per_round=3)  # several clicks of a user in one batch
            rounds(28, 35)
            after = second.scorer
            assert isinstance(after, IncrementalScorer)
            assert after.cache.stats["loaded"] > 0, "entries written on close come back"
        inc_out, full_out = by_click(inc_recs.messages), by_click(full_recs.messages)

    single = sum(1 for ev in clicks.values() for k in range(len(ev)) if not 22 <= k < 28)
    common = set(inc_out) & set(full_out)
    assert len(common) >= single, "both answer every click of the one-click rounds"
    swapped = sum(assert_same_lists(inc_out[key], full_out[key]) for key in common)
    assert swapped <= len(common) // 100, f"{swapped} ranks differ in {len(common)} lists"
    steps = before.rows["step"] + after.rows["step"]
    prefills = before.rows["prefill"] + after.rows["prefill"]
    # Prefills: every user's first click and 4 + 8 slides; everything else (bursts of three
    # clicks in one batch: three step waves; after a restart too) is a step.
    assert prefills >= 12 + 12 and steps > 4 * prefills, (steps, prefills)


def sessions_of(
    histories: dict[str, list[int]], max_len: int, ids: tuple[str, ...]
) -> list[Session]:
    out = []
    for u, history in enumerate(histories.values()):
        s = Session()
        for k, index in enumerate(history):
            s.append(ids[index], ts=k, partition=0, offset=1000 * u + k, max_len=max_len)
        out.append(s)
    return out


class PoisonScorer(IncrementalScorer):
    """The real incremental scorer; a call whose items include `poison` fails like a defect."""

    poison = -1

    def run_step(self, item, position, past_kv, *times):  # type: ignore[no-untyped-def]
        if (item == self.poison).any():
            raise ScoringError(f"cannot step item {self.poison} (simulated)")
        return super().run_step(item, position, past_kv, *times)

    def run_prefill(self, item_seq, *times):  # type: ignore[no-untyped-def]
        if (item_seq == self.poison).any():
            raise ScoringError(f"cannot prefill item {self.poison} (simulated)")
        return super().run_prefill(item_seq, *times)


def test_a_poison_row_fails_alone_on_the_step_and_on_the_prefill_path(
    bundle_dir: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(bundle_dir)
    store = RocksSessionStore(tmp_path / "s")
    try:
        scorer, full = PoisonScorer(bundle, backing=store), OnnxScorer(bundle)
        view = scorer.items.view
        rng = np.random.default_rng(3)

        def clicks(n: int) -> list[int]:
            return [int(i) for i in rng.integers(8, bundle.num_items + 1, n)]

        histories = {f"u{k}": clicks(4) for k in range(9)}
        users = list(histories)

        def score() -> dict[int, ScoringError]:
            sessions = sessions_of(histories, bundle.max_len, bundle.item_ids)
            inputs = session_inputs(sessions, view, bundle.max_len, scorer.stride)
            got = scorer.score_sessions(users, sessions, inputs, view)
            expected = full_scores(full, inputs, view).scores
            ok = [r for r in range(len(users)) if r not in got.failed]
            tol = STEP_RTOL * (1 + np.abs(expected[ok]).max())
            np.testing.assert_allclose(got.scores[ok], expected[ok], rtol=0, atol=tol)
            assert np.isneginf(got.scores[list(got.failed)]).all()
            return got.failed

        assert score() == {}  # every user's cache is built by prefill
        for history in histories.values():
            history += clicks(1)
        scorer.poison = histories["u4"][-1] = 7  # one click each: the step batch fails
        assert list(score()) == [4] and scorer.rows["step"] == 9
        assert "u4" not in scorer.cache, "a failed row keeps no entry"
        for history in histories.values():
            history += clicks(2)
        scorer.poison = histories["u2"][-2] = 6  # two clicks each: the first step wave fails
        assert list(score()) == [2] and scorer.rows["step"] == 9 + 8
        assert scorer.rows["prefill"] == 9 + 1, "u4 rebuilt"
        for history in histories.values():
            history += clicks(scorer.max_catch_up + 2)
        scorer.poison = histories["u5"][-3] = 5  # more clicks than steps catch up: prefill
        assert list(score()) == [5] and scorer.rows["prefill"] == 9 + 1 + 9
    finally:
        store.close()


def test_calls_cut_to_their_longest_window_give_the_full_width_outputs(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """model.onnx and prefill.onnx take any window width: sessions of 1..max_len clicks scored
    in calls cut to their longest window (rows sorted by length) equal the same graphs fed at
    max_len, scores and the prefill's K/V entries alike."""
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(5)
    lengths = [1, 2, 3, 5, 8, 13, bundle.max_len, 4, 1, 9, 16, 2]
    histories = {
        f"u{k}": [int(i) for i in rng.integers(1, bundle.num_items + 1, n)]
        for k, n in enumerate(lengths)
    }
    users = list(histories)
    sessions = sessions_of(histories, bundle.max_len, bundle.item_ids)
    stores = [RocksSessionStore(tmp_path / name) for name in ("cut", "wide")]
    try:
        cut, wide = (IncrementalScorer(bundle, backing=store) for store in stores)
        assert cut.full.trims and cut._prefill_trims, "graphs exported with a free window axis"
        wide.full.trims = wide._prefill_trims = False
        view = cut.items.view
        inputs = session_inputs(sessions, view, bundle.max_len, cut.stride)
        seen = []
        for name, scorer in (("cut", cut), ("wide", wide)):
            original = scorer.run_prefill

            def spy(item_seq: np.ndarray, *times: object, run=original, name=name) -> object:
                seen.append((name, item_seq.shape[1]))
                return run(item_seq, *times)

            scorer.run_prefill = spy  # type: ignore[method-assign]
        got = cut.score_sessions(users, sessions, inputs, view)
        want = wide.score_sessions(users, sessions, inputs, view)
        assert not got.failed and not want.failed
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-4)
        cut_widths = sorted(w for name, w in seen if name == "cut")
        assert max(cut_widths) == bundle.max_len and min(cut_widths) < bundle.max_len // 2
        assert all(w == bundle.max_len for name, w in seen if name == "wide")
        a, b = cut.cache.lookup(users), wide.cache.lookup(users)
        assert (a >= 0).all() and (b >= 0).all()
        np.testing.assert_array_equal(cut.cache.length[a], np.array(lengths))
        np.testing.assert_array_equal(cut.cache.length[a], wide.cache.length[b])
        for row, n in enumerate(lengths):
            np.testing.assert_allclose(
                cut.cache.pool[a[row], :, :, :n].astype(np.float32),
                wide.cache.pool[b[row], :, :, :n].astype(np.float32),
                atol=2e-3,
            )
        full_cut = full_scores(cut.full, inputs, view).scores
        full_wide = full_scores(wide.full, inputs, view).scores
        np.testing.assert_allclose(full_cut, full_wide, rtol=0, atol=1e-4)
        np.testing.assert_allclose(full_cut, want.scores, rtol=0, atol=1e-4)
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("inference", ["full", "incremental"])
def test_a_runtime_item_is_scored_out_of_the_graph_and_can_be_clicked(
    settings: ProcessorSettings, bundle_dir: Path, inference: str
) -> None:
    bundle = load_bundle(bundle_dir)
    clicks = make_clicks(bundle_dir, users=2, per_user=5, seed=31)
    alice, bob = sorted(clicks)
    clicks[bob][-1] = ("runtime-1", clicks[bob][-1][1])  # bob clicks the new item
    # Alice's final window through the full model: a vector along her hidden state, long
    # enough to beat every bundle item, must rank first for her.
    model = OnnxScorer(bundle)
    history = {alice: [bundle.item_ids.index(i) for i, _ in clicks[alice]]}
    (session,) = sessions_of(history, bundle.max_len, bundle.item_ids)
    assert bundle.step is not None
    inputs = session_inputs([session], model.items.view, bundle.max_len, bundle.step.stride)
    scores, hidden = model.score_hidden(inputs.item_seq)
    assert hidden is not None
    target = float(scores.max()) + 10.0
    vector = hidden * target / float((hidden * hidden).sum())  # hidden @ vector.T = target
    calls: list[tuple[tuple[int, ...], ...]] = []

    def explain(best: np.ndarray, item_seq: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        calls.append((best.shape, item_seq.shape, vectors.shape))
        return item_seq[:, -best.shape[1] :]

    send(settings.kafka, settings.topics.clicks, clicks, 0, 5)
    runner = RunningProcessor(settings.model_copy(update={"inference": inference}))
    scorer = runner.processor.scorer
    assert isinstance(scorer, IncrementalScorer if inference == "incremental" else OnnxScorer)
    assert scorer.add_items(["runtime-1"], vector) == 0
    runner.processor.explain = explain
    with runner, TopicReader(settings.kafka, settings.topics.recs) as recs:
        latest = by_user_latest(recs.read_until(caught_up(clicks, 5)))
    first = latest[alice]["items"][0]  # type: ignore[index]
    assert first["item_id"] == "runtime-1"
    assert first["score"] == pytest.approx(target, rel=1e-2)
    assert "runtime-1" not in {e["item_id"] for e in latest[bob]["items"]}  # type: ignore[attr-defined]
    assert runner.processor.stats.dead_letters == {}, "a click on a runtime item is valid"
    shapes = ((bundle.max_len,), (bundle.num_items + 2, hidden.shape[1]))
    assert calls and all((c[1][1:], c[2]) == shapes and c[0][0] == c[1][0] for c in calls)


def by_user_latest(messages: list[Message]) -> dict[str, Record]:
    out: dict[str, Record] = {}
    for msg in messages:
        record = orjson.loads(msg.value() or b"{}")
        out[record["user_id"]] = record
    return out


def test_a_model_swap_starts_from_an_empty_cache_and_rocksdb_forgets_the_old_one(
    bundle_dir: Path, tmp_path: Path
) -> None:
    v2 = _copy_as_version(bundle_dir, tmp_path / "staging", "v2")
    store = RocksSessionStore(tmp_path / "s")
    try:
        old = make_scorer(load_bundle(bundle_dir), ProcessorSettings(), store)
        assert isinstance(old, IncrementalScorer)
        histories = {f"u{k}": [k + 1, k + 2, k + 3] for k in range(4)}
        sessions = sessions_of(histories, old.max_len, old.bundle.item_ids)
        view = old.items.view
        inputs = session_inputs(sessions, view, old.max_len, old.stride)
        old.score_sessions(list(histories), sessions, inputs, view)
        old.cache.flush()
        assert all(store.kv_get(list(histories)))
        new = make_scorer(load_bundle(v2), ProcessorSettings(), store)  # as _maybe_reload does
        assert isinstance(new, IncrementalScorer) and len(new.cache) == 0
        assert store.kv_get(list(histories)) == [None] * 4
        assert new.cache.lookup(list(histories)).tolist() == [-1] * 4
    finally:
        store.close()

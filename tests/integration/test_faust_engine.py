"""`streamrec run --engine faust` as a real process against the session broker.

The same end-to-end checks as test_pipeline.py: fresh lists that exclude the session, a
restart on the same state dir (SIGTERM, then more clicks), and dead letters. faust is never
imported here (it is an optional extra, and its import-time warnings stay in the subprocess).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
from rocksdict import Options, Rdict

from export.bundle import load_bundle
from stream.config import ProcessorSettings
from stream.state import Session
from tests.integration.kafka_utils import TopicReader
from tests.integration.procs import ProcessorProcess
from tests.integration.test_pipeline import (
    Clicks,
    _schema,
    assert_dead_letters,
    caught_up,
    latest_by_user,
    make_clicks,
    send,
    send_with_malformed,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faust") is None, reason="needs the faust extra"
)

# Faust's own start (group join, table recovery) takes seconds before the first batch.
WAIT_S = 90.0


@contextmanager
def faust_engine(settings: ProcessorSettings, log: Path) -> Iterator[ProcessorProcess]:
    proc = ProcessorProcess(
        settings.kafka,
        settings.topics,
        settings.group,
        settings.bundle,
        settings.state_dir,
        log,
        "--engine",
        "faust",
    ).start()
    try:
        yield proc
    except BaseException as exc:
        # CI keeps only pytest's output, not tmp_path: carry the engine's own account with it.
        exc.add_note(f"faust engine alive: {proc.alive()}; last lines of {log}:\n{tail(log)}")
        raise
    finally:
        code = proc.stop()
    assert code == 0, f"faust engine exited with {code}; log: {log}\n{tail(log)}"


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def table_sessions(state_dir: Path) -> dict[str, Session]:
    """Every session in the Faust table's RocksDB partitions (the engine must be stopped)."""
    sessions: dict[str, Session] = {}
    paths = sorted((state_dir / "faust").glob("v*/tables/faust-sessions-*.db"))
    assert paths, f"no table partitions under {state_dir}"
    for path in paths:
        db = Rdict(str(path), Options(raw_mode=True))
        try:
            for key, value in db.items():
                assert isinstance(key, bytes) and isinstance(value, bytes)
                if not key.startswith(b"__faust\0"):  # Faust's persisted-offset marker
                    sessions[key.decode()] = Session.from_bytes(value)
        finally:
            db.close()
    return sessions


def assert_fresh_lists(
    latest: dict[str, dict[str, object]], clicks: Clicks, k: int, upto: int | None = None
) -> None:
    """Each user's latest list reflects click `upto` and excludes every click before it."""
    for user, events in clicks.items():
        session = events[:upto]
        record = latest[user]
        recommended = [e["item_id"] for e in record["items"]]  # type: ignore[attr-defined]
        assert len(recommended) == k
        assert not set(recommended) & {item for item, _ in session}, "a session item came back"
        assert record["event_ts"] == session[-1][1], "the list reflects the last click"


def test_every_user_gets_a_fresh_list_that_excludes_their_session(
    settings: ProcessorSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=60, per_user=5, seed=11)
    send(settings.kafka, settings.topics.clicks, clicks, 0, 5)
    schema = _schema("recommendation.v1.json")
    version = load_bundle(bundle_dir).model_version
    with (
        faust_engine(settings, tmp_path / "faust.log"),
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        messages = recs.read_until(caught_up(clicks, 5), timeout_s=WAIT_S)
    assert {m.partition() for m in messages} == set(range(settings.topics.partitions))
    latest = latest_by_user(messages)
    assert set(latest) == set(clicks)
    assert_fresh_lists(latest, clicks, settings.top_k)
    for user, record in latest.items():
        jsonschema.validate(record, schema)
        assert record["user_id"] == user
        assert record["model_version"] == version
        assert [e["rank"] for e in record["items"]] == list(range(1, 11))  # type: ignore[attr-defined]
        scores = [e["score"] for e in record["items"]]  # type: ignore[attr-defined]
        assert scores == sorted(scores, reverse=True)


def test_restart_continues_sessions_and_a_new_state_dir_restores_them(
    settings: ProcessorSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=50, per_user=9, seed=12)
    log = tmp_path / "faust.log"
    send(settings.kafka, settings.topics.clicks, clicks, 0, 4)
    with faust_engine(settings, log), TopicReader(settings.kafka, settings.topics.recs) as recs:
        recs.read_until(caught_up(clicks, 4), timeout_s=WAIT_S)
    first = table_sessions(settings.state_dir)
    assert {u: s.count for u, s in first.items()} == dict.fromkeys(clicks, 4)

    # Stopped by SIGTERM; the second run reopens the table and sees the next clicks. Without
    # the list-offsets workaround this run crashes with ConsistencyError.
    send(settings.kafka, settings.topics.clicks, clicks, 4, 8)
    with faust_engine(settings, log), TopicReader(settings.kafka, settings.topics.recs) as recs:
        messages = recs.read_until(caught_up(clicks, 8), timeout_s=WAIT_S)
    assert "ConsistencyError" not in log.read_text(errors="replace")
    assert_fresh_lists(latest_by_user(messages), clicks, settings.top_k, upto=8)
    assert_sessions(table_sessions(settings.state_dir), clicks, upto=8)

    # A new machine: an empty state dir, restored by Faust from the table's changelog.
    moved = settings.model_copy(update={"state_dir": tmp_path / "elsewhere"})
    send(settings.kafka, settings.topics.clicks, clicks, 8, 9)
    with faust_engine(moved, log), TopicReader(settings.kafka, settings.topics.recs) as recs:
        messages = recs.read_until(caught_up(clicks, 9), timeout_s=WAIT_S)
    assert_fresh_lists(latest_by_user(messages), clicks, settings.top_k)
    assert_sessions(table_sessions(moved.state_dir), clicks, upto=9)


def assert_sessions(sessions: dict[str, Session], clicks: Clicks, upto: int) -> None:
    assert set(sessions) == set(clicks)
    for user, events in clicks.items():
        assert sessions[user].count == upto, f"{user}: an event was lost or applied twice"
        assert sessions[user].items == [item for item, _ in events[:upto]]
        assert sessions[user].ts == [ts for _, ts in events[:upto]]


def test_malformed_records_go_to_the_dlq_and_valid_ones_still_score(
    settings: ProcessorSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=12, per_user=3, seed=13)
    bad = send_with_malformed(settings, clicks)
    with (
        faust_engine(settings, tmp_path / "faust.log"),
        TopicReader(settings.kafka, settings.topics.dlq) as dlq,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        dead = dlq.read_until(lambda m: len(m) >= len(bad), timeout_s=WAIT_S)
        latest = latest_by_user(recs.read_until(caught_up(clicks, 3), timeout_s=WAIT_S))
    assert_fresh_lists(latest, clicks, settings.top_k)
    assert_dead_letters(dead, bad, settings.topics.clicks)

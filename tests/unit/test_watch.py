from __future__ import annotations

import orjson

from stream.kafka.lag import PartitionLag
from stream.watch import WatchState, render


def rec(user: str, event_ts: int, generated_ts: int) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "user_id": user,
            "items": [{"item_id": "i2", "score": 1.0, "rank": 1}],
            "model_version": "m7",
            "partition": 0,
            "offset": 1,
            "event_ts": event_ts,
            "generated_ts": generated_ts,
        }
    )


def test_state_follows_the_first_users_and_tracks_their_updates_and_clicks() -> None:
    state = WatchState(follow=2)
    for user in ("a", "b", "c", "a"):
        state.on_recommendation(rec(user, 100, 110))
    assert list(state.users) == ["a", "b"]
    assert state.users["a"].updates == 2
    assert state.outputs == 4
    assert state.model_version == "m7"
    state.on_click(orjson.dumps({"user_id": "a", "item_id": "i9", "ts": 1}))
    state.on_click(b"not json")
    state.on_click(orjson.dumps({"user_id": "zzz", "item_id": "i1", "ts": 1}))
    assert state.users["a"].last_click == "i9"
    assert state.latency_p(0.5) == 10


def test_lag_totals_and_throughput_from_committed_offsets() -> None:
    state = WatchState()
    state.on_lag([PartitionLag(0, None, 10, 0), PartitionLag(1, 5, 9, 0)])
    state.rate_window[-1] = (0.0, 5)
    state.on_lag([PartitionLag(0, 10, 10, 0), PartitionLag(1, 9, 9, 0)])
    state.rate_window[-1] = (2.0, 19)
    assert state.total_lag == 0
    assert state.events_per_s == 7.0
    assert PartitionLag(0, None, 10, 3).lag == 7
    assert PartitionLag(0, 4, None, 0).lag is None


def test_render_shows_titles_lag_and_dlq() -> None:
    from rich.console import Console

    state = WatchState()
    state.on_recommendation(rec("a", 100, 112))
    state.on_click(orjson.dumps({"user_id": "a", "item_id": "i1", "ts": 1}))
    state.dlq["not_json"] += 3
    state.on_lag([PartitionLag(0, 1, 4, 0)])
    console = Console(record=True, width=140)
    console.print(render(state, {"i2": "The Iron Orbit (1957)", "i1": "Silent Harbor"}))
    text = console.export_text()
    assert "The Iron Orbit (1957)" in text
    assert "last click: Silent Harbor" in text
    assert "DLQ 3" in text and "not_json 3" in text

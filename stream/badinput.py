"""Malformed click records, one per dead-letter reason the decoder knows.

Used by the tests (every reason must reach the DLQ) and by the demo's error injection
(`streamrec replay --bad-ratio`), so both exercise the same cases.
"""

from __future__ import annotations

import orjson


def malformed_records(
    user_id: str, item_id: str, now_ms: int, max_event_bytes: int = 16_384
) -> list[tuple[str, bytes | None, bytes | None]]:
    """(expected reason, key, value) for each way a click record can be wrong."""
    key = user_id.encode()

    def event(**fields: object) -> bytes:
        return orjson.dumps({"user_id": user_id, "item_id": item_id, "ts": now_ms, **fields})

    def without(name: str) -> bytes:
        body = {"user_id": user_id, "item_id": item_id, "ts": now_ms}
        del body[name]
        return orjson.dumps(body)

    return [
        ("empty_payload", key, b""),
        ("oversized", key, event(pad="x" * max_event_bytes)),
        ("not_utf8", key, b'{"user_id": "\xff\xfe"}'),
        ("not_json", key, b"user=u1,item=i1"),
        ("not_json", key, b'{"user_id": "u1", "item_id": "i1", "ts": NaN}'),
        ("not_object", key, b'["u1", "i1", 1]'),
        ("missing_field", key, without("item_id")),
        ("missing_field", key, without("ts")),
        ("wrong_type", key, event(ts=str(now_ms))),
        ("wrong_type", key, event(ts=True)),
        ("wrong_type", key, event(ts=now_ms + 0.5)),
        ("wrong_type", key, orjson.dumps({"user_id": 42, "item_id": item_id, "ts": now_ms})),
        ("empty_field", b"", orjson.dumps({"user_id": "", "item_id": item_id, "ts": now_ms})),
        ("field_too_long", key, event(item_id="i" * 300)),
        ("unknown_event_type", key, event(event_type="teleport")),
        ("unknown_item", key, event(item_id="no-such-item")),
        ("ts_negative", key, event(ts=-5)),
        ("ts_future", key, event(ts=now_ms + 10 * 86_400_000)),
        ("key_mismatch", b"someone-else", event()),
    ]

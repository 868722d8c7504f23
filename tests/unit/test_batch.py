from __future__ import annotations

from confluent_kafka import Message

from stream.batch import in_offset_order


def msg(partition: int, offset: int) -> Message:
    return Message(topic="clicks", partition=partition, offset=offset, key=b"k", value=b"v")


def offsets(msgs: list[Message]) -> list[tuple[int | None, int | None]]:
    return [(m.partition(), m.offset()) for m in msgs]


def test_an_ordered_batch_is_returned_untouched() -> None:
    batch = [msg(0, 5), msg(1, 2), msg(0, 6), msg(1, 3)]
    assert in_offset_order(batch) is batch


def test_records_handed_back_after_a_rebalance_are_ordered_and_deduplicated() -> None:
    # 150 was fetched before the partition was lost; after it came back, 148.. were refetched.
    batch = [msg(0, 150), msg(1, 7), msg(0, 148), msg(0, 149), msg(0, 150), msg(0, 151)]
    assert offsets(list(in_offset_order(batch))) == [(0, 148), (0, 149), (0, 150), (0, 151), (1, 7)]

"""The Faust engine's guard against a record dropped by Faust's post-recovery queue clear.

Faust's recovery, once a rebalance completes, resumes the stream partitions, seeks them to their
committed offsets (a broker round trip) and then resumes app flow control, which clears every
stream queue. A record fetched inside that round trip must not be in a queue when the clear
comes (stream.faust_engine.hold_flow_until_seeked). These tests drive Faust's own objects (the
app's flow control, its signal, a flow-controlled stream queue) through that order of calls;
`deliver` is what Faust's conductor does with a fetched record (faust/transport/conductor.py,
`on_message`: wait for flow control, then put the event into the stream's queue).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faust") is None, reason="needs the faust extra"
)


def make_app(tmp_path: Path) -> Any:
    import faust

    # No broker is contacted: the app is never started.
    return faust.App("flow-test", broker="kafka://127.0.0.1:9", datadir=tmp_path, web_enabled=False)


async def deliver(app: Any, queue: Any, event: str) -> None:
    await app.flow_control.acquire()
    queue.put_nowait(event)


async def recovery_order(tmp_path: Path, guard: bool) -> list[str]:
    """Faust's Recovery.on_recovery_completed, with a record fetched during the seek."""
    from stream.faust_engine import hold_flow_until_seeked

    app = make_app(tmp_path)  # inside the loop: mode binds its events to the running one
    if guard:
        hold_flow_until_seeked(app)
    queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)
    app.flow_control.resume()  # recovery read the changelog: flow control is active
    await app.on_rebalance_complete.send()
    fetched = asyncio.ensure_future(deliver(app, queue, "click@104"))  # the seek's round trip
    await asyncio.sleep(0.01)
    app.flow_control.resume()  # after the seek: clears every stream queue
    await fetched
    left = []
    while not queue.empty():
        left.append(queue.get_nowait())
    return left


def test_a_record_fetched_during_the_seek_survives_the_clear(tmp_path: Path) -> None:
    assert asyncio.run(recovery_order(tmp_path, guard=True)) == ["click@104"]


def test_without_the_guard_faust_clears_it(tmp_path: Path) -> None:
    """The defect itself: the record is queued before the clear and lost by it."""
    assert asyncio.run(recovery_order(tmp_path, guard=False)) == []


def test_the_guard_holds_flow_only_until_recovery_resumes_it(tmp_path: Path) -> None:
    from stream.faust_engine import hold_flow_until_seeked

    async def states() -> list[bool]:
        app = make_app(tmp_path)
        hold_flow_until_seeked(app)
        app.flow_control.resume()
        seen = [app.flow_control.is_active()]
        await app.on_rebalance_complete.send()
        seen.append(app.flow_control.is_active())
        app.flow_control.resume()
        return [*seen, app.flow_control.is_active()]

    assert asyncio.run(states()) == [True, False, True]

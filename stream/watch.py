"""`streamrec watch`: a live terminal view of a running deployment.

It reads, never writes: the group's committed offsets and the input topic's true end offsets
(lag, throughput; see stream.kafka.lag), the output topic (latest top-k of a few users, model
version, end-to-end latency) and the dead-letter topic (counts by reason).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from stream.config import KafkaSettings, TopicSettings
from stream.kafka.admin import partition_count
from stream.kafka.clients import make_consumer
from stream.kafka.lag import LagProbe, PartitionLag


@dataclass
class _UserView:
    record: dict[str, object]
    updates: int = 1
    last_click: str = ""
    seen_at: float = field(default_factory=time.monotonic)


@dataclass
class WatchState:
    follow: int = 4
    users: dict[str, _UserView] = field(default_factory=dict)
    dlq: Counter[str] = field(default_factory=Counter)
    outputs: int = 0
    model_version: str = "-"
    latencies_ms: deque[int] = field(default_factory=lambda: deque(maxlen=2000))
    rate_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=50))
    lag: list[PartitionLag] = field(default_factory=list)

    def on_recommendation(self, value: bytes) -> None:
        rec = orjson.loads(value)
        self.outputs += 1
        self.model_version = str(rec.get("model_version", "-"))
        self.latencies_ms.append(int(rec["generated_ts"]) - int(rec["event_ts"]))
        user = str(rec["user_id"])
        view = self.users.get(user)
        if view is not None:
            view.record, view.updates, view.seen_at = rec, view.updates + 1, time.monotonic()
        elif len(self.users) < self.follow:
            self.users[user] = _UserView(rec)

    def on_click(self, value: bytes | None) -> None:
        """Remember a followed user's latest click, to show next to their list."""
        try:
            click = orjson.loads(value or b"")
            view = self.users.get(str(click["user_id"]))
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return  # malformed input is the DLQ's business, not the view's
        if view is not None:
            view.last_click = str(click.get("item_id", ""))

    def on_lag(self, lag: list[PartitionLag]) -> None:
        self.lag = lag
        done = sum(p.committed or 0 for p in lag)
        self.rate_window.append((time.monotonic(), done))

    @property
    def events_per_s(self) -> float:
        if len(self.rate_window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.rate_window[0], self.rate_window[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    @property
    def total_lag(self) -> int:
        return sum(p.lag or 0 for p in self.lag)

    def latency_p(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return float(ordered[min(int(q * len(ordered)), len(ordered) - 1)])


def render(state: WatchState, titles: dict[str, str], top: int = 5) -> Group:
    dlq = ", ".join(f"{r} {n}" for r, n in state.dlq.most_common(3)) or "none"
    header = (
        f"[b]{state.events_per_s:,.0f}[/b] events/s processed   "
        f"lag [b]{state.total_lag:,}[/b]   outputs {state.outputs:,}   "
        f"DLQ [b]{sum(state.dlq.values())}[/b] ({dlq})   "
        f"latency p50 {state.latency_p(0.5):.0f} ms p99 {state.latency_p(0.99):.0f} ms   "
        f"model {state.model_version}"
    )
    lag = Table("partition", "committed", "end", "lag", title="consumer lag", expand=False)
    for p in state.lag:
        lag.add_row(str(p.partition), _opt(p.committed), _opt(p.end), _opt(p.lag))
    panels = []
    for user, view in state.users.items():
        items = view.record.get("items")
        table = Table("#", "item", "score", box=None, show_header=False)
        for entry in (items if isinstance(items, list) else [])[:top]:
            item_id = str(entry["item_id"])
            title = titles.get(item_id, "")
            table.add_row(
                str(entry["rank"]), f"{title} [dim]{item_id}[/dim]", f"{entry['score']:.2f}"
            )
        age = time.monotonic() - view.seen_at
        clicked = titles.get(view.last_click, view.last_click) or "-"
        panels.append(
            Panel(
                table,
                title=f"{user} · {view.updates} updates · {age:.0f}s ago",
                subtitle=f"last click: {clicked}",
                expand=True,
            )
        )
    return Group(Panel(header, title="streamrec watch"), lag, *panels)


def _opt(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


class Watcher:
    def __init__(
        self, kafka: KafkaSettings, topics: TopicSettings, group: str, follow: int = 4
    ) -> None:
        self.state = WatchState(follow=follow)
        self.probe = LagProbe(kafka, group, topics.clicks)
        self.topics = topics
        self._consumer: Consumer = make_consumer(kafka, f"{group}.watch")
        assignment = [
            TopicPartition(topics.recs, p, OFFSET_END)
            for p in range(partition_count(kafka, topics.recs))
        ] + [
            TopicPartition(topics.dlq, p, OFFSET_BEGINNING)
            for p in range(partition_count(kafka, topics.dlq))
        ]
        self._consumer.assign(assignment)
        self._last_lag = 0.0

    def step(self, timeout_s: float = 0.2) -> None:
        for msg in self._consumer.consume(5000, timeout=timeout_s):
            if msg.error() is not None:
                continue
            if msg.topic() == self.topics.recs and msg.value():
                self.state.on_recommendation(msg.value() or b"")
            elif msg.topic() == self.topics.dlq:
                reason = dict(msg.headers() or []).get("streamrec.dlq.reason") or b"?"
                self.state.dlq[reason.decode() if isinstance(reason, bytes) else reason] += 1
        for msg in self.probe.pump(0):
            self.state.on_click(msg.value())
        if time.monotonic() - self._last_lag > 0.5:
            self._last_lag = time.monotonic()
            self.state.on_lag(self.probe.snapshot())

    def close(self) -> None:
        self._consumer.close()
        self.probe.close()


def run_watch(
    watcher: Watcher,
    titles: dict[str, str],
    duration_s: float | None,
    console: Console | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> WatchState:
    """Live view on a terminal; a line every few seconds otherwise (logs, CI)."""
    console = console or Console()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    stop = should_stop or (lambda: False)
    last_line = 0.0

    def running() -> bool:
        return not stop() and (deadline is None or time.monotonic() < deadline)

    try:
        if console.is_terminal:
            with Live(render(watcher.state, titles), console=console, refresh_per_second=4) as live:
                while running():
                    watcher.step()
                    live.update(render(watcher.state, titles))
        else:
            while running():
                watcher.step()
                if time.monotonic() - last_line > 5:
                    last_line = time.monotonic()
                    s = watcher.state
                    console.print(
                        f"{s.events_per_s:,.0f} events/s, lag {s.total_lag}, outputs {s.outputs}, "
                        f"DLQ {sum(s.dlq.values())}, p50 {s.latency_p(0.5):.0f} ms"
                    )
    finally:
        watcher.close()
    return watcher.state

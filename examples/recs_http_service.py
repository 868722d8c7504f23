"""A tiny downstream service: each user's current recommendations over HTTP.

A background thread follows the `recs` topic with `stream.subscriber.RecsSubscriber` (all
partitions from the beginning, no consumer group: the compacted topic bootstraps every user's
latest list); a stdlib `ThreadingHTTPServer` answers from that in-memory view:

    GET /users/<user_id>/recommendations   200 the user's list (schema v1 fields) | 404
    GET /healthz                           200 while the subscriber runs | 503; with counters

Run it against `make demo`'s broker: the demo prints `embedded broker on 127.0.0.1:PORT` and
then shows its live view for about a minute (the broker keeps everything in memory and goes
away with the demo). In a second terminal, from the repository root:

    .venv/bin/python examples/recs_http_service.py --bootstrap-servers 127.0.0.1:PORT --port 8080
    curl -s localhost:8080/users/u0042/recommendations    # a user id from the demo's view
    curl -s localhost:8080/healthz

Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the HTTP server stops accepting, the subscriber
thread finishes its poll and the consumer is closed. It binds 127.0.0.1 unless `--host` says
otherwise. For Apache Kafka, point `--bootstrap-servers` at it (security settings: see
`stream.config.KafkaSettings`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from confluent_kafka import KafkaException

from stream.config import KafkaSettings
from stream.errors import StreamError
from stream.subscriber import RecsSubscriber

logger = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    service: RecsHttpService


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so a client that never closes holds no thread.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        service = self.server.service
        parts = urlsplit(self.path).path.split("/")
        if parts == ["", "healthz"]:
            healthy = service.healthy()
            body = {"status": "ok" if healthy else "failing", **service.counters()}
            self._send(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif len(parts) == 4 and parts[:2] == ["", "users"] and parts[3] == "recommendations":
            # Split before unquoting: a user id may contain an encoded "/".
            user_id = unquote(parts[2])
            rec = service.subscriber.latest(user_id)
            if rec is None:
                self._send(HTTPStatus.NOT_FOUND, {"error": "unknown user", "user_id": user_id})
            else:
                self._send(HTTPStatus.OK, rec.as_dict())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not found", "path": self.path[:200]})

    def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Access logs go through logging (off by default) instead of raw stderr.
        logger.debug("%s " + format, self.address_string(), *args)


class RecsHttpService:
    """The subscriber thread and the HTTP server, started and stopped together."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = "recs",
        host: str = "127.0.0.1",
        port: int = 8080,
        group: str | None = None,
    ) -> None:
        self.subscriber = RecsSubscriber(kafka, topic=topic, group=group)
        try:
            self.server = _Server((host, port), _Handler)
        except OSError:
            self.subscriber.close()
            raise
        self.server.service = self
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="recs-subscriber", daemon=True)
        self._http = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="recs-http"
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def _poll(self) -> None:
        try:
            self.subscriber.run_forever(self._stop.is_set)
        except Exception as exc:
            # /healthz turns 503 and main() exits non-zero: a stale view must not look healthy.
            self.error = exc
            logger.exception("subscriber failed")

    def healthy(self) -> bool:
        return self.error is None and self._poller.is_alive()

    def counters(self) -> dict[str, Any]:
        sub = self.subscriber
        return {
            "users": sub.users(),
            "applied": sub.applied,
            "duplicates": sub.duplicates,
            "invalid": dict(sub.invalid),
        }

    def start(self) -> RecsHttpService:
        self._poller.start()
        self._http.start()
        logger.info("serving on http://%s:%d", *self.address)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._http.is_alive():  # shutdown() waits forever for a server that never started
            self.server.shutdown()
            self._http.join(timeout_s)
        self.server.server_close()
        if self._poller.is_alive():
            self._poller.join(timeout_s)
        if self._poller.is_alive():
            logger.warning("subscriber thread did not stop within %ss", timeout_s)
        else:
            self.subscriber.close()  # only once no thread polls it

    def __enter__(self) -> RecsHttpService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serve each user's current recommendations over HTTP."
    )
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="recs")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument(
        "--group", default=None, help="consumer group (default: none, read every partition)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap_servers)
    try:
        service = RecsHttpService(kafka, args.topic, args.host, args.port, args.group)
    # No such topic, an unreachable broker, a port in use: a message, not a traceback.
    except (StreamError, KafkaException, OSError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    with service:
        host, port = service.address
        print(
            f"serving http://{host}:{port}/users/<user_id>/recommendations (Ctrl-C stops)",
            flush=True,
        )
        # A timed wait: the main thread stays responsive to signals and notices a dead poller.
        while not stopping.wait(0.5):
            if not service.healthy():
                print(f"subscriber failed: {service.error}", file=sys.stderr)
                return 1
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

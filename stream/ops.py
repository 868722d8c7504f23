"""The processor's HTTP endpoints: /metrics (Prometheus), /livez and /readyz (Kubernetes).

/livez: the process is alive and its loop turns (fails when one iteration takes longer than
liveness_timeout_s: a stuck poll or scoring call; the orchestrator should restart it).
/readyz: partitions assigned, state open, bundle loaded, a broker connection up (fails while
the broker is unreachable; the orchestrator should stop routing to it, not restart it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.errors import ConfigError
from stream.metrics import ProcessorMetrics

logger = logging.getLogger(__name__)


@dataclass
class Health:
    """Written by the processor loop, read by the HTTP thread (single assignments only)."""

    liveness_timeout_s: float = 60.0
    loop_ts: float = field(default_factory=time.monotonic)
    started: bool = False
    assigned: int = 0
    state_open: bool = False
    model_version: str | None = None
    broker_up: bool = False
    restoring: int = 0  # partitions being restored from the changelog
    stopping: bool = False

    def beat(self) -> None:
        self.loop_ts = time.monotonic()

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.loop_ts
        ok = age < self.liveness_timeout_s
        return ok, {"status": "ok" if ok else "stuck", "loop_age_s": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "loop_running": self.started and not self.stopping,
            "partitions_assigned": self.assigned > 0,
            "state_open": self.state_open,
            "bundle_loaded": self.model_version is not None,
            "broker_connected": self.broker_up,
            "state_restored": self.restoring == 0,
        }
        ok = all(checks.values())
        body = {
            "status": "ready" if ok else "not ready",
            "checks": checks,
            "assigned_partitions": self.assigned,
            "model_version": self.model_version,
        }
        return ok, body


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics address {addr!r} is not host:port")
    return host or "127.0.0.1", int(port)


class OpsServer:
    def __init__(self, addr: str, metrics: ProcessorMetrics, health: Health) -> None:
        host, port = parse_addr(addr)
        handler = _handler(metrics, health)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> OpsServer:
        self._thread.start()
        logger.info("metrics and health on http://%s (/metrics /livez /readyz)", self.address)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(metrics: ProcessorMetrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                metrics.ready.set(1 if health.ready()[0] else 0)
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/livez", "/readyz"):
                ok, body = health.live() if path == "/livez" else health.ready()
                self._send(200 if ok else 503, orjson.dumps(body), "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler

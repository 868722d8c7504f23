from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream.cli import load_settings
from stream.config import KafkaSettings


def test_librdkafka_config_carries_security_settings_and_redacts_secrets() -> None:
    kafka = KafkaSettings(
        bootstrap_servers="k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=SecretStr("hunter2"),
        extra={"ssl.key.password": "also-secret"},
    )
    conf = kafka.librdkafka()
    assert conf["sasl.password"] == "hunter2"
    assert conf["ssl.key.password"] == "also-secret"
    assert "hunter2" not in repr(kafka)
    redacted = kafka.redacted()
    assert redacted["sasl.password"] == "***"
    assert redacted["ssl.key.password"] == "***"
    consumer = kafka.consumer_config("g")
    assert consumer["enable.auto.commit"] is False
    assert consumer["partition.assignment.strategy"] == "cooperative-sticky"
    assert kafka.producer_config()["enable.idempotence"] is True


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "streamrec.json"
    config.write_text(
        json.dumps({"group": "from-file", "top_k": 7, "kafka": {"bootstrap_servers": "file:1"}})
    )
    monkeypatch.setenv("STREAMREC_GROUP", "from-env")
    monkeypatch.setenv("STREAMREC_KAFKA__BOOTSTRAP_SERVERS", "env:2")
    args = argparse.Namespace(config=config, bootstrap_servers=None)
    settings = load_settings(args, group=None, top_k=None)
    assert (settings.group, settings.top_k, settings.kafka.bootstrap_servers) == (
        "from-env",
        7,
        "env:2",
    )
    args = argparse.Namespace(config=config, bootstrap_servers="flag:3")
    settings = load_settings(args, group="from-flag")
    assert (settings.group, settings.kafka.bootstrap_servers) == ("from-flag", "flag:3")

"""The operator- and producer-facing commands, as subprocesses against the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, ConfigResource

from stream.broker import free_port, wait_for_metadata
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.lag import LagProbe
from tests.integration.kafka_utils import Timeout

CLI = [sys.executable, "-m", "stream"]


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_broker_command_serves_metadata_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "broker", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for_metadata(f"127.0.0.1:{port}", timeout_s=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert f"127.0.0.1:{port}" in out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The broker child went with it: nothing answers on the port any more.
    deadline = Timeout(10)
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
    while not deadline.expired:
        try:
            admin.list_topics(timeout=0.5)
        except Exception:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the broker is still answering after the command stopped")


def test_topics_create_is_idempotent_and_compacts_the_output(kafka: KafkaSettings) -> None:
    suffix = uuid.uuid4().hex[:8]
    args = [
        "topics", "create", "--bootstrap-servers", kafka.bootstrap_servers,
        "--clicks-topic", f"c-{suffix}", "--recs-topic", f"r-{suffix}",
        "--dlq-topic", f"d-{suffix}", "--items-topic", f"i-{suffix}", "--partitions", "4",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 4
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("exists") == 4
    admin = AdminClient(kafka.librdkafka())
    md = admin.list_topics(timeout=10)
    assert {len(md.topics[f"{p}-{suffix}"].partitions) for p in "crdi"} == {4}
    for compacted in (f"r-{suffix}", f"i-{suffix}"):
        resource = ConfigResource(ConfigResource.Type.TOPIC, compacted)
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        assert configs["cleanup.policy"].value == "compact"


def test_replay_sends_the_requested_count_and_lag_sees_all_of_it(
    kafka: KafkaSettings, topics: TopicSettings, synthetic_dir: Path
) -> None:
    result = run_cli(
        "replay", "--bootstrap-servers", kafka.bootstrap_servers,
        "--clicks-topic", topics.clicks, "--source", str(synthetic_dir),
        "--rate", "5000", "--limit", "700",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sent 700 events" in result.stdout
    # No consumer has committed: lag is every record. Tansu's list-offsets answer would say
    # less (end = start of the last batch + 1); the probe reads the fetch high watermark.
    with LagProbe(kafka, "nobody", topics.clicks) as probe:
        assert probe.wait_until_fetched(15)
        assert sum(p.lag or 0 for p in probe.snapshot()) == 700
    lag = run_cli(
        "lag", "--bootstrap-servers", kafka.bootstrap_servers,
        "--clicks-topic", topics.clicks, "--group", "nobody",
    )  # fmt: skip
    assert lag.returncode == 0, lag.stderr
    assert "total lag: 700" in lag.stdout


def test_run_refuses_a_missing_bundle_with_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("run", "--bundle", str(tmp_path / "nope"), "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "not a model bundle" in result.stderr
    assert "streamrec export" in result.stderr


def test_serving_imports_no_torch() -> None:
    code = (
        "import sys, stream.processor, stream.cli, stream.watch, stream.replay, stream.demo;"
        "import stream.text, stream.catalogue, stream.explain;"
        "stream.cli.build_parser();"
        "banned = ('torch', 'tqdm', 'onnx', 'transformers', 'sentence_transformers');"
        "leaked = sorted(m for m in banned if m in sys.modules);"
        "assert not leaked, leaked"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr

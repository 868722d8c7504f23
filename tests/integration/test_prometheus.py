"""A real Prometheus (Debian's package) scrapes a running processor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stream.broker import free_port
from stream.config import ProcessorSettings
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader, wait_for
from tests.integration.test_pipeline import caught_up, make_clicks, send


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's package")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return binary


def query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except OSError:
        return []
    return list(body.get("data", {}).get("result", []))


def test_prometheus_scrapes_the_processor(
    settings: ProcessorSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    clicks = make_clicks(bundle_dir, users=20, per_user=3, seed=11)
    sent = send(settings.kafka, settings.topics.clicks, clicks, 0, 3)
    with (
        RunningProcessor(settings) as processor,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        recs.read_until(caught_up(clicks, 3))
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: streamrec\n"
            f"    static_configs: [{{targets: ['{processor.ops_address}']}}]\n"
        )
        port = free_port()
        with subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as prom:
            try:
                wait_for(
                    lambda: (
                        [r["value"][1] for r in query(port, "up{job='streamrec'}")]  # type: ignore[index]
                        == ["1"]
                    ),
                    what="prometheus to scrape the processor",
                )
                wait_for(
                    lambda: (
                        [
                            r["value"][1]  # type: ignore[index]
                            for r in query(port, "streamrec_events_consumed_total")
                        ]
                        == [str(sent)]
                    ),
                    what="the consumed counter in prometheus",
                )
                lag = query(port, "sum(kafka_consumergroup_lag)")
                assert lag and lag[0]["value"][1] == "0"  # type: ignore[index]
                version = query(port, "streamrec_model_info")
                assert version[0]["metric"]["model_version"] == processor.bundle.model_version  # type: ignore[index]
            finally:
                prom.terminate()
                prom.wait(timeout=30)

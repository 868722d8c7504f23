"""`streamrec train --from-topic`: clicks on the real broker become a new bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.bundle import load_bundle
from stream.cli import main
from stream.config import KafkaSettings, TopicSettings
from stream.producer import ClickProducer
from stream.synthetic import iter_clicks, read_items


def test_train_from_topic_builds_a_bundle_from_the_valid_clicks(
    kafka: KafkaSettings,
    topics: TopicSettings,
    synthetic_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    clicks = list(iter_clicks(synthetic_dir))[:3000]
    until_ts = clicks[2400].ts
    forgotten = clicks[0].user_id  # asks to be forgotten after all their clicks were sent
    kept = [c for c in clicks if c.ts <= until_ts and c.user_id != forgotten]
    with ClickProducer(kafka, topics.clicks) as producer:
        for click in clicks:
            producer.send(click.user_id, click.item_id, click.ts)
        producer.send("u-unknown", "not-an-item", clicks[0].ts)  # not in the catalogue
        producer.send_raw(b"u1", b"{not json")
        producer.forget(forgotten)
    out = tmp_path / "run"
    rc = main(
        [
            "train", "--from-topic", topics.clicks, "--bootstrap-servers",
            kafka.bootstrap_servers, "--catalogue", str(synthetic_dir), "--until-ts",
            str(until_ts), "--out", str(out), "--max-len", "20", "--d-model", "16",
            "--epochs", "1", "--threads", "1", "--no-progress", "--publish",
            str(tmp_path / "models"),
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") :])  # the last JSON document printed
    assert summary["clicks"] == len(kept)
    assert summary["skipped"] == {
        "unknown_item": 1,
        "not_json": 1,
        "after_until_ts": sum(c.ts > until_ts for c in clicks),
        "forgotten": sum(c.ts <= until_ts and c.user_id == forgotten for c in clicks),
    }
    assert summary["users"] == len({c.user_id for c in kept})

    bundle = load_bundle(out / "bundle")
    catalogue = [item.item_id for item in read_items(synthetic_dir)]
    assert list(bundle.item_ids[1:]) == catalogue
    assert bundle.model_version == summary["model_version"]
    assert bundle.manifest.training_data["num_interactions"] == len(kept)
    assert (tmp_path / "models" / "CURRENT").read_text().strip() == bundle.model_version
    again = load_bundle(tmp_path / "models" / bundle.model_version)
    assert again.model_version == bundle.model_version

"""The run-time catalogue: item records decoded, new items embedded with the real ONNX text
encoder, projected with the bundle's text projection and handed to the scoring table."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from export.bundle import Bundle, load_bundle, write_bundle
from export.item_text import (
    TEXT_BIAS,
    TEXT_DIM,
    TEXT_PROJ_B,
    TEXT_PROJ_W,
    feature_dim,
    item_features,
    item_text,
)
from stream.catalogue import Catalogue, TextProjection
from stream.codec import Invalid, ItemRecord, ItemTombstone, decode_item
from stream.config import CodecLimits
from stream.errors import ConfigError
from stream.metrics import ProcessorMetrics
from stream.text import TextEncoder
from tests.text_fixtures import cached_text_encoder

D = 8
BUNDLE_ITEMS = [("i1", "Crimson Harbor (1990)"), ("i2", "Silent Garden (2001)")]


class RecordingSink:
    """The ItemSink seam, recording what the catalogue asks of it."""

    def __init__(self, dim: int | None = D) -> None:
        self.dim = dim
        self.vectors: dict[str, np.ndarray] = {}
        self.bias: dict[str, float] = {}
        self.removed: list[str] = []
        self.add_calls = 0

    def add_items(
        self, item_ids: Sequence[str], vectors: np.ndarray, bias: np.ndarray | None = None
    ) -> int:
        self.add_calls += 1
        for k, (item_id, vector) in enumerate(zip(item_ids, vectors, strict=True)):
            self.vectors[item_id] = vector
            if bias is not None:
                self.bias[item_id] = float(bias[k])
        return 0

    def remove_items(self, item_ids: Iterable[str]) -> None:
        self.removed += list(item_ids)


GENRES = ("Action", "Crime")


def make_bundle(
    root: Path, *, text: bool = True, proj_dim: int = D, seed: int = 0, features: bool = False
) -> Bundle:
    """A bundle with a random text projection; `features`: over [text, item features], with a
    text bias (a model trained with item_features and text_bias)."""
    rng = np.random.default_rng(seed)
    (root / "src").mkdir(parents=True, exist_ok=True)
    model = root / "src" / "model.onnx"
    model.write_bytes(b"not used by the catalogue")
    extra = {}
    config: dict[str, object] = {"text_dim": TEXT_DIM, "text_format": "title-genres/1"}
    width = TEXT_DIM + (feature_dim(GENRES) if features else 0)
    if text:
        np.save(root / "src" / TEXT_PROJ_W, rng.standard_normal((width, proj_dim), np.float32))
        np.save(root / "src" / TEXT_PROJ_B, rng.standard_normal(proj_dim).astype(np.float32))
        extra = {name: root / "src" / name for name in (TEXT_PROJ_W, TEXT_PROJ_B)}
    if text and features:
        np.save(root / "src" / TEXT_BIAS, rng.standard_normal(width + 1).astype(np.float32))
        extra[TEXT_BIAS] = root / "src" / TEXT_BIAS
        config |= {"item_features": True, "feature_genres": list(GENRES), "text_bias": True}
    path = write_bundle(
        root / "bundle",
        model_file=model,
        items=BUNDLE_ITEMS,
        model_name="test",
        model_version=f"test-{seed}",
        max_len=5,
        config=config if text else {},
        extra_files=extra,
    )
    return load_bundle(path)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return cached_text_encoder()


@pytest.fixture
def metrics() -> ProcessorMetrics:
    return ProcessorMetrics("test")


def unplaced(metrics: ProcessorMetrics) -> float:
    return metrics.registry.get_sample_value("streamrec_items_unplaced_total") or 0.0


def test_new_items_get_the_projected_text_embedding(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    bundle = make_bundle(tmp_path)
    projection = TextProjection.from_bundle(bundle)
    assert projection is not None and projection.dim == D
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(bundle, sink)
    heat = ItemRecord("n1", "Heat", ("Action", "Crime"), 1995)
    catalogue.apply([heat, ItemRecord("i1", "Crimson Harbor (1990)")])
    assert set(sink.vectors) == {"n1"}, "bundle items are never re-added"
    assert heat.text() == item_text("Heat (1995)", "Action|Crime")
    expected = projection(encoder.encode([heat.text()]), [heat.text()])[0][0]
    np.testing.assert_allclose(sink.vectors["n1"], expected, rtol=1e-5, atol=1e-5)
    assert sink.bias == {}, "a bundle without text_bias.npy gives runtime items no bias"
    assert catalogue.runtime_items == {"n1": heat.text()}
    assert metrics.registry.get_sample_value("streamrec_runtime_items") == 1
    assert unplaced(metrics) == 0


def test_updates_replace_tombstones_remove_and_the_last_record_wins(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    bundle = make_bundle(tmp_path)
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(bundle, sink)
    catalogue.apply([ItemRecord("n1", "Heat (1995)"), ItemRecord("n2", "Alien (1979)")])
    first = sink.vectors["n1"].copy()
    calls = sink.add_calls
    catalogue.apply([ItemRecord("n1", "Heat (1995)")])  # same text: nothing to redo
    assert sink.add_calls == calls
    catalogue.apply([ItemRecord("n1", "Heat (1995)", ("Crime",))])  # new text: new vector
    assert not np.allclose(sink.vectors["n1"], first)
    catalogue.apply([ItemTombstone("n2")])
    assert sink.removed == ["n2"] and set(catalogue.runtime_items) == {"n1"}
    # Within one poll only each item's last record counts.
    catalogue.apply([ItemRecord("n3", "Up (2009)"), ItemTombstone("n3"), ItemTombstone("n4")])
    assert "n3" not in sink.vectors and sink.removed[-2:] == ["n3", "n4"]
    catalogue.apply([ItemTombstone("n5"), ItemRecord("n5", "Big (1988)")])
    assert "n5" in sink.vectors and "n5" not in sink.removed


def test_a_withdrawn_bundle_item_comes_back_when_republished(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(make_bundle(tmp_path), sink)
    catalogue.apply([ItemTombstone("i2")])
    assert sink.removed == ["i2"]
    catalogue.apply([ItemRecord("i2", "Silent Garden (2001)")])
    assert "i2" in sink.vectors  # add_items un-removes; the table ignores a bundle id's vector


def test_a_model_swap_places_every_runtime_item_again_in_the_new_space(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    catalogue, old = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(make_bundle(tmp_path / "a", seed=0), old)
    catalogue.apply([ItemRecord("n1", "Heat (1995)"), ItemRecord("n2", "Alien (1979)")])
    new_bundle = make_bundle(tmp_path / "b", seed=1)
    new = RecordingSink()
    catalogue.attach(new_bundle, new)
    assert set(new.vectors) == {"n1", "n2"}
    projection = TextProjection.from_bundle(new_bundle)
    assert projection is not None
    expected = projection(encoder.encode(["Heat (1995)"]), ["Heat (1995)"])[0][0]
    np.testing.assert_allclose(new.vectors["n1"], expected, rtol=1e-5, atol=1e-5)


def test_an_id_only_bundle_counts_new_items_and_logs_once(
    tmp_path: Path,
    encoder: TextEncoder,
    metrics: ProcessorMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(make_bundle(tmp_path / "id", text=False), sink)
    with caplog.at_level(logging.WARNING, logger="stream.catalogue"):
        catalogue.apply([ItemRecord("n1", "Heat (1995)")])
        catalogue.apply([ItemRecord("n2", "Alien (1979)"), ItemRecord("i1", "Crimson Harbor")])
    assert not sink.vectors and unplaced(metrics) == 2
    assert len([r for r in caplog.records if "ID-only bundle" in r.message]) == 1
    assert metrics.registry.get_sample_value("streamrec_runtime_items") == 0
    # Kept, not lost: a text-aware bundle served later places them.
    text_sink = RecordingSink()
    catalogue.attach(make_bundle(tmp_path / "text"), text_sink)
    assert set(text_sink.vectors) == {"n1", "n2"}


def test_without_a_text_encoder_new_items_are_counted_not_fatal(
    tmp_path: Path, metrics: ProcessorMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    catalogue, sink = Catalogue(tmp_path / "no-encoder", metrics), RecordingSink()
    catalogue.attach(make_bundle(tmp_path), sink)
    with caplog.at_level(logging.ERROR, logger="stream.catalogue"):
        catalogue.apply([ItemRecord("n1", "Heat (1995)")])
    assert not sink.vectors and unplaced(metrics) == 1
    assert any("export-text-encoder" in r.message for r in caplog.records)


def test_a_projection_that_does_not_fit_the_model_places_nothing(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink(dim=D + 1)
    catalogue.attach(make_bundle(tmp_path), sink)
    catalogue.apply([ItemRecord("n1", "Heat (1995)")])
    assert not sink.vectors and unplaced(metrics) == 1


def test_a_bundle_with_an_unknown_text_format_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    config = {**bundle.manifest.config, "text_format": "title-only/9"}
    odd = replace(bundle, manifest=replace(bundle.manifest, config=config))
    with pytest.raises(ConfigError, match="title-only/9"):
        TextProjection.from_bundle(odd)


# -- decoding item records -------------------------------------------------------------------
LIMITS = CodecLimits()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"n1", b"", "empty_payload"),
        (b"n1", b"x" * (LIMITS.max_event_bytes + 1), "oversized"),
        (b"n1", b"\xff\xfe", "not_utf8"),
        (b"n1", b"{", "not_json"),
        (b"n1", b"[]", "not_object"),
        (b"n1", b'{"schema_version": 1, "item_id": "n1"}', "missing_field"),
        (b"n1", b'{"schema_version": 2, "item_id": "n1", "title": "T"}', "unsupported_version"),
        (b"n1", b'{"schema_version": 1, "item_id": "n1", "title": 5}', "wrong_type"),
        (b"n1", b'{"schema_version": 1, "item_id": "n1", "title": " "}', "empty_field"),
        (b"other", b'{"schema_version": 1, "item_id": "n1", "title": "T"}', "key_mismatch"),
        (None, None, "key_mismatch"),  # a tombstone that names no item
    ],
)
def test_invalid_item_records_get_a_dead_letter_reason(
    key: bytes | None, value: bytes | None, reason: str
) -> None:
    result = decode_item(key, value, LIMITS)
    assert isinstance(result, Invalid) and result.reason == reason and result.detail


def test_item_records_and_tombstones_decode() -> None:
    record = {"schema_version": 1, "item_id": "n1", "title": " Heat ", "genres": ["Crime"]}
    item = decode_item(b"n1", orjson.dumps(record), LIMITS)
    assert item == ItemRecord("n1", " Heat ", ("Crime",))
    assert isinstance(item, ItemRecord) and item.text() == "Heat. Genres: Crime"
    assert decode_item(b"n1", None, LIMITS) == ItemTombstone("n1")
    # The year joins the title unless the title carries it already (as catalogue titles do).
    assert ItemRecord("n1", "Heat", year=1995).text() == "Heat (1995)"
    assert ItemRecord("n1", "Heat (1995)", year=1995).text() == "Heat (1995)"


def test_item_features_and_the_text_bias_follow_the_bundle(
    tmp_path: Path, encoder: TextEncoder, metrics: ProcessorMetrics
) -> None:
    """A bundle trained with item features maps [text_emb, features of the same text] and gives
    each runtime item its own score bias: the rows the model itself has for such an item."""
    bundle = make_bundle(tmp_path, features=True)
    catalogue, sink = Catalogue(encoder.path, metrics), RecordingSink()
    catalogue.attach(bundle, sink)
    heat = ItemRecord("n1", "Heat", ("Action", "Crime", "Thriller"), 1995)
    catalogue.apply([heat])
    text = heat.text()
    x = np.concatenate([encoder.encode([text])[0], item_features(text, GENRES)])
    w, b = (np.load(bundle.path / name) for name in (TEXT_PROJ_W, TEXT_PROJ_B))
    np.testing.assert_allclose(sink.vectors["n1"], x @ w + b, rtol=1e-4, atol=1e-4)
    score = np.load(bundle.path / TEXT_BIAS)
    assert sink.bias["n1"] == pytest.approx(float(x @ score[:-1] + score[-1]), rel=1e-4, abs=1e-4)
    assert item_features(text, GENRES)[-2:] == [1.0, 1.0]  # Thriller is outside the vocabulary

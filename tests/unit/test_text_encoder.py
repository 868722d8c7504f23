"""The text encoder: ONNX export with parity against sentence-transformers, and the torch-free
reader that serving uses (stream/text.py; tests/integration/test_cli.py checks that serving
imports neither torch nor transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.item_text import ENCODER_MANIFEST, ENCODER_ONNX, PARITY, TEXT_DIM, item_text
from export.text_encoder import MIN_COSINE, PARITY_TEXTS, export_text_encoder
from stream.errors import ConfigError
from stream.synthetic import SyntheticConfig, generate
from stream.text import TextEncoder
from tests.text_fixtures import cached_text_encoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_text_encoder(tmp_path_factory.mktemp("text") / "encoder")


@pytest.fixture(scope="module")
def catalogue_texts() -> list[str]:
    items, _ = generate(SyntheticConfig(num_users=20, num_items=64, num_genres=8, seed=3))
    return [item_text(i.title, i.genres) for i in items]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_export_records_parity_and_the_reader_reproduces_it(exported: Path) -> None:
    manifest = json.loads((exported / ENCODER_MANIFEST).read_text(encoding="utf-8"))
    assert manifest["parity"]["texts"] == len(PARITY_TEXTS) >= 36
    assert manifest["parity"]["min_cosine"] >= MIN_COSINE
    assert manifest["parity"]["max_abs_diff"] < 1e-4
    assert set(manifest["files"]) == {ENCODER_ONNX, "tokenizer.json", PARITY}
    encoder = TextEncoder(exported)
    reference = np.load(exported / PARITY)  # sentence-transformers' own vectors
    actual = encoder.encode(list(manifest["parity_texts"]))
    assert actual.shape == reference.shape == (len(PARITY_TEXTS), TEXT_DIM)
    assert _cosines(actual, reference).min() >= MIN_COSINE
    assert encoder.parity() >= MIN_COSINE


def test_encoder_matches_sentence_transformers_on_catalogue_texts(
    exported: Path, catalogue_texts: list[str]
) -> None:
    from export.text_encoder import load_sentence_transformer

    st = load_sentence_transformer()
    expected = st.encode(catalogue_texts, normalize_embeddings=True, show_progress_bar=False)
    actual = TextEncoder(exported, batch_size=16).encode(catalogue_texts)
    assert actual.dtype == np.float32 and actual.shape == (len(catalogue_texts), TEXT_DIM)
    assert _cosines(actual, expected).min() >= MIN_COSINE
    assert np.max(np.abs(actual - expected)) < 1e-4


def test_encode_keeps_order_across_length_sorted_batches(catalogue_texts: list[str]) -> None:
    encoder = cached_text_encoder()
    texts = [*catalogue_texts[:9], "x", " ".join(["long words"] * 200)]
    together = encoder.encode(texts)
    one_by_one = np.concatenate([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, TEXT_DIM)
    # Similar texts are closer than unrelated ones: the vectors mean something.
    a, b, c = encoder.encode(
        [
            "Frozen Harbor (1990). Genres: Horror, Thriller",
            "Silent Tower (2001). Genres: Horror, Thriller",
            "Golden Garden (1975). Genres: Children, Musical",
        ]
    )
    assert a @ b > a @ c


def test_a_tampered_or_missing_encoder_is_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="export-text-encoder"):
        TextEncoder(tmp_path / "nothing")
    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    with (copy / "tokenizer.json").open("a", encoding="utf-8") as fh:
        fh.write(" ")
    with pytest.raises(ConfigError, match="sha256"):
        TextEncoder(copy)
    (copy / ENCODER_MANIFEST).write_text('{"format_version": 99}', encoding="utf-8")
    with pytest.raises(ConfigError, match="format"):
        TextEncoder(copy)

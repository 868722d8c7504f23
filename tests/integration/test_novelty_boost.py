"""The text-aware model's novelty boost through export and serving, on real graphs.

A TextSASRec is trained for a few seconds on the synthetic catalogue with 10% of its items held
out of training (model.data.cold_start_split), so those items have no trained ID, and exported
with and without `novelty_boost`. Every graph (model.onnx, prefill.onnx, step.onnx) must add
the boost to exactly the held-out items' scores; serving must add it where it scores outside the
graphs: headless ranking (item_bias.npy) and items added at run time (manifest config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.bundle import ITEM_BIAS, Bundle, load_bundle
from export.item_text import ITEM_TEXT_EMB, TEXT_BIAS, TEXT_DIM, TEXT_FORMAT
from stream.config import ProcessorSettings
from stream.incremental import make_scorer, rank_batch
from stream.scoring import Scored, load_item_table

BOOST = 0.8


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path
) -> tuple[Bundle, Bundle, Bundle, np.ndarray]:
    """(plain, boosted, boosted headless, held-out item indices)."""
    from export.onnx_export import export_bundle
    from model.config import SASRecConfig, TrainConfig
    from model.data import cold_start_split, load_dataset
    from model.train import train

    dataset, held = cold_start_split(load_dataset(f"synthetic:{synthetic_dir}"), 0.1, seed=0)
    model_cfg = SASRecConfig(
        num_items=dataset.num_items, max_len=12, d_model=16, text_dim=TEXT_DIM,
        text_encoder="sentence-transformers/all-MiniLM-L6-v2", text_format=TEXT_FORMAT,
        id_dropout=0.2,
    )  # fmt: skip
    work = tmp_path_factory.mktemp("boost")
    ckpt = train(dataset, model_cfg, TrainConfig(epochs=1, batch_size=64, threads=1), work,
                 progress=False)  # fmt: skip
    plain = load_bundle(export_bundle(ckpt, work / "plain"))
    boosted = load_bundle(export_bundle(ckpt, work / "boosted", novelty_boost=BOOST))
    headless = load_bundle(
        export_bundle(ckpt, work / "headless", novelty_boost=BOOST, score_head=False)
    )
    return plain, boosted, headless, held


def run(bundle: Bundle, graph: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["scores"], feeds)[0])


def windows(num_items: int, rows: int = 8, width: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    seq = rng.integers(1, num_items + 1, size=(rows, width))
    seq[:, : width // 3] = 0  # left padding
    return seq.astype(np.int64)


def test_every_graph_adds_the_boost_to_the_untrained_items_only(bundles) -> None:
    plain, boosted, _, held = bundles
    expected = np.zeros(boosted.num_items + 1, np.float32)
    expected[held] = BOOST
    assert boosted.manifest.config["novelty_boost"] == BOOST
    assert ITEM_BIAS in boosted.manifest.files and ITEM_BIAS not in plain.manifest.files
    np.testing.assert_array_equal(np.load(boosted.path / ITEM_BIAS), expected)

    seq = windows(boosted.num_items)
    for graph in ("model.onnx", "prefill.onnx"):
        lift = run(boosted, boosted.path / graph, {"item_seq": seq}) - run(
            plain, plain.path / graph, {"item_seq": seq}
        )
        np.testing.assert_allclose(lift, np.broadcast_to(expected, lift.shape), atol=1e-4)
    assert boosted.manifest.step is not None
    step = {
        "item": np.array([3, 7], np.int64),
        "position": np.array([0, 0], np.int64),
        "past_kv": np.zeros((2, 2, 2, 1, 16), np.float16),
    }
    lift = run(boosted, boosted.path / "step.onnx", step) - run(
        plain, plain.path / "step.onnx", step
    )
    np.testing.assert_allclose(lift, np.broadcast_to(expected, lift.shape), atol=1e-4)


def test_serving_adds_the_boost_outside_the_graphs(bundles, tmp_path: Path) -> None:
    _, boosted, headless, held = bundles
    table = load_item_table(headless)
    assert table.view.runtime_boost == BOOST
    vectors = table.view.bundle_vectors
    assert vectors is not None and table.view.bundle_bias is not None
    table.add_items(["brand-new"], vectors[held[:1]])  # a runtime item: never trained
    view = table.view
    settings = ProcessorSettings(state_dir=tmp_path, topk="exact", inference="full")
    scorer = make_scorer(headless, settings)
    scorer.items = table
    seq = windows(headless.num_items)
    _, hidden = scorer.score_hidden(seq)
    assert hidden is not None
    truth = hidden @ view.vectors.T + np.concatenate([view.bundle_bias, [BOOST]])
    truth[:, 0] = -np.inf
    # the headless ranking equals the score head's (boosted bundle) plus the runtime item
    head = run(boosted, boosted.path / "model.onnx", {"item_seq": seq})
    np.testing.assert_allclose(truth[:, 1:-1], head[:, 1:], rtol=1e-4, atol=1e-4)
    seen = np.zeros((len(seq), 1), np.int64)
    best, scores = rank_batch(scorer, Scored(None, hidden, {}), seen, view, 10)
    np.testing.assert_array_equal(best, np.argsort(-truth, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.sort(truth, axis=1)[:, ::-1][:, :10], rtol=1e-5)


@pytest.fixture(scope="module")
def featured(
    tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path
) -> tuple[Bundle, np.ndarray, list[str]]:
    """(boosted bundle of a model with item features and a text bias, held-out items, texts)."""
    from export.onnx_export import export_bundle
    from model.config import SASRecConfig, TrainConfig
    from model.data import cold_start_split, load_dataset
    from model.text import dataset_texts
    from model.train import train

    dataset, held = cold_start_split(load_dataset(f"synthetic:{synthetic_dir}"), 0.1, seed=0)
    model_cfg = SASRecConfig(
        num_items=dataset.num_items, max_len=12, d_model=16, text_dim=TEXT_DIM,
        text_encoder="sentence-transformers/all-MiniLM-L6-v2", text_format=TEXT_FORMAT,
        id_dropout=0.2, item_features=True, text_bias=True,
    )  # fmt: skip
    work = tmp_path_factory.mktemp("featured")
    ckpt = train(dataset, model_cfg, TrainConfig(epochs=1, batch_size=64, threads=1), work,
                 progress=False)  # fmt: skip
    bundle = load_bundle(export_bundle(ckpt, work / "bundle", novelty_boost=BOOST))
    return bundle, held, dataset_texts(dataset)


def test_a_text_bias_is_in_every_score_of_an_untrained_item_and_in_serving(featured) -> None:
    """The graphs add boost + text bias to the held-out items; serving, given the same text,
    builds the same vector and the same bias for a runtime item (stream.catalogue)."""
    from stream.catalogue import TextProjection

    bundle, held, texts = featured
    genres = bundle.manifest.config["feature_genres"]
    assert bundle.manifest.config["item_features"] and len(genres) > 1  # filled by training
    assert TEXT_BIAS in bundle.manifest.files
    bias = np.load(bundle.path / ITEM_BIAS)
    untrained = np.zeros(bundle.num_items + 1, bool)
    untrained[held] = True
    assert np.all(bias[~untrained] == 0)
    projection = TextProjection.from_bundle(bundle)
    assert projection is not None and projection.genres == tuple(genres)
    emb = np.load(bundle.path / ITEM_TEXT_EMB)[held]  # (H, 384)
    vectors, text_bias = projection(emb, [texts[i - 1] for i in held])
    assert text_bias is not None and np.ptp(text_bias) > 0  # a bias per item, not a constant
    np.testing.assert_allclose(bias[held], text_bias + BOOST, rtol=1e-5, atol=1e-5)
    table = np.load(bundle.path / "item_vectors.npy")
    np.testing.assert_allclose(vectors, table[held], rtol=1e-4, atol=1e-4)
    seq = windows(bundle.num_items)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    scores, hidden = session.run(["scores", "hidden"], {"item_seq": seq})
    np.testing.assert_allclose(scores, hidden @ table.T + bias, rtol=1e-4, atol=1e-4)
    prefill = run(bundle, bundle.path / "prefill.onnx", {"item_seq": seq})
    np.testing.assert_allclose(prefill, scores, rtol=1e-4, atol=1e-4)  # the step graphs too

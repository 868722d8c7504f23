"""Bundles that break the contract are refused, with an error that says what is wrong.

The models are built by hand with onnx.helper (an embedding Gather, a mean over the window and a
MatMul back onto the item embeddings), so each one can break exactly one rule of the contract;
the bundles are written by the real `export.bundle.write_bundle`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from export.bundle import (
    ITEMS,
    MANIFEST,
    MODEL,
    load_bundle,
    sha256_file,
    write_bundle,
    write_items_csv,
)
from export.errors import BundleError, BundleIntegrityError
from stream.errors import ScoringError
from stream.scoring import OnnxScorer, left_pad, top_k

NUM_ITEMS = 8
MAX_LEN = 5
DIM = 4
OPSET = 17


def build_model(
    path: Path,
    *,
    num_items: int = NUM_ITEMS,
    max_len: int | str = MAX_LEN,
    input_name: str = "item_seq",
    input_type: int = TensorProto.INT64,
    output_name: str = "scores",
    output_type: int = TensorProto.FLOAT,
    output_rank: int = 2,
    with_time: bool = False,
    extra_input: str | None = None,
) -> Path:
    """scores = mean(E[item_seq], over the window) @ E.T, shape (batch, num_items + 1)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((num_items + 1, DIM)).astype(np.float32)
    width = num_items + 1
    nodes = [
        helper.make_node("Gather", ["emb", input_name], ["seq_emb"], axis=0),
        helper.make_node("ReduceMean", ["seq_emb"], ["user"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["user", "emb_t"], ["raw"]),
    ]
    inputs = [helper.make_tensor_value_info(input_name, input_type, ["batch", max_len])]
    last = "raw"
    for name in [n for n in ("time_seq" if with_time else None, extra_input) if n]:
        # A real use of the input (onnxruntime would otherwise prune it): + 0 * mean(input).
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", max_len]))
        nodes += [
            helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", [f"{name}_f"], [f"{name}_m"], axes=[1], keepdims=1),
            helper.make_node("Mul", [f"{name}_m", "zero"], [f"{name}_0"]),
            helper.make_node("Add", [last, f"{name}_0"], [f"{last}+{name}"]),
        ]
        last = f"{last}+{name}"
    shape: list[int | str] = ["batch", width]
    if output_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [last], [f"{last}_cast"], to=output_type))
        last = f"{last}_cast"
    if output_rank == 3:
        nodes.append(helper.make_node("Unsqueeze", [last, "axis1"], [f"{last}_3d"]))
        last, shape = f"{last}_3d", ["batch", 1, width]
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    graph = helper.make_graph(
        nodes,
        "hand_built",
        inputs,
        [helper.make_tensor_value_info(output_name, output_type, shape)],
        initializer=[
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(np.ascontiguousarray(emb.T), "emb_t"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # what this onnxruntime certainly reads
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def reference_scores(item_seq: np.ndarray, num_items: int = NUM_ITEMS) -> np.ndarray:
    emb = np.random.default_rng(0).standard_normal((num_items + 1, DIM)).astype(np.float32)
    return np.asarray(emb[item_seq].mean(axis=1) @ emb.T, dtype=np.float32)


def catalogue(n: int = NUM_ITEMS) -> list[tuple[str, str]]:
    return [(f"i{k:03d}", f"Title {k}, with a comma") for k in range(1, n + 1)]


def bundle_of(
    tmp_path: Path,
    model: Path,
    *,
    name: str = "bundle",
    max_len: int = MAX_LEN,
    inputs: tuple[str, ...] = ("item_seq",),
    items: list[tuple[str, str]] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    return write_bundle(
        tmp_path / name,
        model_file=model,
        items=items if items is not None else catalogue(),
        model_name="hand",
        model_version="hand-1",
        max_len=max_len,
        inputs=inputs,
        extra_files=extra_files,
    )


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], object]) -> None:
    path = bundle / MANIFEST
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw), encoding="utf-8")


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return bundle_of(tmp_path, build_model(tmp_path / "good.onnx"))


# -- the positive control ------------------------------------------------------------------------


@pytest.mark.parametrize("with_time", [False, True], ids=["item_seq", "item_seq+time_seq"])
def test_a_hand_built_contract_model_loads_and_scores_every_item_column(
    tmp_path: Path, with_time: bool
) -> None:
    model = build_model(tmp_path / "m.onnx", with_time=with_time)
    inputs = ("item_seq", "time_seq") if with_time else ("item_seq",)
    bundle = load_bundle(bundle_of(tmp_path, model, inputs=inputs))
    assert bundle.num_items == NUM_ITEMS and bundle.manifest.inputs == inputs
    assert bundle.item_ids[1:] == tuple(i for i, _ in catalogue())
    scorer = OnnxScorer(bundle)
    item_seq = left_pad([[1, 2, 3], [], [8, 8, 7, 6, 5, 4]], bundle.max_len)
    assert scorer.uses_time == with_time
    if with_time:  # a time-aware model without its click times is refused, not fed zeros
        with pytest.raises(ScoringError, match="time_seq"):
            scorer.score(item_seq)
    time_seq = np.where(item_seq != 0, 1_700_000_000, 0) if with_time else None
    scores = scorer.score(item_seq, time_seq)
    assert scores.shape == (3, NUM_ITEMS + 1) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference_scores(item_seq), rtol=1e-5, atol=1e-5)
    best, _ = top_k(scores, item_seq, 3)
    assert not set(best[0].tolist()) & {0, 1, 2, 3}


# -- files that do not match the manifest ---------------------------------------------------------


def _append_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize("name", [MODEL, ITEMS, "vocab.txt"])
@pytest.mark.parametrize("damage", [_append_byte, _flip_first_byte, _truncate])
def test_a_file_that_does_not_match_its_hash_is_refused_naming_the_file(
    tmp_path: Path, name: str, damage: Callable[[Path], None]
) -> None:
    extra = tmp_path / "vocab.txt"
    extra.write_text("a side file the manifest also vouches for\n", encoding="utf-8")
    bundle = bundle_of(tmp_path, build_model(tmp_path / "m.onnx"), extra_files={"vocab.txt": extra})
    load_bundle(bundle)  # intact: loads
    damage(bundle / name)
    with pytest.raises(BundleIntegrityError, match=rf"bundle file {name} has sha256"):
        load_bundle(bundle)


def test_a_manifest_hash_that_does_not_match_is_refused(good: Path) -> None:
    edit_manifest(good, lambda raw: raw["files"].__setitem__(MODEL, "0" * 64))
    with pytest.raises(BundleIntegrityError, match=rf"{MODEL}.*manifest says 000000000000"):
        load_bundle(good)


@pytest.mark.parametrize("name", [MODEL, ITEMS])
def test_a_missing_file_is_refused_naming_the_file(good: Path, name: str) -> None:
    (good / name).unlink()
    with pytest.raises(BundleIntegrityError, match=rf"bundle file {name} is missing"):
        load_bundle(good)


def test_a_manifest_that_does_not_list_the_model_is_refused(good: Path) -> None:
    edit_manifest(good, lambda raw: raw["files"].pop(MODEL))
    with pytest.raises(BundleError, match=rf"does not list {MODEL}"):
        load_bundle(good)


def test_items_csv_that_disagrees_with_num_items_is_refused(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    bundle = bundle_of(tmp_path, model, items=catalogue(NUM_ITEMS - 1))
    edit_manifest(bundle, lambda raw: raw.__setitem__("num_items", NUM_ITEMS))
    with pytest.raises(BundleError, match=r"items\.csv lists 7 items, manifest says 8"):
        load_bundle(bundle)


# -- manifests that break the format ---------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 0, "2"])
def test_another_format_version_is_refused(good: Path, version: object) -> None:
    edit_manifest(good, lambda raw: raw.__setitem__("format_version", version))
    with pytest.raises(BundleError, match=r"format_version 2|format_version 0"):
        load_bundle(good)


@pytest.mark.parametrize(
    "field", ["format_version", "model_name", "model_version", "max_len", "num_items", "files"]
)
def test_a_manifest_missing_a_required_field_is_refused(good: Path, field: str) -> None:
    edit_manifest(good, lambda raw: raw.pop(field))
    with pytest.raises(BundleError, match=rf"malformed: KeyError\('{field}'\)"):
        load_bundle(good)


@pytest.mark.parametrize(
    "inputs",
    [["item_seq", "user_id"], ["items"], ["time_seq"], [], "item_seq", 7, None],
    ids=["extra", "renamed", "no-item_seq", "empty", "a-string", "a-number", "null"],
)
def test_manifest_inputs_outside_the_contract_are_refused(good: Path, inputs: object) -> None:
    edit_manifest(good, lambda raw: raw.__setitem__("inputs", inputs))
    with pytest.raises(BundleError):
        load_bundle(good)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"manifest"', "null", "\udcff"])
def test_a_manifest_that_is_not_an_object_is_refused(good: Path, text: str) -> None:
    (good / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(BundleError):
        load_bundle(good)


def test_a_directory_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_the_writer_refuses_inputs_outside_the_contract_and_leaves_nothing(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    with pytest.raises(BundleError, match="do not follow the contract"):
        bundle_of(tmp_path, model, inputs=("items",), name="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "no bundle, no staging dir"


manifest_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and ±Infinity: json.dumps writes them, json.loads reads them
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.text(max_size=10) | st.sampled_from([MODEL, ITEMS]), children, max_size=3
        )
    ),
    max_leaves=10,
)
manifest_fields = st.sampled_from(
    ["format_version", "model_name", "model_version", "max_len", "num_items", "files", "inputs",
     "created_ts", "training_data", "metrics", "config", "step"]
)  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return bundle_of(root, build_model(root / "m.onnx"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(manifest_fields, st.none() | manifest_values, max_size=3))
@example(changes={"max_len": float("inf")})
@example(changes={"num_items": float("nan")})
@example(changes={"files": "model.onnx"})
@example(changes={"inputs": {"item_seq": 1}})
def test_hostile_manifest_values_give_a_bundle_error_or_a_bundle(
    pristine: Path, changes: dict[str, Any]
) -> None:
    """Any value in any field (None = the field is deleted): never an unexpected exception."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(shutil.copytree(pristine, Path(tmp) / "b"))

        def change(raw: dict[str, Any]) -> None:
            for field, value in changes.items():
                if value is None:
                    raw.pop(field, None)
                else:
                    raw[field] = value

        edit_manifest(bundle, change)
        try:
            loaded = load_bundle(bundle)
        except BundleError:
            return
        assert loaded.item_ids[1:] == tuple(i for i, _ in catalogue())


@pytest.mark.parametrize("field", ["max_len", "num_items", "format_version"])
def test_an_infinite_number_in_the_manifest_is_a_bundle_error(good: Path, field: str) -> None:
    edit_manifest(good, lambda raw: raw.__setitem__(field, float("inf")))  # JSON: Infinity
    with pytest.raises(BundleError):
        load_bundle(good)


def test_a_deeply_nested_manifest_is_a_bundle_error(good: Path) -> None:
    (good / MANIFEST).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(BundleError):
        load_bundle(good)


@pytest.mark.parametrize(("field", "value"), [("max_len", 0), ("max_len", -3), ("num_items", 0)])
def test_non_positive_sizes_are_refused(good: Path, field: str, value: int) -> None:
    if field == "num_items":  # an empty catalogue, with a hash that matches it
        write_items_csv(good / ITEMS, [])
        edit_manifest(good, lambda raw: raw["files"].__setitem__(ITEMS, sha256_file(good / ITEMS)))
    edit_manifest(good, lambda raw: raw.__setitem__(field, value))
    with pytest.raises(BundleError):
        load_bundle(good)


# -- ONNX models that break the contract -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "items"}, r"inputs \['items'\].*needs input item_seq"),
        ({"output_name": "logits"}, r"outputs \['logits'\].*output scores"),
    ],
    ids=["input-named-items", "no-scores-output"],
)
def test_a_model_without_the_contract_names_is_refused_by_the_scorer(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    bundle = load_bundle(bundle_of(tmp_path, build_model(tmp_path / "m.onnx", **kwargs)))
    with pytest.raises(ScoringError, match=message):
        OnnxScorer(bundle)


def test_a_model_file_that_is_not_onnx_is_refused_by_the_scorer(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07definitely not a protobuf of a graph" * 10)
    bundle = load_bundle(bundle_of(tmp_path, garbage))  # the hashes match: the loader accepts
    with pytest.raises(ScoringError, match="onnxruntime cannot load"):
        OnnxScorer(bundle)


# The scorer checks only the names today. Each model below loads and then fails (or silently
# misbehaves) on the first batch, so a hot reload would be accepted and every event afterwards
# dead-lettered as scoring_failed. They should be refused when the scorer is built.
CONTRACT_GAPS = [
    pytest.param({"input_type": TensorProto.INT32}, id="item_seq-int32"),
    pytest.param({"extra_input": "user_features"}, id="extra-required-input"),
    pytest.param({"output_rank": 3}, id="scores-rank-3"),
    pytest.param({"output_type": TensorProto.DOUBLE}, id="scores-float64"),
    pytest.param({"num_items": NUM_ITEMS - 3}, id="scores-width-not-num_items+1"),
    pytest.param({"max_len": MAX_LEN + 2}, id="item_seq-length-not-max_len"),
]


@pytest.mark.parametrize("kwargs", CONTRACT_GAPS)
def test_a_model_that_breaks_the_contract_otherwise_is_refused_when_loaded(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    bundle = load_bundle(bundle_of(tmp_path, build_model(tmp_path / "m.onnx", **kwargs)))
    with pytest.raises(ScoringError, match="contract"):
        OnnxScorer(bundle)

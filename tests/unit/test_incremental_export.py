"""Incremental inference: the window rule, step vs full model (PyTorch and onnxruntime), and
bundles with and without the step pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from export.bundle import (
    ITEM_VECTORS,
    MANIFEST,
    PREFILL,
    STEP,
    default_stride,
    load_bundle,
    next_window_len,
    window_len,
)
from export.errors import BundleError, ParityError
from export.graphs import check_top_k, parity_times, parity_windows
from export.onnx_export import export_bundle, write_arrays
from export.step_export import (
    STEP_RTOL,
    check_replay,
    check_step_parity,
    export_step_pair,
    onnx_fns,
    replay,
    torch_fns,
)
from model.config import SASRecConfig
from model.errors import ModelError
from model.incremental import Prefill, StepModel, supports_step
from model.sasrec import SASRec
from model.train import load_checkpoint, model_from_checkpoint
from tests.unit.test_model import sharpen

torch.set_num_threads(2)
NUM_ITEMS = 40


def sharp_model(seed: int = 0, **cfg: Any) -> SASRec:
    """A random model with weights 10x the init (LayerNorms kept), so attention is far from
    uniform and scores spread (std ~1) as a trained model's do."""
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(num_items=NUM_ITEMS, **{"max_len": 12, "d_model": 16, **cfg}))
    return sharpen(model).eval()


# --- the window rule -------------------------------------------------------------------------


def test_the_window_grows_by_one_until_full_then_slides_by_stride() -> None:
    lengths, cached = [], 0
    for _ in range(14):
        cached = next_window_len(cached, max_len=6, stride=3)
        lengths.append(cached)
    assert lengths == [1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 5]
    assert default_stride(50) == 25 and default_stride(1) == 1


@given(max_len=st.integers(1, 60), data=st.data())
def test_window_len_is_what_appending_one_click_at_a_time_gives(
    max_len: int, data: st.DataObject
) -> None:
    stride = data.draw(st.integers(1, max_len))
    cached = 0
    for history in range(1, 3 * max_len + 2):
        new = next_window_len(cached, max_len, stride)
        assert new == window_len(history, max_len, stride)
        assert new == cached + 1 or (cached == max_len and new == max_len - stride + 1)
        assert 1 <= new <= max_len
        cached = new


@pytest.mark.parametrize(
    ("cached", "max_len", "stride"), [(-1, 5, 2), (6, 5, 2), (0, 5, 0), (0, 5, 6), (0, 0, 1)]
)
def test_the_window_rule_refuses_impossible_arguments(cached: int, max_len: int, stride: int):
    with pytest.raises(ValueError):
        next_window_len(cached, max_len, stride)


# --- step vs full model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"n_heads": 1},
        {"n_heads": 2},
        {"n_heads": 4, "n_blocks": 3},
        {"n_blocks": 1},
        {"n_heads": 2, "norm": "post"},
    ],
)
@pytest.mark.parametrize("from_empty", [True, False], ids=["from-empty", "after-prefill"])
def test_torch_step_matches_the_full_model_on_every_window(cfg: dict[str, Any], from_empty: bool):
    model = sharp_model(**cfg)
    full, prefill, step = torch_fns(model)
    for seed in range(2):
        windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 17, seed)
        assert check_replay(windows, full, prefill, step, from_empty=from_empty) <= STEP_RTOL


def timed_model(**cfg: Any) -> SASRec:
    """A sharp time-aware model whose time terms matter: relation and session biases of the
    size of the attention logits (they start at 0 in training)."""
    model = sharp_model(**{"time_buckets": 28, **cfg})
    assert model.time is not None
    with torch.no_grad():
        model.time.relation_bias.weight.normal_(0.0, 2.0)
        model.time.session_bias.weight.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize(
    "cfg",
    [{"n_heads": 2}, {"norm": "post", "n_blocks": 3}, {"session_gap_s": 60, "time_buckets": 12}],
)
@pytest.mark.parametrize("from_empty", [True, False], ids=["from-empty", "after-prefill"])
def test_time_aware_step_matches_the_full_model_given_the_click_times(
    cfg: dict[str, Any], from_empty: bool
) -> None:
    model = timed_model(**cfg)
    assert supports_step(model)
    full, prefill, step = torch_fns(model)
    for seed in range(2):
        windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 17, seed)
        times = parity_times(windows, seed)
        assert check_replay(windows, full, prefill, step, from_empty=from_empty, times=times) <= (
            STEP_RTOL
        )


def test_the_replay_catches_a_time_step_fed_other_times() -> None:
    """The new click's time and the cached slots' times both reach the step: a step that sees
    them shifted by an hour (intervals unchanged, elapsed buckets too) passes, one that sees
    the cached slots' times as zero does not."""
    model = timed_model(n_heads=2)
    full, prefill, step = torch_fns(model)
    windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 17)
    times = parity_times(windows)

    def shifted(item, pos, past, time, past_time):  # type: ignore[no-untyped-def]
        return step(item, pos, past, time + 3600, past_time + 3600)

    def zero_past(item, pos, past, time, past_time):  # type: ignore[no-untyped-def]
        return step(item, pos, past, time, np.zeros_like(past_time))

    def no_click_time(item, pos, past, time, past_time):  # type: ignore[no-untyped-def]
        return step(item, pos, past, past_time[:, 0], past_time)

    assert check_replay(windows, full, prefill, shifted, times=times) <= STEP_RTOL
    for wrong in (zero_past, no_click_time):
        with pytest.raises(ParityError):
            check_replay(windows, full, prefill, wrong, times=times)
    with pytest.raises(ModelError, match="time-aware"):
        StepModel(model)(torch.ones(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                         torch.zeros(1, 2, 2, 1, 16, dtype=torch.float16))  # fmt: skip


def test_the_replay_covers_growth_from_empty_to_max_len_with_mixed_positions() -> None:
    model = sharp_model()
    windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 17)
    calls = list(replay(windows, *torch_fns(model), from_empty=True))
    seen = {
        (int(r), int(n)) for call in calls for r, n in zip(call.rows, call.lengths, strict=True)
    }
    lengths = (windows != 0).sum(axis=1)
    assert seen == {(r, n) for r in range(17) for n in range(1, lengths[r] + 1)}
    assert any(len(set(call.lengths.tolist())) > 1 for call in calls)


def test_the_replay_catches_a_step_model_of_other_weights() -> None:
    model, other = sharp_model(seed=0), sharp_model(seed=1)
    full, prefill, _ = torch_fns(model)
    windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 17)
    with pytest.raises(ParityError):
        check_replay(windows, full, prefill, torch_fns(other)[2])


def test_prefill_keys_and_values_are_the_full_models_own() -> None:
    model = sharp_model(n_heads=2)
    windows = torch.from_numpy(parity_windows(NUM_ITEMS, model.cfg.max_len, 5))
    with torch.no_grad():
        scores, _, kv = Prefill(model)(windows)
        want = model.score_last(windows)
        x = model.item_vectors()[windows] * 4.0 + model.pos_emb(model.positions(windows))
        first_qkv = model.blocks[0].attn.qkv(model.blocks[0].ln_1(x))  # (B, L, 3D)
    assert torch.allclose(scores, want, atol=1e-5)
    assert kv.shape == (5, 2, 2, 12, 16) and kv.dtype == torch.float16
    assert torch.allclose(kv[:, 0, 0].float(), first_qkv[..., 16:32], atol=2e-3, rtol=2e-3)
    assert torch.allclose(kv[:, 0, 1].float(), first_qkv[..., 32:], atol=2e-3, rtol=2e-3)


def test_slot_position_models_have_no_step_model() -> None:
    model = sharp_model(positions="slot")
    assert not supports_step(model)
    for wrapper in (Prefill, StepModel):
        with pytest.raises(ModelError, match="positions='first'"):
            wrapper(model)


@pytest.mark.parametrize("variant", ["pre", "post", "time"])
def test_onnx_step_pair_matches_torch_and_the_full_model(tmp_path: Path, variant: str) -> None:
    timed = variant == "time"
    model = timed_model(n_heads=2) if timed else sharp_model(n_heads=2, norm=variant)
    paths = export_step_pair(model, tmp_path)
    step_inputs = [i.name for i in ort.InferenceSession(str(paths[STEP])).get_inputs()]
    prefill_inputs = [i.name for i in ort.InferenceSession(str(paths[PREFILL])).get_inputs()]
    if variant == "time":
        assert step_inputs == ["item", "position", "past_kv", "time", "past_time"]
        assert prefill_inputs == ["item_seq", "time_seq"]
    else:
        assert step_inputs == ["item", "position", "past_kv"] and prefill_inputs == ["item_seq"]
    diffs = check_step_parity(model, paths[PREFILL], paths[STEP])
    assert diffs["prefill_max_abs_diff"] <= 1e-4
    assert 0 < diffs["step_max_rel_diff"] <= STEP_RTOL
    full = torch_fns(model)[0]
    windows = parity_windows(NUM_ITEMS, model.cfg.max_len, 9, seed=5)
    times = parity_times(windows, 5) if variant == "time" else None
    onnx_pair = onnx_fns(paths[PREFILL], paths[STEP])
    assert check_replay(windows, full, *onnx_pair, from_empty=True, times=times) <= STEP_RTOL


def test_onnx_step_follows_the_window_rule_over_long_histories(tmp_path: Path) -> None:
    """Serving's loop: step while the window grows, prefill when it slides; every click's
    scores equal the full model's on the newest window_len items."""
    model = sharp_model()
    L, stride = model.cfg.max_len, 5
    paths = export_step_pair(model, tmp_path)
    prefill, step = onnx_fns(paths[PREFILL], paths[STEP])
    full = torch_fns(model)[0]
    history = np.random.default_rng(3).integers(1, NUM_ITEMS + 1, size=(4, 3 * L + 4))
    cache = np.zeros((4, 2, 2, L, 16), np.float16)  # (B, nb, 2, L, D)
    cached, rebuilds = 0, 0
    for t in range(history.shape[1]):
        n = next_window_len(cached, L, stride)
        window = np.zeros((4, L), np.int64)
        window[:, L - n :] = history[:, t + 1 - n : t + 1]
        if n == cached + 1:
            pos = np.full(4, cached)
            scores, _, new_kv = step(history[:, t], pos, cache[:, :, :, : max(cached, 1)])
            cache[:, :, :, cached] = new_kv
        else:
            rebuilds += 1
            scores, _, kv = prefill(window)
            cache[:, :, :, :n] = kv[:, :, :, L - n :]
        want = full(window)[0]
        tol = STEP_RTOL * (1 + np.abs(want).max())
        assert np.abs(scores - want).max() <= tol
        check_top_k(want, scores, 10, tol)
        cached = n
    assert rebuilds == (history.shape[1] - L - 1) // stride + 1


# --- bundles ---------------------------------------------------------------------------------


@pytest.fixture
def exported(trained: tuple[Any, Path, Path]) -> tuple[Path, Path]:
    """(checkpoint, bundle) of tests/unit/conftest.py's trained model."""
    return trained[1], trained[2]


def test_an_exported_bundle_carries_the_step_pair_and_item_vectors(exported) -> None:
    ckpt, bundle_dir = exported
    model = model_from_checkpoint(load_checkpoint(ckpt))
    bundle = load_bundle(bundle_dir)
    spec = bundle.step
    assert spec is not None and bundle.step_path and bundle.prefill_path
    assert (spec.n_blocks, spec.d_model, spec.n_heads, spec.stride) == (2, 16, 2, 5)
    assert (spec.prefill, spec.step, spec.cache_dtype) == (PREFILL, STEP, "float16")
    assert {PREFILL, STEP, ITEM_VECTORS} <= set(bundle.manifest.files)
    assert bundle.manifest.metrics["step_max_rel_diff"] <= STEP_RTOL
    vectors = np.load(bundle.item_vectors_path)
    assert vectors.dtype == np.float32 and vectors.shape == (16, 16)
    np.testing.assert_array_equal(vectors, model.item_vectors().detach().numpy())
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    windows = parity_windows(15, 10, 6)
    scores, hidden = session.run(["scores", "hidden"], {"item_seq": windows})
    np.testing.assert_allclose(scores, hidden @ vectors.T, atol=1e-5)


def test_a_slot_position_model_exports_without_the_step_pair(tmp_path: Path, exported) -> None:
    ckpt = load_checkpoint(exported[0])
    ckpt["model_config"] = {**ckpt["model_config"], "positions": "slot"}
    torch.save(ckpt, tmp_path / "slot.pt")
    bundle = load_bundle(export_bundle(tmp_path / "slot.pt", tmp_path / "bundle"))
    assert bundle.step is None and bundle.step_path is None
    assert not {PREFILL, STEP} & set(bundle.manifest.files)
    assert bundle.item_vectors_path is not None
    assert "step" not in json.loads((bundle.path / MANIFEST).read_text())


def _edit(bundle: Path, change: Any) -> None:
    raw = json.loads((bundle / MANIFEST).read_text())
    change(raw)
    (bundle / MANIFEST).write_text(json.dumps(raw))


def test_a_bundle_from_before_the_step_pair_still_loads(tmp_path: Path, exported) -> None:
    copy = Path(shutil.copytree(exported[1], tmp_path / "b"))

    def strip(raw: dict[str, Any]) -> None:
        del raw["step"]
        for name in (PREFILL, STEP, ITEM_VECTORS):
            del raw["files"][name]
            (copy / name).unlink()

    _edit(copy, strip)
    bundle = load_bundle(copy)
    assert bundle.step is None and bundle.item_vectors_path is None


@pytest.mark.parametrize(
    "step",
    [
        {"cache_dtype": "float32"},
        {"n_heads": 3},
        {"n_blocks": 0},
        {"stride": 0},
        {"stride": 11},
        {"step": "model.onnx"},
        {"prefill": "../prefill.onnx"},
        {"prefill": ".hidden"},
        {"step": "prefill.onnx"},
        {"stride": None},
        {"stride": float("nan")},
        "step.onnx",
        7,
    ],
    ids=repr,
)
def test_a_malformed_step_section_is_refused(tmp_path: Path, exported, step: Any) -> None:
    copy = Path(shutil.copytree(exported[1], tmp_path / "b"))

    def change(raw: dict[str, Any]) -> None:
        if isinstance(step, dict):  # merged into the good section; None deletes the key
            merged = {**raw["step"], **step}
            raw["step"] = {k: v for k, v in merged.items() if v is not None}
        else:
            raw["step"] = step

    _edit(copy, change)
    with pytest.raises(BundleError):
        load_bundle(copy)


def test_a_step_section_whose_file_is_not_listed_is_refused(tmp_path: Path, exported) -> None:
    copy = Path(shutil.copytree(exported[1], tmp_path / "b"))
    _edit(copy, lambda raw: raw["files"].pop(STEP))
    with pytest.raises(BundleError, match=r"does not list step\.onnx"):
        load_bundle(copy)


class _WithExtras(SASRec):
    def bundle_extras(self) -> dict[str, np.ndarray]:
        return {"text_proj_b": np.arange(4, dtype=np.float32)}


def test_bundle_extras_are_written_beside_item_vectors(tmp_path: Path) -> None:
    model = _WithExtras(SASRecConfig(num_items=5, max_len=4, d_model=8))
    paths = write_arrays(model, tmp_path)
    assert set(paths) == {ITEM_VECTORS, "text_proj_b.npy"}
    np.testing.assert_array_equal(np.load(paths["text_proj_b.npy"]), np.arange(4))
    assert np.load(paths[ITEM_VECTORS]).shape == (6, 8)


def test_a_headless_bundle_returns_the_full_models_hidden_and_no_scores(
    tmp_path: Path, exported
) -> None:
    ckpt, full_dir = exported
    headless = load_bundle(export_bundle(ckpt, tmp_path / "headless", score_head=False))
    full = load_bundle(full_dir)
    assert headless.score_head is False and full.score_head is True
    assert headless.manifest.config["score_head"] is False
    assert headless.item_vectors_path is not None and headless.step is not None
    vectors = np.load(headless.item_vectors_path)  # (N + 1, D)
    windows = parity_windows(15, 10, 9)  # (B, L)

    def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))

    got, want = (
        run(headless.model_path, {"item_seq": windows}),
        run(full.model_path, {"item_seq": windows}),
    )
    assert set(got) == {"hidden"}
    np.testing.assert_allclose(got["hidden"], want["hidden"], atol=1e-5)
    np.testing.assert_allclose(got["hidden"] @ vectors.T, want["scores"], atol=1e-4)
    assert full.prefill_path and headless.prefill_path and headless.step_path
    got, want = (
        run(headless.prefill_path, {"item_seq": windows}),
        run(full.prefill_path, {"item_seq": windows}),
    )
    assert set(got) == {"hidden", "kv"}
    np.testing.assert_allclose(got["hidden"], want["hidden"], atol=1e-5)
    np.testing.assert_array_equal(got["kv"], want["kv"])
    position = np.array([3, 0, 7], dtype=np.int64)
    feeds = {"item": np.array([1, 2, 3]), "position": position, "past_kv": got["kv"][:3, :, :, :8]}
    assert full.step_path is not None
    step, step_full = run(headless.step_path, feeds), run(full.step_path, feeds)
    assert set(step) == {"hidden", "new_kv"}
    np.testing.assert_allclose(step["hidden"], step_full["hidden"], atol=1e-5)
    # The score head's item table left the graph with it: the file is smaller.
    assert headless.model_path.stat().st_size < full.model_path.stat().st_size


def test_a_headless_manifest_needs_item_vectors_and_a_boolean_flag(
    tmp_path: Path, exported
) -> None:
    headless = export_bundle(exported[0], tmp_path / "h", score_head=False)
    manifest = json.loads((headless / MANIFEST).read_text())
    for config, files in (({"score_head": "no"}, manifest["files"]),
                          ({"score_head": False}, {k: v for k, v in manifest["files"].items()
                                                   if k != ITEM_VECTORS})):  # fmt: skip
        bad = tmp_path / f"bad-{len(files)}"
        shutil.copytree(headless, bad)
        edited = {**manifest, "config": {**manifest["config"], **config}, "files": files}
        (bad / MANIFEST).write_text(json.dumps(edited))
        with pytest.raises(BundleError, match=r"score_head|item_vectors"):
            load_bundle(bad)


def test_exported_graphs_take_any_window_width_and_older_fixed_ones_are_recognised(
    tmp_path: Path, exported
) -> None:
    """model.onnx and prefill.onnx accept windows cut below max_len (serving trims each call);
    a graph exported with a fixed window axis, as before, is fed at max_len instead."""
    from export.graphs import legacy_export
    from model.incremental import FullModel
    from stream.scoring import window_axis_free

    ckpt, bundle_dir = exported
    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    L = model.cfg.max_len
    options = ort.SessionOptions()
    for name in ("model.onnx", "prefill.onnx"):
        session = ort.InferenceSession(str(bundle_dir / name), options)
        assert window_axis_free(session), name
        windows = parity_windows(model.cfg.num_items, L, 5)
        windows[:, : L - 3] = 0  # at most 3 items: the last 3 columns carry them all
        wide, cut = (
            session.run(None, {"item_seq": windows}),
            session.run(None, {"item_seq": windows[:, L - 3 :]}),
        )
        np.testing.assert_allclose(wide[0], cut[0], atol=1e-4)  # scores
        np.testing.assert_allclose(wide[1], cut[1], atol=1e-4)  # hidden
    fixed = legacy_export(
        FullModel(model), (torch.ones(2, L, dtype=torch.int64),), tmp_path / "fixed.onnx",
        input_names=["item_seq"], output_names=["scores", "hidden"],
        dynamic_axes={"item_seq": {0: "batch"}, "scores": {0: "batch"}, "hidden": {0: "batch"}},
        opset=17,
    )  # fmt: skip
    assert not window_axis_free(ort.InferenceSession(str(fixed), options))

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.bundle import load_bundle
from export.cli import add_commands as add_export_commands
from export.errors import BundleIntegrityError, ParityError
from export.item_text import YEAR_EDGES
from export.onnx_export import check_parity, export_onnx, parity_windows
from model.cli import add_commands as add_model_commands
from model.config import SASRecConfig
from model.evaluate import evaluate_model, evaluate_scores_fn, onnx_score_fn
from model.sasrec import SASRec
from model.train import load_checkpoint, model_from_checkpoint
from tests.unit.test_data import chain_dataset_dir

torch.set_num_threads(2)


def test_bundle_loads_with_the_checkpoint_catalogue_and_provenance(trained):
    ds, ckpt_path, bundle_dir = trained
    bundle = load_bundle(bundle_dir)
    ckpt = load_checkpoint(ckpt_path)
    m = bundle.manifest
    assert (m.model_name, m.max_len, m.num_items, m.inputs) == ("sasrec", 10, 15, ("item_seq",))
    assert re.fullmatch(r"sasrec-\d{8}T\d{6}-[0-9a-f]{8}", m.model_version)
    assert bundle.item_ids[1:] == ds.item_ids
    assert bundle.titles[1:] == ds.titles  # titles with commas survive the csv round trip
    assert m.training_data["name"] == "synthetic"
    assert m.metrics["test"] == pytest.approx(ckpt["metrics"]["test"])
    assert 0 <= m.metrics["onnx_parity_max_abs_diff"] <= 1e-4
    assert m.config["d_model"] == 16


def test_onnx_scores_match_torch_on_left_padded_batches(trained):
    _, ckpt_path, bundle_dir = trained
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    windows = parity_windows(15, 10, 17)
    assert (windows == 0).all(axis=1).any()  # an all-padding row is among them
    assert check_parity(model, load_bundle(bundle_dir).model_path, [windows]) <= 1e-4


@pytest.mark.parametrize("split", ["valid", "test"])
def test_onnxruntime_reproduces_the_torch_metrics(trained, split: str):
    ds, ckpt_path, bundle_dir = trained
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    bundle = load_bundle(bundle_dir)
    via_torch = evaluate_model(model, ds, split)  # type: ignore[arg-type]
    via_onnx = evaluate_scores_fn(onnx_score_fn(bundle.model_path, 1), ds, split, bundle.max_len)  # type: ignore[arg-type]
    assert via_onnx == pytest.approx(via_torch, abs=1e-12)
    assert via_torch["users"] == 40


def test_parity_check_catches_a_different_model(trained, tmp_path: Path):
    _, ckpt_path, _ = trained
    model = model_from_checkpoint(load_checkpoint(ckpt_path))
    torch.manual_seed(123)
    other = SASRec(model.cfg).eval()
    onnx_path = export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(ParityError):
        check_parity(model, onnx_path)


@pytest.mark.parametrize("name", ["model.onnx", "items.csv"])
def test_a_tampered_bundle_is_refused(trained, tmp_path: Path, name: str):
    _, _, bundle_dir = trained
    copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    with (copy / name).open("ab") as fh:
        fh.write(b"\n")
    with pytest.raises(BundleIntegrityError):
        load_bundle(copy)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamrec")
    sub = parser.add_subparsers(required=True)
    add_model_commands(sub)
    add_export_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_exports_and_evaluates_bundle_and_checkpoint_alike(trained, tmp_path, capsys):
    _, ckpt_path, _ = trained
    data = f"synthetic:{ckpt_path.parent.parent / 'data'}"
    out = tmp_path / "cli-bundle"
    assert _run_cli(["export", "--checkpoint", str(ckpt_path), "--out", str(out)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["model_version"] == load_bundle(out).model_version
    argv = ["evaluate", "--data", data, "--checkpoint", str(ckpt_path), "--bundle", str(out)]
    baselines = ["--baseline", "popularity", "--baseline", "knn-session"]
    assert _run_cli([*argv, *baselines, "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["knn-session"]["ndcg@10"] <= 1
    assert result["split"] == "test"
    assert result["bundle"] == pytest.approx(result["checkpoint"], abs=1e-12)
    assert result["checkpoint"]["ndcg@10"] > result["popularity"]["ndcg@10"]
    assert np.isfinite(result["checkpoint"]["mrr"])


def test_a_time_aware_bundle_evaluates_with_its_click_times_as_the_checkpoint_does(
    tmp_path: Path, capsys
):
    data = f"synthetic:{chain_dataset_dir(tmp_path / 'data', num_items=15, num_users=40)}"
    run, out = tmp_path / "run", tmp_path / "bundle"
    argv = ["train", "--data", data, "--out", str(run), "--epochs", "2", "--max-len", "8"]
    assert _run_cli([*argv, "--d-model", "16", "--time-buckets", "12", "--no-progress"]) == 0
    assert _run_cli(["export", "--checkpoint", str(run / "ckpt.pt"), "--out", str(out)]) == 0
    assert load_bundle(out).manifest.inputs == ("item_seq", "time_seq")
    capsys.readouterr()
    argv = ["evaluate", "--data", data, "--checkpoint", str(run / "ckpt.pt"), "--bundle", str(out)]
    assert _run_cli([*argv, "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bundle"] == pytest.approx(result["checkpoint"], abs=1e-12)
    assert result["bundle"]["users"] == 40
    with pytest.raises(ValueError, match="time_seq"):  # never scored as if every time were 0
        onnx_score_fn(load_bundle(out).model_path, 1)(np.zeros((1, 8), np.int64))


def test_slot_positions_export_with_parity(tmp_path: Path):
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=30, max_len=6, d_model=16, positions="slot")
    model = SASRec(cfg).eval()
    assert check_parity(model, export_onnx(model, tmp_path / "slot.onnx")) <= 1e-4


def test_cli_trains_and_prints_a_summary(tmp_path: Path, capsys):
    data = chain_dataset_dir(tmp_path / "data")
    argv = ["train", "--data", f"synthetic:{data}", "--out", str(tmp_path / "run"), "--epochs", "2"]
    argv += ["--max-len", "6", "--d-model", "16", "--heads", "2", "--ffn-mult", "3"]
    argv += ["--no-progress"]
    assert _run_cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["checkpoint"]).is_file()
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert (ckpt["model_config"]["n_heads"], ckpt["model_config"]["ffn_mult"]) == (2, 3)
    assert ckpt["state_dict"]["blocks.0.ffn.0.weight"].shape == (48, 16)  # 3 x d_model wide
    assert summary["best_epoch"] in (1, 2)
    assert summary["test"]["users"] == 30
    assert _run_cli(["train", "--data", "synthetic:/nope", "--out", str(tmp_path / "x")]) == 1


def test_cli_trains_a_text_model_with_item_features_and_a_text_bias(tmp_path: Path, capsys):
    data = chain_dataset_dir(tmp_path / "data")
    argv = ["train", "--data", f"synthetic:{data}", "--out", str(tmp_path / "run"), "--epochs", "1"]
    argv += ["--max-len", "6", "--d-model", "16", "--text", "--item-features", "--text-bias"]
    assert _run_cli([*argv, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    cfg = ckpt["model_config"]
    assert cfg["item_features"] and cfg["text_bias"]
    assert cfg["feature_genres"] == ("Drama",)  # the catalogue's genres, filled by training
    width = 384 + len(YEAR_EDGES) + 1 + 1  # the text embedding, year buckets, genres
    assert ckpt["state_dict"]["text_bias.weight"].shape == (1, width)
    assert ckpt["state_dict"]["text_proj.weight"].shape == (16, width)

"""Fixtures shared by unit-test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.onnx_export import export_bundle
from model.config import SASRecConfig, TrainConfig
from model.data import SequenceDataset, load_dataset
from model.train import train
from tests.unit.test_data import chain_dataset_dir


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SequenceDataset, Path, Path]:
    """(data set, checkpoint, exported bundle) of a tiny 2-head SASRec trained on a chain
    data set; the bundle has the step pair (positions='first')."""
    root = tmp_path_factory.mktemp("export")
    data = chain_dataset_dir(root / "data", num_items=15, num_users=40)
    ds = load_dataset(f"synthetic:{data}")
    ckpt = train(
        ds,
        SASRecConfig(num_items=ds.num_items, max_len=10, d_model=16, n_heads=2),
        TrainConfig(epochs=4, batch_size=8, lr=5e-3, seed=1),
        root / "run",
        progress=False,
    )
    bundle = export_bundle(ckpt, root / "bundle")
    return ds, ckpt, bundle

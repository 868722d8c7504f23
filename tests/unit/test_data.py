from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from model.data import (
    batch_indices,
    eval_examples,
    left_pad,
    length_batches,
    load_dataset,
    train_sequences,
    training_windows,
)
from model.errors import DataError


def write_synthetic_dir(
    directory: Path,
    items: Sequence[tuple[str, str]],
    clicks: Sequence[tuple[str, str, int]],
) -> Path:
    """A data set in the stream/synthetic.py layout; clicks are written sorted by ts."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "title", "genres"])
        writer.writerows((item_id, title, "Drama") for item_id, title in items)
    with (directory / "clicks.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "ts"])
        writer.writerows(sorted(clicks, key=lambda c: c[2]))
    return directory


def chain_dataset_dir(directory: Path, num_items: int = 12, num_users: int = 30) -> Path:
    """Users walk a cycle i -> i+1 from a user-specific start: easy to learn, hard for
    popularity."""
    items = [(f"m{i:03d}", f"Movie {i}, part {i % 3}") for i in range(1, num_items + 1)]
    clicks = []
    for user in range(num_users):
        length = 4 + user % 7
        for step in range(length):
            item = (user + step) % num_items + 1
            clicks.append((f"u{user}", f"m{item:03d}", 1_000 * (step * num_users + user)))
    return write_synthetic_dir(directory, items, clicks)


def test_synthetic_dir_indexes_items_in_file_order_and_sorts_clicks_per_user(tmp_path: Path):
    items = [("b", 'The "B", movie'), ("a", "A"), ("c", "")]
    clicks = [("u2", "c", 5), ("u1", "a", 10), ("u2", "b", 20), ("u1", "c", 30), ("u2", "a", 20)]
    ds = load_dataset(f"synthetic:{write_synthetic_dir(tmp_path, items, clicks)}")
    assert ds.item_ids == ("b", "a", "c")
    assert ds.titles == ('The "B", movie', "A", "")
    assert ds.user_ids == ("u2", "u1")  # order of first click
    # u2's two clicks at ts 20 keep file order (b before a).
    assert [s.tolist() for s in ds.sequences] == [[3, 1, 2], [2, 3]]
    assert ds.timestamps is not None
    assert [t.tolist() for t in ds.timestamps] == [[5, 20, 20], [10, 30]]
    assert ds.items() == list(zip(ds.item_ids, ds.titles, strict=True))
    d = ds.description
    assert (d["name"], d["num_users"], d["num_items"], d["num_interactions"]) == (
        "synthetic", 2, 3, 5,
    )  # fmt: skip
    assert len(d["sha256"]) == 64


def test_sasrec_text_keeps_file_order_per_user(tmp_path: Path):
    path = tmp_path / "ml.txt"
    path.write_text("1 3\n1 1\n2 5\n1 2\n2 1\n", encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    assert ds.item_ids == ("1", "2", "3", "4", "5")  # num_items = largest id
    assert ds.user_ids == ("1", "2")
    assert [s.tolist() for s in ds.sequences] == [[3, 1, 2], [5, 1]]
    assert ds.timestamps is None
    assert ds.description["name"] == "ml-1m"
    assert load_dataset(f"video:{path}").description["name"] == "video"


@pytest.mark.parametrize(
    "spec", ["nocolon", "imdb:/x", "synthetic:/does/not/exist", "ml-1m:/does/not/exist"]
)
def test_bad_specs_raise_data_error(spec: str):
    with pytest.raises(DataError):
        load_dataset(spec)


def test_unknown_item_in_clicks_raises_data_error(tmp_path: Path):
    write_synthetic_dir(tmp_path, [("a", "A")], [("u", "a", 1), ("u", "zzz", 2)])
    with pytest.raises(DataError, match="zzz"):
        load_dataset(f"synthetic:{tmp_path}")


def test_leave_one_out_split(tmp_path: Path):
    path = tmp_path / "ml.txt"
    path.write_text("1 1\n1 2\n1 3\n1 4\n1 5\n2 6\n2 7\n3 1\n3 2\n3 3\n", encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    assert [s.tolist() for s in train_sequences(ds)] == [[1, 2, 3], [6, 7], [1]]
    histories, targets = eval_examples(ds, "valid")
    assert [h.tolist() for h in histories] == [[1, 2, 3], [1]]  # user 2 (2 items) is left out
    assert targets.tolist() == [4, 2]
    histories, targets = eval_examples(ds, "test")
    assert [h.tolist() for h in histories] == [[1, 2, 3, 4], [1, 2]]
    assert targets.tolist() == [5, 3]
    with pytest.raises(DataError):
        eval_examples(ds, "train")  # type: ignore[arg-type]


def test_left_pad_keeps_the_newest_items_last():
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


def test_training_windows_shift_targets_by_one():
    inputs, targets = training_windows([np.array([1, 2, 3, 4]), np.array([9]), np.array([5, 6])], 2)
    assert inputs.tolist() == [[2, 3], [0, 5]]  # the 1-item sequence has no pair
    assert targets.tolist() == [[3, 4], [0, 6]]


def test_every_window_covers_each_target_of_a_long_history():
    seq = [np.arange(1, 12)]  # 10 next-item pairs, windows of 3
    inputs, targets = training_windows(seq, 3, every=True)
    assert targets.tolist() == [[9, 10, 11], [6, 7, 8], [3, 4, 5], [0, 0, 2]]
    assert inputs.tolist() == [[8, 9, 10], [5, 6, 7], [2, 3, 4], [0, 0, 1]]
    # A random shift moves the older cut points; every target still appears, the newest
    # window stays first, and short sequences give one window as before.
    for seed in range(5):
        _, shifted = training_windows(seq, 3, every=True, rng=np.random.default_rng(seed))
        assert shifted[0].tolist() == [9, 10, 11]
        assert set(shifted[shifted > 0].tolist()) == set(range(2, 12))
    short = training_windows([np.array([4, 5, 6])], 3, every=True)
    assert short[1].tolist() == [[0, 5, 6]]


def test_overlapping_windows_count_each_target_once_with_the_most_context():
    seq = [np.arange(1, 12)]  # targets 2..11, windows of 3 overlapping by 1
    inputs, targets = training_windows(seq, 3, every=True, overlap=1)
    assert targets.tolist() == [[0, 10, 11], [0, 8, 9], [0, 6, 7], [0, 4, 5], [0, 2, 3]]
    assert inputs.tolist() == [[8, 9, 10], [6, 7, 8], [4, 5, 6], [2, 3, 4], [0, 1, 2]]
    for seed in range(20):
        ins, shifted = training_windows(
            seq, 3, every=True, rng=np.random.default_rng(seed), overlap=1
        )
        kept = shifted[shifted > 0].tolist()
        assert sorted(kept) == list(range(2, 12))  # every target exactly once
        rows, cols = np.nonzero(shifted)
        context = np.count_nonzero(ins, axis=1)[rows] - (ins.shape[1] - 1 - cols)
        # a kept target sees >= 2 items (overlap + the one at its own position) unless it is
        # the sequence's second or third item
        assert all(c >= 2 or t <= 3 for c, t in zip(context, shifted[rows, cols], strict=True))
    with pytest.raises(ValueError, match="overlap"):
        training_windows(seq, 3, every=True, overlap=3)
    # overlap 0 is the old cut exactly
    assert training_windows(seq, 3, every=True, overlap=0)[1].tolist() == [
        [9, 10, 11],
        [6, 7, 8],
        [3, 4, 5],
        [0, 0, 2],
    ]


def test_length_batches_group_similar_lengths_and_cover_every_row():
    lengths = np.random.default_rng(0).integers(1, 200, size=1000)
    batches = length_batches(lengths, 32, np.random.default_rng(1), pool=8)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)  # a random batch would span almost everything
    again = length_batches(lengths, 32, np.random.default_rng(1), pool=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_batch_indices_cover_all_rows_and_shuffle_reproducibly():
    plain = list(batch_indices(5, 2))
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3], [4]]
    a = np.concatenate(list(batch_indices(50, 8, np.random.default_rng(3))))
    b = np.concatenate(list(batch_indices(50, 8, np.random.default_rng(3))))
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == b.tolist() != list(range(50))


def test_cli_and_evaluation_modules_do_not_import_torch():
    code = (
        "import sys, argparse\n"
        "import model.cli, export.cli, model.data, model.evaluate, export.bundle\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "model.cli.add_commands(sub); export.cli.add_commands(sub)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

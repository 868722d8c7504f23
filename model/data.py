"""Interaction data sets, leave-one-out splits and left-padded windows (numpy only, no torch).

Specs accepted by `load_dataset`:
    synthetic:DIR   DIR/items.csv (item_id,title,genres) and DIR/clicks.csv (user_id,item_id,ts)
    ml-1m:PATH      SASRec text format: lines "user item", 1-based ints, chronological per user
    video:PATH      same format (SASRec's Amazon Video preprocessing)
    ml-1m-ratings:PATH  MovieLens ratings.dat lines "UserID::MovieID::Rating::Timestamp" (e.g.
                    ml-1m/ratings_users1-2999.dat) with real timestamps, ordered by time per user
                    (file order breaks ties); items are MovieIDs, titles from movies.dat beside it

Item index i (1..N) is `item_ids[i - 1]`; index 0 is padding everywhere.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model.errors import DataError

logger = logging.getLogger(__name__)

Split = Literal["valid", "test"]
SASREC_KINDS = ("ml-1m", "video")


@dataclass(frozen=True)
class SequenceDataset:
    """Per-user chronological item-index sequences plus the item catalogue."""

    item_ids: tuple[str, ...]  # external id of item index i + 1
    titles: tuple[str, ...]  # parallel to item_ids; "" where unknown
    user_ids: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]  # int64 item indices 1..N, oldest first, one per user
    timestamps: tuple[np.ndarray, ...] | None = None  # epoch ms parallel to sequences, if known
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def items(self) -> list[tuple[str, str]]:
        """(item_id, title) of index 1..N, the shape `export.bundle.write_bundle` takes."""
        return list(zip(self.item_ids, self.titles, strict=True))


def load_dataset(spec: str) -> SequenceDataset:
    kind, sep, raw_path = spec.partition(":")
    if not sep or not raw_path:
        raise DataError(f"data spec {spec!r} is not KIND:PATH (e.g. synthetic:data/synthetic)")
    path = Path(raw_path)
    if kind == "synthetic":
        dataset = _load_synthetic(path)
    elif kind in SASREC_KINDS:
        dataset = _load_sasrec_txt(path, kind)
    elif kind == "ml-1m-ratings":
        dataset = _load_ratings(path)
    else:
        raise DataError(f"unknown data kind {kind!r}; use synthetic, ml-1m, ml-1m-ratings or video")
    logger.info("loaded %s: %s", spec, dataset.description)
    return dataset


def _load_synthetic(directory: Path) -> SequenceDataset:
    items_path, clicks_path = directory / "items.csv", directory / "clicks.csv"
    for required in (items_path, clicks_path):
        if not required.is_file():
            raise DataError(f"{required} not found; generate the synthetic data set first")
    item_ids, titles = _read_items_csv(items_path)
    index = {item_id: i for i, item_id in enumerate(item_ids, start=1)}
    users, items, stamps = _read_clicks_csv(clicks_path, index)
    return _from_clicks("synthetic", directory, clicks_path, item_ids, titles, users, items, stamps)


def _from_clicks(
    name: str,
    path: Path,
    source: Path,
    item_ids: tuple[str, ...],
    titles: tuple[str, ...],
    users: list[str],
    items: np.ndarray,
    stamps: np.ndarray,
) -> SequenceDataset:
    """A data set from parallel click columns (user, item index, epoch ms)."""
    user_ids, sequences, times = _group_by_user(users, items, stamps)
    return SequenceDataset(
        item_ids=item_ids,
        titles=titles,
        user_ids=user_ids,
        sequences=sequences,
        timestamps=times,
        description=_describe(name, path, sequences, len(item_ids), source),
    )


def _read_items_csv(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ids: list[str] = []
    titles: list[str] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            item_id = row.get("item_id")
            if not item_id:
                raise DataError(f"{path}:{line}: row has no item_id")
            ids.append(item_id)
            titles.append(row.get("title") or "")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: item_id values are not unique")
    if not ids:
        raise DataError(f"{path} lists no items")
    return tuple(ids), tuple(titles)


def _read_clicks_csv(path: Path, index: dict[str, int]) -> tuple[list[str], np.ndarray, np.ndarray]:
    users: list[str] = []
    items: list[int] = []
    stamps: list[int] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["user_id", "item_id", "ts"]:
            raise DataError(f"{path}: header {header} is not user_id,item_id,ts")
        for line, row in enumerate(reader, start=2):
            try:
                user, item, ts = row
                items.append(index[item])
                stamps.append(int(ts))
            except (ValueError, KeyError) as exc:
                raise DataError(f"{path}:{line}: bad click row {row!r} ({exc!r})") from exc
            users.append(user)
    if not users:
        raise DataError(f"{path} holds no clicks")
    return users, np.asarray(items, dtype=np.int64), np.asarray(stamps, dtype=np.int64)


def _group_by_user(
    users: list[str], items: np.ndarray, stamps: np.ndarray
) -> tuple[tuple[str, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Split clicks per user, oldest first; users are ordered by their first click."""
    codes: dict[str, int] = {}
    user_codes = np.fromiter((codes.setdefault(u, len(codes)) for u in users), dtype=np.int64)
    # Stable on equal timestamps, so file order breaks ties.
    order = np.lexsort((stamps, user_codes))
    bounds = np.cumsum(np.bincount(user_codes, minlength=len(codes)))[:-1]
    sequences = tuple(np.split(items[order], bounds))
    times = tuple(np.split(stamps[order], bounds))
    return tuple(codes), sequences, times


def _load_sasrec_txt(path: Path, kind: str) -> SequenceDataset:
    if not path.is_file():
        raise DataError(f"{path} not found (expected a SASRec 'user item' text file)")
    try:
        pairs = np.array(path.read_text(encoding="ascii").split(), dtype=np.int64).reshape(-1, 2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a SASRec 'user item' file ({exc})") from exc
    if pairs.size == 0 or pairs.min() < 1:
        raise DataError(f"{path}: ids must be 1-based positive integers")
    order = np.argsort(pairs[:, 0], kind="stable")  # keeps each user's chronological order
    users, starts = np.unique(pairs[order, 0], return_index=True)
    sequences = tuple(np.split(pairs[order, 1], starts[1:]))
    num_items = int(pairs[:, 1].max())
    return SequenceDataset(
        item_ids=tuple(str(i) for i in range(1, num_items + 1)),
        titles=("",) * num_items,
        user_ids=tuple(str(u) for u in users),
        sequences=sequences,
        description=_describe(kind, path, sequences, num_items, path),
    )


def _load_ratings(path: Path) -> SequenceDataset:
    if not path.is_file():
        raise DataError(f"{path} not found (expected MovieLens UserID::MovieID::Rating::Timestamp)")
    try:
        rows = [ln.split("::") for ln in path.read_text(encoding="ascii").splitlines() if ln]
        users = [r[0] for r in rows]
        movies = np.array([int(r[1]) for r in rows], dtype=np.int64)
        stamps = np.array([int(r[3]) for r in rows], dtype=np.int64) * 1000  # epoch ms
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a MovieLens ratings file ({exc})") from exc
    movie_ids, items = np.unique(movies, return_inverse=True)
    item_ids = tuple(str(m) for m in movie_ids)
    movies_dat = path.parent / "movies.dat"
    known = read_movies(movies_dat) if movies_dat.is_file() else {}
    titles = tuple(known.get(i, ("", ""))[0] for i in item_ids)
    index = items.astype(np.int64) + 1
    return _from_clicks("ml-1m-ratings", path, path, item_ids, titles, users, index, stamps)


def read_movies(path: Path) -> dict[str, tuple[str, str]]:
    """MovieID -> (title, genres) from a MovieLens movies.dat (ISO-8859-1, `id::title::genres`)."""
    if not path.is_file():
        raise DataError(f"{path} not found (MovieLens movies.dat gives the item titles)")
    movies: dict[str, tuple[str, str]] = {}
    for line_no, line in enumerate(path.read_text(encoding="iso-8859-1").splitlines(), 1):
        parts = line.split("::")
        if len(parts) != 3:
            raise DataError(f"{path}:{line_no}: not MovieID::Title::Genres")
        movies[parts[0]] = (parts[1], parts[2])
    return movies


def _describe(
    name: str, path: Path, sequences: Sequence[np.ndarray], num_items: int, source: Path
) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(path),
        "num_users": len(sequences),
        "num_items": num_items,
        "num_interactions": int(sum(len(s) for s in sequences)),
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }


def train_sequences(dataset: SequenceDataset) -> list[np.ndarray]:
    """Everything but the last two items; users with fewer than 3 items keep all of them."""
    return [s[:-2] if len(s) >= 3 else s for s in dataset.sequences]


def eval_examples(dataset: SequenceDataset, split: Split) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) of users with at least 3 items: valid predicts the second-to-last
    item from what precedes it, test the last item from everything before it."""
    if split not in ("valid", "test"):
        raise DataError(f"split must be 'valid' or 'test', got {split!r}")
    cut = 2 if split == "valid" else 1
    chosen = [s for s in dataset.sequences if len(s) >= 3]
    histories = [s[:-cut] for s in chosen]
    targets = np.fromiter((s[-cut] for s in chosen), dtype=np.int64, count=len(chosen))
    return histories, targets


def left_pad(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, max_len) int64: the last max_len items of each sequence, right-aligned, 0 = padding."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail
    return out


def training_windows(
    sequences: Sequence[np.ndarray],
    max_len: int,
    *,
    every: bool = False,
    rng: np.random.Generator | None = None,
    overlap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Next-item pairs as (inputs, targets), both (W, max_len), targets one step ahead.

    Each sequence of 2 or more items gives its newest window (its last max_len + 1 items). With
    `every`, older stretches follow, so each target appears at least once: windows ending
    max_len items apart, the first of them shifted towards the newest window by a random
    offset in [0, max_len) per sequence when rng is given (the cut points then move from epoch
    to epoch and the overlap with the newest window varies).

    With `overlap` > 0 the older windows end max_len - overlap items apart instead, and every
    target is kept (non-zero) in exactly one window: the oldest one that holds it, where it has
    the most context. Every kept target then sees at least `overlap` items before it unless it
    is that close to the start of its sequence. Targets a newer window repeats become 0
    (padding, which the loss skips), so an epoch still counts each target once.
    """
    if not 0 <= overlap < max_len:
        raise ValueError(f"overlap must be in [0, max_len={max_len}), got {overlap}")
    stride = max_len - overlap
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for seq in sequences:
        n = len(seq)
        if n < 2:
            continue
        ends = [n]
        if every and n - 1 > max_len:
            shift = int(rng.integers(stride)) if rng is not None else 0
            ends.extend(range(n - stride + shift, 1 + overlap, -stride))
        for i, end in enumerate(ends):
            start = max(end - max_len, 1)  # first target index of the window
            inputs.append(seq[start - 1 : end - 1])
            window = seq[start:end]
            if overlap and i + 1 < len(ends):  # the next older window keeps what it holds
                window = window.copy()
                window[: max(ends[i + 1] - start, 0)] = 0
            targets.append(window)
    return left_pad(inputs, max_len), left_pad(targets, max_len)


def batch_indices(
    n: int, batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Row indices in batches of batch_size; shuffled when rng is given, the last may be short."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def length_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 16
) -> list[np.ndarray]:
    """Shuffled batches of rows of similar length, so a batch can drop its common padding.

    Rows are shuffled, cut into pools of `pool` batches, sorted by length inside each pool and
    cut into batches; the batches are then shuffled. Each row appears exactly once.
    """
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_times(dataset: SequenceDataset, split: Split) -> list[np.ndarray]:
    """Epoch seconds of each `eval_examples` history (same users, same order, same cut)."""
    if dataset.timestamps is None:
        raise DataError(f"{dataset.description.get('name')} has no timestamps")
    cut = 2 if split == "valid" else 1
    chosen = [t for t in dataset.timestamps if len(t) >= 3]
    return [t[:-cut] // 1000 for t in chosen]


def train_times(dataset: SequenceDataset) -> list[np.ndarray]:
    """Epoch seconds parallel to `train_sequences`."""
    if dataset.timestamps is None:
        raise DataError(f"{dataset.description.get('name')} has no timestamps")
    return [(t[:-2] if len(t) >= 3 else t) // 1000 for t in dataset.timestamps]


def cold_start_split(
    dataset: SequenceDataset, fraction: float = 0.1, seed: int = 0
) -> tuple[SequenceDataset, np.ndarray]:
    """(data set, held-out item indices): a seeded `fraction` of the items is removed from the
    training part of every sequence, so no training sequence contains one; the validation and
    test items (the last two) stay as they are, so evaluation still asks for them."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"cold-start fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    count = max(1, round(fraction * dataset.num_items))
    held_out = np.sort(rng.choice(np.arange(1, dataset.num_items + 1), count, replace=False))
    cold = np.zeros(dataset.num_items + 1, dtype=bool)
    cold[held_out] = True
    stamps = dataset.timestamps or tuple(np.zeros(len(s), np.int64) for s in dataset.sequences)
    sequences, times = [], []
    for seq, ts in zip(dataset.sequences, stamps, strict=True):
        head = len(seq) - 2 if len(seq) >= 3 else len(seq)
        keep = np.concatenate([~cold[seq[:head]], np.ones(len(seq) - head, dtype=bool)])
        sequences.append(seq[keep])
        times.append(ts[keep])
    description = {
        **dataset.description,
        "cold_start": {"fraction": fraction, "seed": seed, "held_out_items": int(count)},
    }
    out = replace(
        dataset,
        sequences=tuple(sequences),
        timestamps=tuple(times) if dataset.timestamps is not None else None,
        description=description,
    )
    return out, held_out


def by_target(
    dataset: SequenceDataset, split: Split, items: np.ndarray, *, inside: bool = True
) -> SequenceDataset:
    """The users whose `split` target is (inside) or is not (inside=False) one of `items`:
    evaluating this data set on `split` scores exactly those cases, with the usual masking."""
    cut = 2 if split == "valid" else 1
    wanted = np.zeros(dataset.num_items + 1, dtype=bool)
    wanted[np.asarray(items, dtype=np.int64)] = True
    rows = [i for i, s in enumerate(dataset.sequences) if len(s) >= 3 and wanted[s[-cut]] == inside]
    return replace(
        dataset,
        user_ids=tuple(dataset.user_ids[i] for i in rows),
        sequences=tuple(dataset.sequences[i] for i in rows),
        timestamps=None
        if dataset.timestamps is None
        else tuple(dataset.timestamps[i] for i in rows),
    )

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import pytest

from stream.synthetic import (
    GENERATOR,
    GENRES,
    Click,
    Item,
    SyntheticConfig,
    generate,
    iter_clicks,
    read_items,
    write_dataset,
)

# About 50 items per genre, as in the default (125), so the genre heads are visible.
SMALL = SyntheticConfig(num_users=300, num_items=400, num_genres=8, mean_clicks_per_user=40)
THIRTY_MIN_MS = 30 * 60_000


@pytest.fixture(scope="module")
def data() -> tuple[list[Item], list[Click]]:
    return generate(SMALL)


def _by_user(clicks: list[Click]) -> dict[str, list[Click]]:
    out: dict[str, list[Click]] = defaultdict(list)
    for c in clicks:
        out[c.user_id].append(c)
    return out


def test_same_seed_same_output_and_other_seed_differs(data: tuple[list[Item], list[Click]]) -> None:
    assert generate(SMALL) == data
    items, clicks = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert [c.item_id for c in clicks] != [c.item_id for c in data[1]]
    assert [i.title for i in items] != [i.title for i in data[0]]


def test_catalogue_shape(data: tuple[list[Item], list[Click]]) -> None:
    items, _ = data
    assert len(items) == SMALL.num_items
    assert [i.item_id for i in items] == [f"i{n:05d}" for n in range(1, SMALL.num_items + 1)]
    assert len({i.title for i in items}) == len(items)  # the title space is far larger
    for item in items:
        assert re.fullmatch(r"The [A-Z][a-z]+ [A-Z][a-z]+ \((19[5-9]\d|20[0-2]\d)\)", item.title)
        names = item.genres.split("|")
        assert 1 <= len(names) <= 2 and len(set(names)) == len(names)
        assert names == sorted(names) and set(names) <= set(GENRES)
    assert len({g for i in items for g in i.genres.split("|")}) == SMALL.num_genres


def test_clicks_are_valid_and_sorted(data: tuple[list[Item], list[Click]]) -> None:
    items, clicks = data
    known = {i.item_id for i in items}
    assert all(c.item_id in known for c in clicks)
    assert [(c.ts, c.user_id) for c in clicks] == sorted((c.ts, c.user_id) for c in clicks)
    assert clicks[0].ts >= SMALL.start_ms
    users = _by_user(clicks)
    assert sorted(users) == [f"u{n:04d}" for n in range(1, SMALL.num_users + 1)]
    counts = [len(v) for v in users.values()]
    assert min(counts) >= 5 and max(counts) <= 200
    assert abs(len(clicks) / len(users) - SMALL.mean_clicks_per_user) < 4
    assert max(counts) > 3 * SMALL.mean_clicks_per_user  # heavy tail: some power users


def test_per_user_timestamps_strictly_increasing(data: tuple[list[Item], list[Click]]) -> None:
    for seq in _by_user(data[1]).values():
        assert all(a.ts < b.ts for a, b in pairwise(seq))


def test_popularity_is_skewed(data: tuple[list[Item], list[Click]]) -> None:
    items, clicks = data
    counts = sorted(Counter(c.item_id for c in clicks).values(), reverse=True)
    top_share = sum(counts[: len(items) // 10]) / len(clicks)
    assert top_share > 0.3


def test_sessions_exist(data: tuple[list[Item], list[Click]]) -> None:
    gaps = [b.ts - a.ts for seq in _by_user(data[1]).values() for a, b in pairwise(seq)]
    long_share = sum(g > THIRTY_MIN_MS for g in gaps) / len(gaps)
    assert 0.05 < long_share < 0.35  # sessions of several clicks, separated by long gaps
    assert max(gaps) > 86_400_000  # some users come back only days later


def test_sequence_beats_popularity(data: tuple[list[Item], list[Click]]) -> None:
    """Bigram "most frequent next item" vs global top-1, trained on each user's first 80%."""
    bigrams: dict[str, Counter[str]] = defaultdict(Counter)
    popularity: Counter[str] = Counter()
    held_out: list[tuple[str, str]] = []
    for seq in _by_user(data[1]).values():
        ids = [c.item_id for c in seq]
        cut = int(len(ids) * 0.8)
        for prev, nxt in pairwise(ids[:cut]):
            bigrams[prev][nxt] += 1
        popularity.update(ids[:cut])
        held_out.extend(pairwise(ids[cut - 1 :]))
    top1 = popularity.most_common(1)[0][0]
    predict = {prev: c.most_common(1)[0][0] for prev, c in bigrams.items()}
    bigram_hit = sum(predict.get(p, top1) == n for p, n in held_out) / len(held_out)
    pop_hit = sum(top1 == n for _, n in held_out) / len(held_out)
    assert len(held_out) > 1000
    assert bigram_hit > 0.25
    assert bigram_hit > 3 * pop_hit


def test_files_round_trip(data: tuple[list[Item], list[Click]], tmp_path: Path) -> None:
    items, clicks = data
    out = write_dataset(tmp_path / "demo", items, clicks, SMALL)
    assert out == tmp_path / "demo"
    with (out / "items.csv").open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["item_id", "title", "genres"]
    with (out / "clicks.csv").open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["user_id", "item_id", "ts"]
    assert read_items(out) == items
    assert list(iter_clicks(out)) == clicks
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["generator"] == GENERATOR == "streamrec.synthetic v1"
    assert meta["seed"] == SMALL.seed and meta["start_ms"] == SMALL.start_ms
    assert meta["num_genres"] == SMALL.num_genres
    assert (meta["num_users"], meta["num_items"], meta["num_clicks"]) == (
        SMALL.num_users,
        SMALL.num_items,
        len(clicks),
    )


def test_write_is_deterministic(data: tuple[list[Item], list[Click]], tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", *data, SMALL)
    b = write_dataset(tmp_path / "b", *generate(SMALL), SMALL)
    for name in ("items.csv", "clicks.csv", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_genres": 0},
        {"num_genres": len(GENRES) + 1},
        {"num_items": 10, "num_genres": 6},
        {"num_users": 0},
        {"mean_clicks_per_user": 2.0},
        {"mean_clicks_per_user": 500.0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)  # type: ignore[arg-type]


def test_default_config_matches_its_promises() -> None:
    config = SyntheticConfig()
    items, clicks = generate(config)
    assert len(items) == config.num_items
    assert len({c.user_id for c in clicks}) == config.num_users
    assert 40 <= len(clicks) / config.num_users <= 60
    assert len({g for i in items for g in i.genres.split("|")}) == config.num_genres

"""Seeded synthetic catalogue and click stream: the demo data streamrec ships.

MovieLens cannot be redistributed, so the demo, the tests and the benchmarks run on this
instead. It is built to have the structure a sequential recommender exploits, so that SASRec
clearly beats popularity on it:

* Genres have Zipf-like popularity, and so do items within a genre (by a random rank).
* Each genre's items also lie on a latent *chain*, a cyclic order (think "series", or "what
  people watch next"). Within a session the next click usually steps along the chain from the
  previous item: mostly to the successor k+1, sometimes k+2, k+3 or back to k-1. Otherwise
  (and at every session start) the user *jumps*: a genre from their current taste, then an
  item from that genre's popularity. The chain is a noisy popularity order, so walking it
  keeps the head heavy, but each item's successor is one specific item popularity can't name.
* A user's taste is a softmax over genres around the global genre popularity; it drifts as a
  random walk between sessions and is occasionally redrawn.
* Sessions are bursts of clicks seconds to minutes apart (lognormal), separated by gaps of
  hours to days.

So the previous item predicts the next far better than popularity does (a bigram model gets
most of the way); the taste gives a sequence model a longer-range signal on top.
Everything is derived from one numpy Generator seeded by the config: same seed, same bytes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

GENERATOR = "streamrec.synthetic v1"
ITEMS_FILE = "items.csv"
CLICKS_FILE = "clicks.csv"
META_FILE = "meta.json"

GENRES = (
    "Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Sci-Fi",
    "Horror", "Fantasy", "Children", "Mystery", "Animation", "Documentary", "War", "Musical",
    "Western", "Film-Noir", "IMAX", "Biography",
)  # fmt: skip
ADJECTIVES = (
    "Crimson", "Silent", "Hidden", "Broken", "Golden", "Last", "Distant", "Frozen", "Burning",
    "Lonely", "Secret", "Wild", "Midnight", "Forgotten", "Electric", "Hollow", "Bright",
    "Savage", "Gentle", "Restless", "Scarlet", "Iron", "Velvet", "Northern", "Endless",
    "Lost", "Quiet", "Shattered", "Emerald", "Painted", "Wandering", "Falling", "Silver",
    "Bitter", "Radiant", "Sunken", "Second", "Final", "Black", "Little",
)  # fmt: skip
NOUNS = (
    "Harbor", "Garden", "River", "Empire", "Letter", "Station", "Mountain", "Orchard",
    "Kingdom", "Promise", "Mirror", "Frontier", "Lighthouse", "Season", "Stranger", "Island",
    "Carnival", "Witness", "Highway", "Voyage", "Compass", "Tower", "Desert", "Symphony",
    "Border", "Harvest", "Shadow", "Signal", "Orbit", "Bridge", "Circus", "Crown", "Engine",
    "Forest", "Passage", "Horizon", "Machine", "Winter", "Echo", "Citadel",
)  # fmt: skip
YEARS = (1950, 2025)

MIN_CLICKS, MAX_CLICKS = 5, 200  # per user: every user has a history, none dominates
CLICKS_SIGMA = 0.9  # lognormal spread of clicks per user: a heavy tail of power users
GENRE_ZIPF = 1.0  # genre popularity exponent
ITEM_ZIPF = 1.1  # within-genre item popularity exponent; >1 keeps the head heavy
SECOND_GENRE_P = 0.4  # share of items with a second genre, roughly as in MovieLens
TASTE_SPREAD = 2.0  # sd of per-user genre logits: users care about a few genres
TASTE_DRIFT = 0.35  # sd of the between-session random walk of those logits
TASTE_REDRAW_P = 0.05  # per session: occasionally a user's interests change outright
SESSION_MEAN = 8.0  # clicks per session (geometric)
CHAIN_NOISE = 0.2  # chain order vs popularity order (0: identical; large: unrelated)
JUMP_P = 0.25  # within a session: leave the chain for the taste distribution
STEP_OFFSETS = (1, 2, 3, -1)  # chain steps and their probabilities: mostly "the next one"
STEP_PROBS = (0.65, 0.15, 0.1, 0.1)
CLICK_GAP_MEDIAN_MS = 40_000  # within a session: seconds to a few minutes
CLICK_GAP_SIGMA = 1.0
SESSION_GAP_MIN_MS = 30 * 60_000  # a session boundary is at least 30 min of silence
SESSION_GAP_MEDIAN_MS = 10 * 3_600_000  # plus hours to days on top
SESSION_GAP_SIGMA = 1.2
USER_START_SPAN_MS = 14 * 86_400_000  # users arrive over two weeks, so the stream interleaves

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 3000  # ~150k clicks: big enough to train SASRec, small enough for CI
    num_items: int = 2000  # a catalogue a laptop trains over in minutes; ~125 items per genre
    num_genres: int = 16  # MovieLens-like breadth; at most len(GENRES)
    mean_clicks_per_user: float = 50.0  # close to MovieLens-1M after 5-core style filtering
    seed: int = 7  # any fixed value; the demo and docs quote numbers for this one
    start_ms: int = 1767225600000  # 2026-01-01T00:00:00Z: fixed so the output is deterministic

    def __post_init__(self) -> None:
        if not 1 <= self.num_genres <= len(GENRES):
            raise ValueError(f"num_genres must be in 1..{len(GENRES)}, got {self.num_genres}")
        if self.num_items < 2 * self.num_genres:
            raise ValueError("num_items must be at least 2 * num_genres (chains need 2 items)")
        if self.num_users < 1:
            raise ValueError("num_users must be positive")
        if not MIN_CLICKS <= self.mean_clicks_per_user <= MAX_CLICKS:
            raise ValueError(f"mean_clicks_per_user must be in {MIN_CLICKS}..{MAX_CLICKS}")


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    genres: str  # pipe-separated, MovieLens style: "Drama|Romance"


@dataclass(frozen=True)
class Click:
    user_id: str
    item_id: str
    ts: int  # epoch milliseconds


def _zipf(n: int, exponent: float) -> FloatArray:
    w: FloatArray = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    w /= w.sum()
    return w


def _softmax(logits: FloatArray) -> FloatArray:
    e: FloatArray = np.exp(logits - logits.max())
    e /= e.sum()
    return e


def _group_positions(keys: FloatArray, groups: IntArray) -> tuple[IntArray, IntArray]:
    """Items grouped by genre and ordered by keys within it, and each item's position there."""
    order = np.lexsort((keys, groups)).astype(np.int64)
    sizes = np.bincount(groups)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pos = np.empty(groups.size, dtype=np.int64)
    pos[order] = np.arange(groups.size) - starts[groups[order]]
    return order, pos


def _titles(rng: np.random.Generator, n: int) -> list[str]:
    years = YEARS[1] - YEARS[0] + 1
    space = len(ADJECTIVES) * len(NOUNS) * years
    # Without replacement while the space allows it, so titles are unique in practice.
    codes = rng.choice(space, size=n, replace=n > space)
    adj, rest = np.divmod(codes, len(NOUNS) * years)
    noun, year = np.divmod(rest, years)
    return [
        f"The {ADJECTIVES[a]} {NOUNS[b]} ({YEARS[0] + y})"
        for a, b, y in zip(adj.tolist(), noun.tolist(), year.tolist(), strict=True)
    ]


def generate(config: SyntheticConfig) -> tuple[list[Item], list[Click]]:
    """The catalogue (in item order) and all clicks, sorted by (ts, user_id)."""
    rng = np.random.default_rng(config.seed)
    n_items, n_genres = config.num_items, config.num_genres

    # Catalogue. Popular genres are also somewhat larger, as in real catalogues.
    genre_w = _zipf(n_genres, GENRE_ZIPF)[rng.permutation(n_genres)]
    size_w = np.sqrt(genre_w) / np.sqrt(genre_w).sum()
    sizes = 2 + rng.multinomial(n_items - 2 * n_genres, size_w)
    genre_of = rng.permutation(np.repeat(np.arange(n_genres, dtype=np.int64), sizes))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    second = (genre_of + rng.integers(1, max(n_genres, 2), size=n_items)) % n_genres
    has_second = (rng.random(n_items) < SECOND_GENRE_P) & (n_genres > 1)
    titles = _titles(rng, n_items)
    width = max(5, len(str(n_items)))
    item_ids = [f"i{i + 1:0{width}d}" for i in range(n_items)]
    items = []
    for i in range(n_items):
        names = {GENRES[genre_of[i]]} | ({GENRES[second[i]]} if has_second[i] else set())
        items.append(Item(item_ids[i], titles[i], "|".join(sorted(names))))

    # Within-genre popularity by a random rank, as cumulative sums laid out so that genre g
    # covers (g, g + 1]: one searchsorted then samples from any genre at once.
    pop_order, pop_rank = _group_positions(rng.random(n_items), genre_of)
    w = (pop_rank[pop_order] + 1.0) ** -ITEM_ZIPF
    g_sorted = genre_of[pop_order]
    within = np.cumsum(w) - np.repeat(np.cumsum(w)[starts] - w[starts], sizes)
    pop_cdf = within / within[starts + sizes - 1][g_sorted] + g_sorted

    # The latent chain: a noisy popularity order, so that walking it keeps the popularity skew
    # (hits lead to near-hits) while the successor of an item stays specific to that item.
    # succ[item, k] is the chain neighbour at STEP_OFFSETS[k], cyclic within the genre.
    chain_key = pop_rank / sizes[genre_of] + CHAIN_NOISE * rng.standard_normal(n_items)
    chain, chain_pos = _group_positions(chain_key, genre_of)
    offsets = np.asarray(STEP_OFFSETS, dtype=np.int64)
    succ_pos = (chain_pos[:, None] + offsets[None, :]) % sizes[genre_of][:, None]
    succ: list[list[int]] = chain[starts[genre_of][:, None] + succ_pos].tolist()

    # Users: click counts (lognormal, clipped, mean tuned to the target), then sessions and taste.
    n_users = config.num_users
    z = rng.standard_normal(n_users)
    mu = np.log(config.mean_clicks_per_user) - CLICKS_SIGMA**2 / 2
    for _ in range(20):  # clipping shifts the mean; a few fixed-point steps put it back
        counts = np.clip(np.rint(np.exp(mu + CLICKS_SIGMA * z)), MIN_CLICKS, MAX_CLICKS)
        mu += np.log(config.mean_clicks_per_user / counts.mean())
    counts = counts.astype(np.int64)
    base_logits = np.log(genre_w)
    session_len: list[int] = []
    tastes: list[FloatArray] = []
    for total in counts.tolist():
        lens = rng.geometric(1.0 / SESSION_MEAN, size=total)
        n_sess = int(np.searchsorted(np.cumsum(lens), total)) + 1
        lens = lens[:n_sess]
        lens[-1] -= lens.sum() - total
        session_len.extend(lens.tolist())
        logits = base_logits + TASTE_SPREAD * rng.standard_normal(n_genres)
        for _ in range(n_sess):
            tastes.append(_softmax(logits))
            if rng.random() < TASTE_REDRAW_P:
                logits = base_logits + TASTE_SPREAD * rng.standard_normal(n_genres)
            else:
                logits = logits + TASTE_DRIFT * rng.standard_normal(n_genres)

    n_clicks = int(counts.sum())
    lens_arr = np.asarray(session_len, dtype=np.int64)
    sess_of = np.repeat(np.arange(lens_arr.size), lens_arr)
    sess_start = np.zeros(n_clicks, dtype=bool)
    sess_start[np.cumsum(lens_arr) - lens_arr] = True
    user_first = np.cumsum(counts) - counts

    # Which clicks jump, and where to: genre from the session's taste, item from popularity.
    jump = sess_start | (rng.random(n_clicks) < JUMP_P)
    jump_idx = np.flatnonzero(jump)
    taste_cdf = np.cumsum(np.asarray(tastes), axis=1)[sess_of[jump_idx]]
    genre = np.minimum((taste_cdf < rng.random((jump_idx.size, 1))).sum(axis=1), n_genres - 1)
    slot = np.searchsorted(pop_cdf, genre + rng.random(jump_idx.size), side="right")
    slot = np.minimum(slot, starts[genre] + sizes[genre] - 1)  # float round-off at a genre's end
    jump_item = np.full(n_clicks, -1, dtype=np.int64)
    jump_item[jump_idx] = pop_order[slot]
    steps = rng.choice(len(STEP_OFFSETS), size=n_clicks, p=STEP_PROBS).tolist()

    # The only sequential part: each chain step depends on the item just clicked.
    clicked = np.empty(n_clicks, dtype=np.int64)
    cur = -1
    for i, (j, s) in enumerate(zip(jump_item.tolist(), steps, strict=True)):
        cur = j if j >= 0 else succ[cur][s]
        clicked[i] = cur

    # Timestamps: gaps per click, summed per user from a random arrival offset.
    gaps = np.maximum(
        1_000, rng.lognormal(np.log(CLICK_GAP_MEDIAN_MS), CLICK_GAP_SIGMA, n_clicks)
    ).astype(np.int64)
    n_starts = int(sess_start.sum())
    gaps[sess_start] = SESSION_GAP_MIN_MS + rng.lognormal(
        np.log(SESSION_GAP_MEDIAN_MS), SESSION_GAP_SIGMA, n_starts
    ).astype(np.int64)
    gaps[user_first] = rng.integers(0, USER_START_SPAN_MS, size=n_users)
    total_gap = np.cumsum(gaps)
    user_of = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    ts = config.start_ms + total_gap - (total_gap - gaps)[user_first][user_of]

    # User ids are zero-padded to one width, so string order equals index order for ties.
    width = max(4, len(str(n_users)))
    user_ids = [f"u{u + 1:0{width}d}" for u in range(n_users)]
    order = np.lexsort((user_of, ts))
    clicks = [
        Click(user_ids[u], item_ids[it], t)
        for u, it, t in zip(
            user_of[order].tolist(), clicked[order].tolist(), ts[order].tolist(), strict=True
        )
    ]
    return items, clicks


def write_dataset(
    out_dir: Path, items: Iterable[Item], clicks: Iterable[Click], config: SyntheticConfig
) -> Path:
    """Write items.csv, clicks.csv and meta.json into out_dir (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_items = 0
    with (out_dir / ITEMS_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("item_id", "title", "genres"))
        for item in items:
            writer.writerow((item.item_id, item.title, item.genres))
            num_items += 1
    users: set[str] = set()
    num_clicks = 0
    with (out_dir / CLICKS_FILE).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("user_id", "item_id", "ts"))
        for click in clicks:
            writer.writerow((click.user_id, click.item_id, click.ts))
            users.add(click.user_id)
            num_clicks += 1
    meta = {
        **asdict(config),
        "num_users": len(users),
        "num_items": num_items,
        "num_clicks": num_clicks,
        "generator": GENERATOR,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_items(dir: Path) -> list[Item]:
    with (dir / ITEMS_FILE).open(newline="", encoding="utf-8") as f:
        return [Item(r["item_id"], r["title"], r["genres"]) for r in csv.DictReader(f)]


def iter_clicks(dir: Path) -> Iterator[Click]:
    """Stream clicks.csv in file order (sorted by ts), without loading it whole."""
    with (dir / CLICKS_FILE).open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            yield Click(r["user_id"], r["item_id"], int(r["ts"]))

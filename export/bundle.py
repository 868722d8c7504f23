"""The model-bundle format: the stable contract between export/ (writer) and stream/ (reader).

A bundle is a directory:

    manifest.json   format_version, model name/version, max_len, num_items, created_ts,
                    training_data, metrics, config, inputs, sha256 of every other file
    items.csv       index,item_id,title   (index 1..num_items; 0 is padding and not listed)
    model.onnx      input  item_seq int64 [batch, W]  (0 = padding, left-padded, most recent
                                                       item last; W = max_len, or any
                                                       1..max_len when the graph's axis 1 is
                                                       symbolic, as exported graphs' are)
                    input  time_seq int64 [batch, W]  (optional; epoch seconds, 0 = pad)
                    output scores   float32 [batch, num_items + 1]  (column i = item index i)
                    output hidden   float32 [batch, d_model]  (optional; scores = hidden @ V.T + b)
    item_vectors.npy  float32 [num_items + 1, d_model] = V, the item representation (row 0 =
                    padding), so serving can score items outside the graph; exported models
                    write it, hand-built bundles may lack it. Models may add more `<name>.npy`.
    item_bias.npy   float32 [num_items + 1] (optional) = b, added to every score (scores =
                    hidden @ V.T + b): text-aware models' novelty boost on the items without a
                    trained ID, plus their text bias when the model has one. The graphs add it
                    themselves; serving adds it where it scores outside them (headless
                    bundles), and adds manifest config `novelty_boost` (and each item's own
                    text bias, export/item_text.py) to the items it adds at run time
                    (stream/itemtable.py).

Models whose positions count from the first item of the window also carry the incremental
pair, declared in the manifest's optional `step` section (see StepSpec):

    prefill.onnx    input  item_seq int64 [batch, W] (as model.onnx)[, time_seq as model.onnx]
                    output scores, hidden (as model.onnx),
                           kv float16 [batch, n_blocks, 2, W, d_model]: per block the
                           keys (0) and values (1) of every slot, aligned with item_seq
    step.onnx       input  item int64 [batch], position int64 [batch] (0-based, < max_len),
                           past_kv float16 [batch, n_blocks, 2, P, d_model] (P >= 1; slots at
                           and beyond each row's position are ignored); a time-aware
                           model's also time int64 [batch] (the new click's epoch seconds)
                           and past_time int64 [batch, P] (the cached slots' times)
                    output scores, hidden, new_kv float16 [batch, n_blocks, 2, d_model]

A headless bundle (manifest `config.score_head` false; `export_bundle(score_head=False)`, the
default above SCORE_HEAD_MAX_ITEMS items) has the same graphs without `scores`: serving ranks
`hidden` against item_vectors.npy itself (exact or ANN, stream/ann.py), so a large catalogue's
(B, num_items + 1) product is never computed inside onnxruntime. It must carry item_vectors.npy.

The window the incremental path scores is the newest `window_len(...)` items (the rule below);
on that window step.onnx equals model.onnx within the tolerance recorded in the manifest.

This module must not import torch: serving reads bundles with the standard library only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.errors import BundleError, BundleIntegrityError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.csv"
MODEL = "model.onnx"
PREFILL = "prefill.onnx"
STEP = "step.onnx"
ITEM_VECTORS = "item_vectors.npy"
ITEM_BIAS = "item_bias.npy"
KNOWN_INPUTS = ("item_seq", "time_seq")
CACHE_DTYPES = ("float16",)
# Above this many items export_bundle leaves the score head out by default: scoring every item
# per click costs ~1 ms per user at 100k items and ~13 ms at 1M (BENCHMARKS.md, catalogue).
SCORE_HEAD_MAX_ITEMS = 200_000


def default_stride(max_len: int) -> int:
    """Items dropped when the window slides: half the window, so prefill runs once per
    max_len // 2 clicks and the window never holds fewer than max_len - stride + 1 items."""
    return max(1, max_len // 2)


def _check_window_args(max_len: int, stride: int) -> None:
    if max_len < 1 or not 1 <= stride <= max_len:
        raise ValueError(f"need max_len >= 1 and 1 <= stride <= max_len, got {max_len}, {stride}")


def next_window_len(cached_len: int, max_len: int, stride: int) -> int:
    """Window length after one more click, given a cache of `cached_len` positions.

    Positions count from the first item of the window, so cached keys/values stay valid while
    the window grows: the result is `cached_len + 1` (run step.onnx at position `cached_len`)
    until the window is full. A click on a full window slides it: the oldest `stride` items are
    dropped, the result is `max_len - stride + 1` (<= cached_len) and the cache is rebuilt with
    prefill.onnx over the newest that many items. Scores equal model.onnx's on that window.
    """
    _check_window_args(max_len, stride)
    if not 0 <= cached_len <= max_len:
        raise ValueError(f"cached_len {cached_len} is outside 0..{max_len}")
    return cached_len + 1 if cached_len < max_len else max_len - stride + 1


def window_len(history_len: int, max_len: int, stride: int) -> int:
    """Window length after `history_len` clicks, the same as `history_len` calls of
    next_window_len from an empty cache; use it to rebuild a missing cache so the result does
    not depend on whether the cache was evicted."""
    _check_window_args(max_len, stride)
    if history_len < 0:
        raise ValueError(f"history_len {history_len} is negative")
    if history_len <= max_len:
        return history_len
    return max_len - stride + 1 + (history_len - max_len - 1) % stride


@dataclass(frozen=True)
class StepSpec:
    """The manifest's optional `step` section: the incremental pair and its cache layout."""

    n_blocks: int
    d_model: int
    n_heads: int
    stride: int
    prefill: str = PREFILL
    step: str = STEP
    cache_dtype: str = "float16"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], max_len: int) -> StepSpec:
        """Raises KeyError/TypeError/ValueError on a malformed section (Manifest wraps them)."""
        spec = cls(
            n_blocks=int(raw["n_blocks"]),
            d_model=int(raw["d_model"]),
            n_heads=int(raw["n_heads"]),
            stride=int(raw["stride"]),
            prefill=str(raw["prefill"]),
            step=str(raw["step"]),
            cache_dtype=str(raw["cache_dtype"]),
        )
        if min(spec.n_blocks, spec.d_model, spec.n_heads) < 1 or spec.d_model % spec.n_heads:
            raise ValueError(f"step section sizes do not fit together: {spec}")
        if spec.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"step cache_dtype {spec.cache_dtype!r} is not in {CACHE_DTYPES}")
        names = (spec.prefill, spec.step)
        plain = all(Path(n).name == n and not n.startswith(".") for n in names)
        if not plain or set(names) & {MODEL, ITEMS, MANIFEST} or spec.prefill == spec.step:
            raise ValueError(f"step section file names are not usable: {names}")
        _check_window_args(max_len, spec.stride)
        return spec


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` holds; `files` maps every other file in the bundle to its sha256."""

    model_name: str
    model_version: str
    max_len: int
    num_items: int
    files: dict[str, str]
    inputs: tuple[str, ...] = ("item_seq",)
    created_ts: float = 0.0
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    step: StepSpec | None = None  # the incremental pair, when the model has one

    @property
    def score_head(self) -> bool:
        return bool(self.config.get("score_head", True))

    def to_json(self) -> str:
        body = asdict(self)
        body["inputs"] = list(self.inputs)
        if self.step is None:
            del body["step"]  # bundles without the pair keep the manifest they always had
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Manifest:
        try:
            version = int(raw["format_version"])
            if version != FORMAT_VERSION:
                raise BundleError(
                    f"bundle format_version {version} is not supported (this build reads "
                    f"{FORMAT_VERSION}); re-export the model with this streamrec version"
                )
            inputs = tuple(str(x) for x in raw.get("inputs", ["item_seq"]))
            unknown = [name for name in inputs if name not in KNOWN_INPUTS]
            if "item_seq" not in inputs or unknown:
                raise BundleError(f"bundle inputs {inputs} do not follow the contract")
            max_len, num_items = int(raw["max_len"]), int(raw["num_items"])
            if max_len < 1 or num_items < 1:
                raise BundleError(
                    f"bundle max_len {max_len} and num_items {num_items} must be >= 1"
                )
            step_raw = raw.get("step")
            step = None if step_raw is None else StepSpec.from_dict(dict(step_raw), max_len)
            return cls(
                model_name=str(raw["model_name"]),
                model_version=str(raw["model_version"]),
                max_len=max_len,
                num_items=num_items,
                files={str(k): str(v) for k, v in dict(raw["files"]).items()},
                inputs=inputs,
                created_ts=float(raw.get("created_ts", 0.0)),
                training_data=dict(raw.get("training_data", {})),
                metrics=dict(raw.get("metrics", {})),
                config=dict(raw.get("config", {})),
                format_version=version,
                step=step,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. `item_ids[i]` is the id of item index i (index 0 = padding)."""

    path: Path
    manifest: Manifest
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def step(self) -> StepSpec | None:
        """The incremental pair's section, or None when the bundle has no step model."""
        return self.manifest.step

    @property
    def prefill_path(self) -> Path | None:
        return None if self.step is None else self.path / self.step.prefill

    @property
    def step_path(self) -> Path | None:
        return None if self.step is None else self.path / self.step.step

    @property
    def item_vectors_path(self) -> Path | None:
        """item_vectors.npy (float32 [num_items + 1, d]) when the bundle has it."""
        return self.path / ITEM_VECTORS if ITEM_VECTORS in self.manifest.files else None

    @property
    def score_head(self) -> bool:
        """False for a headless bundle: its graphs return `hidden` but no `scores`."""
        return self.manifest.score_head

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def num_items(self) -> int:
        return self.manifest.num_items

    def title_map(self) -> dict[str, str]:
        """item_id -> title."""
        return dict(zip(self.item_ids[1:], self.titles[1:], strict=True))

    def item_index(self) -> dict[str, int]:
        """item_id -> index (1..num_items)."""
        return {item_id: i for i, item_id in enumerate(self.item_ids) if i > 0}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_items_csv(path: Path, items: Sequence[tuple[str, str]]) -> None:
    """Write items.csv; `items[k]` is (item_id, title) of index k + 1."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "item_id", "title"])
        for index, (item_id, title) in enumerate(items, start=1):
            writer.writerow([index, item_id, title])


def read_items_csv(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return (item_ids, titles), both indexed by item index with "" at the padding index 0."""
    ids: list[str] = [""]
    titles: list[str] = [""]
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for expected, row in enumerate(reader, start=1):
                if int(row["index"]) != expected:
                    raise BundleError(f"items.csv: index {row['index']} where {expected} expected")
                ids.append(row["item_id"])
                titles.append(row.get("title") or "")
    except (KeyError, ValueError, csv.Error) as exc:
        raise BundleError(f"items.csv is malformed: {exc!r}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    return tuple(ids), tuple(titles)


def write_bundle(
    out_dir: Path,
    *,
    model_file: Path,
    items: Sequence[tuple[str, str]],
    model_name: str,
    model_version: str,
    max_len: int,
    inputs: Iterable[str] = ("item_seq",),
    training_data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    step: StepSpec | None = None,
) -> Path:
    """Assemble a bundle in a temporary sibling directory, then rename it into place.

    The rename makes a half-written bundle impossible to observe at `out_dir`.
    """
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        shutil.copyfile(model_file, staging / MODEL)
        write_items_csv(staging / ITEMS, items)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / name)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != MANIFEST}
        manifest = Manifest(
            model_name=model_name,
            model_version=model_version,
            max_len=int(max_len),
            num_items=len(items),
            files=files,
            inputs=tuple(inputs),
            created_ts=time.time(),
            training_data=dict(training_data or {}),
            metrics=dict(metrics or {}),
            config=dict(config or {}),
            step=step,
        )
        Manifest.from_dict(json.loads(manifest.to_json()))  # the writer obeys the reader's rules
        _check_required_files(manifest)
        (staging / MANIFEST).write_text(manifest.to_json() + "\n", encoding="utf-8")
    return out_dir


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to fill; renamed onto `out_dir` when the block succeeds,
    removed when it raises, so readers never see a half-written directory."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes 0700: a serving process under another user must read it
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_required_files(manifest: Manifest) -> None:
    step_files = () if manifest.step is None else (manifest.step.prefill, manifest.step.step)
    head = manifest.config.get("score_head", True)
    if not isinstance(head, bool):
        raise BundleError(f"manifest config.score_head is {head!r}; it must be true or false")
    vectors = () if head else (ITEM_VECTORS,)  # headless: serving scores items from these
    for required in (ITEMS, MODEL, *step_files, *vectors):
        if required not in manifest.files:
            raise BundleError(f"manifest does not list {required}")


def verify_files(path: Path, files: Mapping[str, str]) -> None:
    """Every file named in `files` exists under `path` with the recorded sha256."""
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise BundleIntegrityError(f"bundle file {name} is missing from {path}")
        try:
            actual = sha256_file(file)
        except OSError as exc:
            raise BundleError(f"cannot read bundle file {file}: {exc}") from exc
        if actual != expected:
            raise BundleIntegrityError(
                f"bundle file {name} has sha256 {actual[:12]}…, manifest says {expected[:12]}…: "
                "the bundle was modified or partly copied; re-export it"
            )


def load_bundle(path: Path | str) -> Bundle:
    """Read and verify a bundle: every file's sha256 must match the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a model bundle (no {MANIFEST}); run `streamrec export`")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    manifest = Manifest.from_dict(raw)
    _check_required_files(manifest)
    verify_files(path, manifest.files)
    item_ids, titles = read_items_csv(path / ITEMS)
    if len(item_ids) - 1 != manifest.num_items:
        raise BundleError(
            f"items.csv lists {len(item_ids) - 1} items, manifest says {manifest.num_items}"
        )
    return Bundle(path=path, manifest=manifest, item_ids=item_ids, titles=titles)

"""The model-bundle format: the stable contract between export/ (writer) and stream/ (reader).

A bundle is a directory:

    manifest.json   format_version, model name/version, max_len, num_items, created_ts,
                    training_data, metrics, config, inputs, sha256 of every other file
    items.csv       index,item_id,title   (index 1..num_items; 0 is padding and not listed)
    model.onnx      input  item_seq int64 [batch, max_len]  (0 = padding, left-padded,
                                                             most recent item last)
                    input  time_seq int64 [batch, max_len]  (optional; epoch seconds, 0 = pad)
                    output scores   float32 [batch, num_items + 1]  (column i = item index i)

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.errors import BundleError, BundleIntegrityError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.csv"
MODEL = "model.onnx"
KNOWN_INPUTS = ("item_seq", "time_seq")


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

    def to_json(self) -> str:
        body = asdict(self)
        body["inputs"] = list(self.inputs)
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
) -> Path:
    """Assemble a bundle in a temporary sibling directory, then rename it into place.

    The rename makes a half-written bundle impossible to observe at `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes 0700: a serving process under another user must read it
    try:
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
        )
        Manifest.from_dict(json.loads(manifest.to_json()))  # the writer obeys the reader's rules
        (staging / MANIFEST).write_text(manifest.to_json() + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


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
    for required in (ITEMS, MODEL):
        if required not in manifest.files:
            raise BundleError(f"manifest does not list {required}")
    for name, expected in manifest.files.items():
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
    item_ids, titles = read_items_csv(path / ITEMS)
    if len(item_ids) - 1 != manifest.num_items:
        raise BundleError(
            f"items.csv lists {len(item_ids) - 1} items, manifest says {manifest.num_items}"
        )
    return Bundle(path=path, manifest=manifest, item_ids=item_ids, titles=titles)

"""Model bundles on disk: a single bundle, or a models root served through a pointer.

A models root is a directory of versioned bundles plus a `CURRENT` file naming the one to
serve:

    models/
      CURRENT                          -> "sasrec-20261123T031500-1a2b3c4d"
      sasrec-20261123T031500-1a2b3c4d/ manifest.json items.csv model.onnx
      sasrec-20261124T020000-9f8e7d6c/ ...

`publish()` copies a bundle in and flips `CURRENT` with an atomic rename, so the processor
never sees a half-written pointer or bundle. The processor re-reads the pointer between
batches; a bundle that fails verification is refused and the old one keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from export.bundle import Bundle, load_bundle
from export.errors import ExportError

logger = logging.getLogger(__name__)

POINTER = "CURRENT"


def is_models_root(path: Path) -> bool:
    return (path / POINTER).is_file()


def resolve(path: Path) -> Path:
    """The bundle directory to serve: `path` itself, or the one `path/CURRENT` names."""
    if not is_models_root(path):
        return path
    name = (path / POINTER).read_text(encoding="utf-8").strip()
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"{path / POINTER} holds {name!r}, not a bundle directory name")
    return path / name


def publish(bundle_dir: Path, root: Path) -> Path:
    """Copy a verified bundle into the models root and point CURRENT at it."""
    bundle = load_bundle(bundle_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / bundle.model_version
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        try:
            shutil.copytree(bundle_dir, staging, dirs_exist_ok=True)
            load_bundle(staging)  # the copy, not only the source, must verify
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    set_current(root, bundle.model_version)
    return target


def set_current(root: Path, name: str) -> None:
    tmp = root / f".{POINTER}.tmp"
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, root / POINTER)


class BundleSource:
    """Loads the serving bundle and tells the processor when a new one is ready."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.dir = resolve(self.path)
        self.bundle = load_bundle(self.dir)
        self._refused: Path | None = None

    @property
    def reloadable(self) -> bool:
        return is_models_root(self.path)

    def check(self) -> tuple[Path, Bundle] | None:
        """(directory, verified bundle) if the pointer moved to a new one; None otherwise.

        Raises ExportError once per refused target (the caller logs and counts it); a refused
        target is not retried until the pointer changes again. The caller `accept`s the
        candidate once it serves it, or `refuse`s it.
        """
        if not self.reloadable:
            return None
        target = resolve(self.path)
        if target in (self.dir, self._refused):
            return None
        try:
            return target, load_bundle(target)
        except ExportError:
            self._refused = target
            raise

    def accept(self, target: Path, bundle: Bundle) -> None:
        self.dir, self.bundle, self._refused = target, bundle, None

    def refuse(self, target: Path) -> None:
        """The caller could not serve `target` (e.g. onnxruntime refused it): do not retry."""
        self._refused = target

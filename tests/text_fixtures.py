"""The exported text encoder for tests that embed item text (unit and integration).

Exporting takes ~30 s on 2 cores, so tests share the user cache that `streamrec
export-text-encoder` writes (~/.cache/streamrec/text-encoder, outside the repository): used when
it verifies and was exported from the installed model package, re-exported otherwise.
tests/unit/test_text_encoder.py still runs the export itself into a temporary directory.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from export.item_text import DEFAULT_ENCODER_DIR
from stream.errors import ConfigError
from stream.text import TextEncoder


def cached_text_encoder(path: Path = DEFAULT_ENCODER_DIR) -> TextEncoder:
    from export.text_encoder import PACKAGE, export_text_encoder

    wanted = f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"
    try:
        encoder = TextEncoder(path)
        if encoder.manifest.get("source") == wanted:
            return encoder
    except ConfigError:
        pass
    export_text_encoder(path)
    return TextEncoder(path)

"""Errors raised by export/.

ExportError
 ├── BundleError          a bundle directory is missing, unreadable or malformed
 │    └── BundleIntegrityError   a file does not match the manifest's sha256
 └── ParityError          torch and onnxruntime disagree beyond the stated tolerance
"""

from __future__ import annotations


class ExportError(Exception):
    """Root of export/ errors."""


class BundleError(ExportError):
    """The bundle directory cannot be used."""


class BundleIntegrityError(BundleError):
    """A bundle file does not match the sha256 recorded in the manifest."""


class ParityError(ExportError):
    """PyTorch and onnxruntime outputs differ by more than the tolerance."""

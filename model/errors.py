"""Errors raised by model/.

ModelError
 ├── ConfigError        a model or training setting is out of range
 ├── DataError          a data set spec, file or row cannot be used
 ├── CheckpointError    a checkpoint is missing, unreadable or of another format
 ├── TrainingError      training diverged (non-finite loss)
 └── EvaluationError    scores cannot be ranked (wrong shape, non-finite target scores)
"""

from __future__ import annotations


class ModelError(Exception):
    """Root of model/ errors."""


class ConfigError(ModelError):
    """A model or training setting is out of range."""


class DataError(ModelError):
    """A data set spec, file or row cannot be used."""


class CheckpointError(ModelError):
    """A checkpoint is missing, unreadable or not a streamrec SASRec checkpoint."""


class TrainingError(ModelError):
    """Training diverged."""


class EvaluationError(ModelError):
    """Scores cannot be ranked."""

"""Hot model reload for the processor: between batches, a newly published bundle and its
scorer, or the reason it was refused (the processor keeps serving the model it has)."""

from __future__ import annotations

import logging

from export.bundle import Bundle
from export.errors import ExportError
from stream.config import ProcessorSettings
from stream.errors import StreamError
from stream.incremental import make_scorer
from stream.metrics import ProcessorMetrics
from stream.reload import BundleSource
from stream.scoring import Scorer
from stream.state import SessionStore

logger = logging.getLogger(__name__)


def next_model(
    source: BundleSource,
    settings: ProcessorSettings,
    store: SessionStore,
    metrics: ProcessorMetrics,
    serving: str,
) -> tuple[Bundle, Scorer] | None:
    """The bundle CURRENT now points at and a scorer for it, accepted by `source`; None when
    nothing new was published or the new bundle is refused (counted and logged: a refused
    target is not tried again until CURRENT moves)."""
    try:
        candidate = source.check()
    except ExportError as exc:
        refused(metrics, serving, exc)
        return None
    if candidate is None:
        return None
    target, bundle = candidate
    try:
        scorer = make_scorer(bundle, settings, store)
    except StreamError as exc:
        source.refuse(target)
        refused(metrics, serving, exc)
        return None
    source.accept(target, bundle)
    metrics.model_reloads.labels("ok").inc()
    logger.info("model swapped between batches: %s -> %s", serving, bundle.model_version)
    return bundle, scorer


def refused(metrics: ProcessorMetrics, serving: str, exc: Exception) -> None:
    metrics.model_reloads.labels("refused").inc()
    logger.error("refused the new model bundle; still serving %s: %s", serving, exc)

"""Stage one: run the teacher once over a dataset and write its top-k into cache parts.

    config.py    CaptureConfig: every setting of ``kdcache cache``, validated before anything loads
    sources.py   documents from text, JSONL (text or chat), Parquet, ``datasets`` folders; tokenizing
    plan.py      documents -> sequences (windows, packing) -> batches, all before the teacher runs
    extract.py   on the device: the head in float32 chunks -> top-k (or draws) + the tail mass
    run.py       the session (teacher + tokenizer, loaded once) and ``capture_part``, the hot loop

Which process captures which part is the executors' business (kdcache.pipeline.executors).
Stage two never imports this package.
"""

from kdcache.stages.capture.config import TARGETS_ON_OPTIONS, CaptureConfig
from kdcache.stages.capture.plan import sample_id
from kdcache.stages.capture.run import (
    CaptureSession,
    CaptureSummary,
    capture_part,
    load_session,
    load_teacher_and_tokenizer,
)

__all__ = [
    "TARGETS_ON_OPTIONS",
    "CaptureConfig",
    "CaptureSession",
    "CaptureSummary",
    "capture_part",
    "load_session",
    "load_teacher_and_tokenizer",
    "sample_id",
]

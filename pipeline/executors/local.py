"""The local executor: this process captures one part (``run_capture``: ``kdcache cache``, one
job of a SLURM array or of your own launcher, --shard-index I or env) or every part in order
(``run_local``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kdcache.pipeline.executors.base import CaptureRun, all_shards, finish, resolve_shard
from kdcache.stages.capture import CaptureConfig, CaptureSummary, capture_part, load_session
from kdcache.storage.errors import MissingPartError
from kdcache.storage.manifest import finalize
from kdcache.storage.writer import prepare_output

log = logging.getLogger(__name__)


def run_capture(cfg: CaptureConfig) -> CaptureSummary:
    """``kdcache cache``: write this shard's part of the cache (and finalize a one-shard cache)."""
    cfg.validate()
    shard, num_shards = resolve_shard(cfg)
    session = load_session(cfg, num_shards)
    # refuse another cache first; a tensor-parallel rank that does not write hears the verdict
    session.on_writer(lambda: prepare_output(Path(cfg.out), session.identity, replace=cfg.replace))
    summary = capture_part(session, shard)
    if not session.writer:
        return summary
    try:
        finalize(Path(cfg.out))
        summary.finalized = True
    except MissingPartError as e:
        log.info("not finalized yet: %s", e)
    return summary


def run_local(cfg: CaptureConfig) -> CaptureRun:
    """Capture every part in this process, one after the other."""
    t0 = time.perf_counter()
    cfg.validate()
    cfg, shards = all_shards(cfg)
    session = load_session(cfg, cfg.num_shards)
    session.on_writer(lambda: prepare_output(Path(cfg.out), session.identity, replace=cfg.replace))
    run = CaptureRun(out=cfg.out, executor="local", workers=1)
    for shard in shards:
        run.parts.append(capture_part(session, shard))
        log.info(run.parts[-1].line())
    return finish(run, t0) if session.writer else run

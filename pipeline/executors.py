"""Executors for stage one: which process captures which part.

Every executor runs the same per-part function, ``kdcache.stages.capture.capture_part``, with
a session (teacher + tokenizer) loaded once per process; only how parts reach processes differs:

* ``run_local``: this process, every part in order (``kdcache cache`` without an executor
  runs its one --shard-index through ``run_capture``; a SLURM array runs one part per array
  task, see docs/SCALING.md).
* ``run_dask``: a Dask cluster (a ``LocalCluster`` made here, or any running scheduler); each
  worker loads the teacher once (a worker plugin) and captures whole parts, one task per part
  (kdcache.pipeline.dask_executor).

A part is written by one writer at a time (its lease, kdcache.storage.lease), so a retried task
never writes next to the one it replaces. When every part is committed the cache is finalized.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdcache.stages.capture import (
    CaptureConfig,
    CaptureSummary,
    capture_part,
    load_session,
    resolve_num_shards,
)
from kdcache.storage.errors import ConfigError, MissingPartError
from kdcache.storage.manifest import finalize
from kdcache.storage.writer import prepare_output

log = logging.getLogger(__name__)


@dataclass
class CaptureRun:
    """What an executor did: one summary per part, the wall time, whether it finalized."""

    out: str
    executor: str
    workers: int
    parts: list[CaptureSummary] = field(default_factory=list)
    seconds: float = 0.0  # wall time, from the start (cluster, teacher loads) to the manifest
    finalized: bool = False
    missing: str = ""  # finalize's message when parts are still missing

    @property
    def positions(self) -> int:
        return sum(p.positions for p in self.parts)

    @property
    def tokens_per_second(self) -> float:
        return self.positions / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        done = [p for p in self.parts if not p.skipped]
        return (
            f"{self.out}: {len(done)} parts captured, {len(self.parts) - len(done)} already committed; "
            f"{self.positions:,} positions in {self.seconds:.1f}s ({self.tokens_per_second:,.0f} tokens/s) "
            f"on {self.workers} {self.executor} worker{'s' if self.workers != 1 else ''}"
            + ("; cache finalized" if self.finalized else f"; not finalized: {self.missing}")
        )


def available_cpus() -> int:
    """The cores this process may run on: its CPU affinity (what taskset, SLURM and container
    cpusets grant), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def absolute_paths(cfg: CaptureConfig) -> CaptureConfig:
    """The same config with every local path absolute: workers may run in another directory."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    return replace(
        cfg,
        data=absolute(cfg.data),
        out=str(Path(cfg.out).resolve()),
        teacher=absolute(cfg.teacher),
        tokenizer=absolute(cfg.tokenizer),
    )


def all_shards(cfg: CaptureConfig) -> tuple[CaptureConfig, list[int]]:
    """The config with its part count resolved (--num-shards, else the cache's own) and every
    part; refuses --shard-index env (an executor runs them all)."""
    if cfg.shard_index == "env":
        raise ConfigError(
            "--shard-index env picks one part per job; an executor runs every part: drop --shard-index"
        )
    cfg = replace(cfg, num_shards=resolve_num_shards(cfg))
    return cfg, list(range(cfg.num_shards))


def finish(run: CaptureRun, t0: float) -> CaptureRun:
    """Finalize if every part is committed (else record which are missing); stop the clock."""
    try:
        finalize(Path(run.out))
        run.finalized = True
    except MissingPartError as e:
        run.missing = str(e)
        log.info("not finalized yet: %s", e)
    run.seconds = time.perf_counter() - t0
    return run


def run_local(cfg: CaptureConfig) -> CaptureRun:
    """Capture every part in this process, one after the other."""
    t0 = time.perf_counter()
    cfg.validate()
    cfg, shards = all_shards(cfg)
    session = load_session(cfg, cfg.num_shards)
    prepare_output(Path(cfg.out), session.identity, replace=cfg.replace)
    run = CaptureRun(out=cfg.out, executor="local", workers=1)
    for shard in shards:
        run.parts.append(capture_part(session, shard))
        log.info(run.parts[-1].line())
    return finish(run, t0)


def run_dask(
    cfg: CaptureConfig,
    *,
    scheduler: object | None = None,
    workers: int | None = None,
    processes: bool = True,
) -> CaptureRun:
    """Capture every part on a Dask cluster, one task per part.

    scheduler: None (a LocalCluster of ``workers`` workers, 1 thread each, made and closed
    here), a scheduler address ("tcp://host:8786"), or a running cluster / Client object."""
    from kdcache.pipeline.dask_executor import run_on_dask

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    cfg.validate()
    cfg, shards = all_shards(cfg)
    run = CaptureRun(out=cfg.out, executor="dask", workers=0)
    run_on_dask(cfg, shards, run, scheduler=scheduler, workers=workers, processes=processes)
    return finish(run, t0)

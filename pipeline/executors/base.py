"""What every stage-one executor shares: the run's record, the part count, finalizing.

Every executor runs the same per-part function, ``kdcache.stages.capture.capture_part``, with a
session (teacher + tokenizer) loaded once per process; only how parts reach processes differs
(``local``: this process, one part or all; ``dask``: one task per part on a cluster). A part is
written by one writer at a time (its lease), so a retried task never writes next to the one it
replaces. When every part is committed the cache is finalized.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kdcache.stages.capture import CaptureConfig, CaptureSummary
from kdcache.storage.errors import ConfigError, MissingPartError
from kdcache.storage.manifest import finalize, recorded_num_shards

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


def resolve_num_shards(cfg: CaptureConfig, from_env: int | None = None) -> int | None:
    """How many parts the cache has: --num-shards if given; else the cache being resumed (so a
    rerun of one SLURM array task, whose environment describes a one-task array, resumes its
    part of the original array); else ``from_env`` (a fresh array's or torchrun's size); else
    1 outside --shard-index env, None (unknown) inside it.
    With --replace the cache at --out is being replaced: its count does not carry over."""
    if cfg.num_shards is not None:
        return cfg.num_shards
    recorded = None if cfg.replace else recorded_num_shards(Path(cfg.out))
    return recorded or from_env or (None if cfg.shard_index == "env" else 1)


def resolve_shard(cfg: CaptureConfig) -> tuple[int, int]:
    """(shard_index, num_shards). --shard-index env takes the index from the environment:
    SLURM_ARRAY_TASK_ID (the array index is the part index: --array=0-15 for 16 parts; a rerun
    --array=5 resumes part 5) or RANK (torchrun; with --tensor-parallel N the N ranks are one
    teacher: RANK // N of WORLD_SIZE // N). The count never comes from a rerun's array
    shape (``resolve_num_shards``): a fresh array's is SLURM_ARRAY_TASK_MAX + 1."""
    env = os.environ
    tp = cfg.tensor_parallel
    if cfg.shard_index != "env":
        index, source, size = int(cfg.shard_index), "--shard-index", None
    elif "SLURM_ARRAY_TASK_ID" in env:
        index, source = int(env["SLURM_ARRAY_TASK_ID"]), "SLURM_ARRAY_TASK_ID"
        # A fresh array --array=0-15 is 16 parts; --array=5 (a rerun) says nothing of the count.
        fresh = env.get("SLURM_ARRAY_TASK_MIN", "0") == "0" and "SLURM_ARRAY_TASK_MAX" in env
        size = int(env["SLURM_ARRAY_TASK_MAX"]) + 1 if fresh else None
    elif "RANK" in env and "WORLD_SIZE" in env:
        index, source, size = int(env["RANK"]) // tp, "RANK", int(env["WORLD_SIZE"]) // tp
    else:
        raise ConfigError(
            "--shard-index env: expected SLURM_ARRAY_TASK_ID (a SLURM array) or RANK and "
            "WORLD_SIZE (torchrun) in the environment, found neither; pass --shard-index I"
        )
    count = resolve_num_shards(cfg, size)
    if count is None:
        raise ConfigError(
            f"{source} {index}: how many parts? the array does not start at 0 and {cfg.out} holds "
            "no cache to resume; pass --num-shards N (the array index is the part index)"
        )
    if not 0 <= index < count:
        how = (
            f"the array index is the part index: submit --array=0-{count - 1}, or pass --num-shards"
            if source == "SLURM_ARRAY_TASK_ID"
            else "pass --num-shards, or a smaller --shard-index"
        )
        raise ConfigError(
            f"{source} {index} names part {index}, but the cache has {count} part"
            f"{'s' if count != 1 else ''} (0 to {count - 1}); {how}"
        )
    return index, count

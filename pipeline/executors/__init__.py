"""Stage one's executors: which process captures which part.

    run_capture(cfg)   this process, part --shard-index (a SLURM array task, torchrun rank, ...)
    run_local(cfg)     this process, every part in order
    run_dask(cfg)      one task per part on a Dask cluster (a LocalCluster, or a scheduler)

All run ``kdcache.stages.capture.capture_part``; kdcache.pipeline.executors.base holds what they
share. ``run_dask`` imports distributed only when called.
"""

from __future__ import annotations

from kdcache.pipeline.executors.base import CaptureRun, resolve_num_shards, resolve_shard
from kdcache.pipeline.executors.local import run_capture, run_local

EXECUTORS = ("local", "dask")  # `kdcache cache --executor`


def __getattr__(name: str):
    if name == "run_dask":
        from kdcache.pipeline.executors.dask import run_dask

        return run_dask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXECUTORS",
    "CaptureRun",
    "resolve_num_shards",
    "resolve_shard",
    "run_capture",
    "run_dask",
    "run_local",
]

"""kdcache: run the teacher once, cache its top-k logits, train many students from the cache.

The stable public API (the modules behind it may move; these names do not)::

    from kdcache import CacheReader, CacheBatches, build_loss, chunked_loss

    cache = CacheReader("teacher-cache")            # a finalized cache, either backend
    ds = CacheBatches("teacher-cache", batch_size=8, seed=0)
    loss_fn = build_loss("soft_ce", alpha=0.7)

Names load on first use, so ``import kdcache.storage...`` does not pull in torch.
(This folder installs as the ``kdcache`` package itself; storage/, stages/ and pipeline/ as
``kdcache.storage``, ``kdcache.stages`` and ``kdcache.pipeline``: see setup.py.)
"""

from __future__ import annotations

from importlib import import_module

_API = {
    # storage: reading and writing caches
    "CacheReader": "kdcache.storage.reader",
    "CacheSchema": "kdcache.storage.schema",
    "Block": "kdcache.storage.schema",
    "Sequence": "kdcache.storage.schema",
    "verify_cache": "kdcache.storage.verify",
    "convert_cache": "kdcache.storage.convert",
    "KDCacheError": "kdcache.storage.errors",
    # stage one
    "CaptureConfig": "kdcache.stages.capture",
    # stage two
    "CacheBatches": "kdcache.stages.train.dataset",
    "Batch": "kdcache.stages.train.dataset",
    "collate": "kdcache.stages.train.dataset",
    "build_loss": "kdcache.stages.train.losses",
    "chunked_loss": "kdcache.stages.train.losses",
    "LOSSES": "kdcache.stages.train.losses",
    "TrainConfig": "kdcache.stages.train",
    "run_train": "kdcache.stages.train",
    # executors
    "run_capture": "kdcache.pipeline.executors",
    "run_local": "kdcache.pipeline.executors",
    "run_dask": "kdcache.pipeline.executors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Kept so code written against earlier kdcache keeps importing: the loader lives in
kdcache.stages.train.dataset (and ``kdcache.CacheBatches``)."""

from kdcache.stages.train.dataset import Batch, CacheBatches, collate

__all__ = ["Batch", "CacheBatches", "collate"]

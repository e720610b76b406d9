"""Summary statistics of a cache's teacher outputs, streamed block by block (out of core)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.storage.reader import CacheReader


def cache_stats(root: Path, *, top_ids: int = 10, block_sequences: int = 256) -> dict:
    """Top-k mass captured, entropy of the cached distribution, and the most frequent top-1 ids.

    Entropy is over the k+1 buckets (top-k entries and the tail as one bucket): a lower bound
    of the teacher's full entropy, exact when the tail mass is 0.
    """
    cache = CacheReader(root)
    mass_hist = np.zeros(101, np.int64)  # captured top-k mass, 1% bins
    ent_hist = np.zeros(201, np.int64)  # entropy in nats, 0.05 bins up to 10
    top1 = np.zeros(cache.vocab_size, np.int64)
    n = entries = 0
    mass_sum = ent_sum = 0.0
    for block in cache.iter_blocks(block_sequences):
        if block.num_rows == 0:
            continue
        lp = block.topk_logprobs.astype(np.float64)  # (R, k), -inf for padding of sampled targets
        p = np.exp(lp)
        tail = np.exp(block.log_tail.astype(np.float64))  # (R,)
        mass = p.sum(axis=1)
        with np.errstate(invalid="ignore"):
            ent = -np.where(p > 0, p * lp, 0.0).sum(axis=1) - np.where(
                tail > 0, tail * np.log(np.maximum(tail, 1e-300)), 0.0
            )
        mass_hist += np.bincount(np.clip((mass * 100).round().astype(int), 0, 100), minlength=101)
        ent_hist += np.bincount(np.clip((ent / 0.05).astype(int), 0, 200), minlength=201)
        top1 += np.bincount(block.topk_ids[:, 0].astype(np.int64), minlength=cache.vocab_size)
        n += block.num_rows
        entries += int(
            np.isfinite(block.topk_logprobs).sum()
        )  # stored (id, value) pairs, no padding
        mass_sum += float(mass.sum())
        ent_sum += float(ent.sum())

    def quantile(hist: np.ndarray, q: float, width: float) -> float:
        if n == 0:
            return float("nan")
        return float(np.searchsorted(np.cumsum(hist), q * n) * width)

    order = np.argsort(-top1)[:top_ids]
    nbytes = int(cache.manifest["bytes_on_disk"])
    return {
        "target_rows": n,
        "bytes_per_position": nbytes / max(cache.num_positions, 1),
        "entries_per_row": entries / max(n, 1),
        "bytes_per_entry": nbytes / max(entries, 1),
        "topk_mass_mean": mass_sum / n if n else float("nan"),
        "topk_mass_p05": quantile(mass_hist, 0.05, 0.01),
        "topk_mass_p50": quantile(mass_hist, 0.50, 0.01),
        "entropy_mean_nats": ent_sum / n if n else float("nan"),
        "entropy_p50_nats": quantile(ent_hist, 0.50, 0.05),
        "entropy_p95_nats": quantile(ent_hist, 0.95, 0.05),
        "top1_most_frequent": [{"id": int(i), "count": int(top1[i])} for i in order if top1[i] > 0],
    }

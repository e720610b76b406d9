"""Summary statistics of a cache's teacher outputs, on dask.array, out of core.

Each part's stored top-k arrays become dask arrays: Zarr through ``dask.array.from_zarr`` (row
chunks aligned with the stored inner chunks), Arrow through one delayed read per record batch
(``dask.array.from_delayed`` with the batch's row count). The codec's decode runs per chunk
(``map_blocks``), so memory holds a few chunks at a time, never the cache: a cache larger than
RAM works (tests/storage/test_stats.py runs it under a memory limit).

cache_stats(root) -> dict   what ``kdcache stats --json`` prints
plot_stats(stats, out_dir)  entropy, top-k mass and top-ids PNGs (the ``plot`` extra)
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kdcache.storage.codecs import get_codec
from kdcache.storage.errors import IntegrityError, KDCacheError
from kdcache.storage.reader import CacheReader, DecodedPart
from kdcache.storage.schema import Block, CacheSchema

MASS_BINS = 1000  # top-k mass histogram over [0, 1]
ENTROPY_BINS = 1000  # entropy histogram over [0, log(k + 1)] nats (its largest possible value)
SUMMARY_BINS = 50  # histogram resolution in the JSON output
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
ROW_STATS = 4  # mass, entropy (nats), stored entries, top-1 id


def _decode(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, schema: CacheSchema) -> Block:
    """Stored top-k arrays of one chunk -> a block holding the decoded (logical) top-k."""
    stored = dataclasses.replace(Block.empty(schema), topk_ids=ids, topk_logprobs=lp, log_tail=tail)
    return get_codec(schema.codec).decode(stored, schema)


def _row_stats(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, schema: CacheSchema):
    """(R, 4) float64 per row: top-k mass, entropy over the k+1 buckets, entries, top-1 id."""
    b = _decode(ids, lp, tail.reshape(-1), schema)
    lp64 = b.topk_logprobs.astype(np.float64)  # (R, k), -inf for padding of sampled targets
    p = np.exp(lp64)
    t = np.exp(b.log_tail.astype(np.float64))  # (R,) tail mass
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(p > 0, p * lp64, 0.0).sum(axis=1) - np.where(t > 0, t * np.log(t), 0.0)
    out = np.empty((len(p), ROW_STATS))
    out[:, 0] = p.sum(axis=1)
    out[:, 1] = ent
    out[:, 2] = np.isfinite(lp64).sum(axis=1)  # stored (id, value) pairs, no padding
    out[:, 3] = b.topk_ids[:, 0] if b.topk_ids.shape[1] else 0
    return out


def _kept_ids(ids: np.ndarray, lp: np.ndarray, schema: CacheSchema) -> np.ndarray:
    """(R*k,) int64 ids of every stored entry, padding mapped to vocab_size (dropped later).
    The set of ids in a row does not depend on the order: the codec gives it without decoding."""
    stored = dataclasses.replace(Block.empty(schema), topk_ids=ids, topk_logprobs=lp)
    ids64, keep = get_codec(schema.codec).entry_ids(stored)
    return np.where(keep, ids64, schema.vocab_size).reshape(-1)


def _part_graph(part: DecodedPart, schema: CacheSchema, chunk_entries: int, ent_max: float):
    """(target rows, then the dask reductions of one part: mass histogram, entropy histogram,
    (mass, entropy, entries) sums, top-1 id counts, every stored id's counts); None when empty."""
    import dask.array as da

    vocab = schema.vocab_size
    ids, lp, tail = part.stored.topk_arrays(chunk_entries)
    if ids.shape[0] == 0:
        return None
    rows = da.map_blocks(
        _row_stats,
        ids,
        lp,
        tail[:, None],  # (R, 1): the same row chunks as ids
        schema=schema,
        dtype=np.float64,
        chunks=(ids.chunks[0], (ROW_STATS,)),
    )  # (R, 4)
    kept = da.map_blocks(_kept_ids, ids, lp, schema=schema, dtype=np.int64).ravel()
    return (  # float rounding can put a mass a hair above 1: clip into the histograms
        int(rows.shape[0]),
        da.histogram(rows[:, 0].clip(0.0, 1.0), bins=MASS_BINS, range=(0.0, 1.0))[0],
        da.histogram(rows[:, 1].clip(0.0, ent_max), bins=ENTROPY_BINS, range=(0.0, ent_max))[0],
        rows[:, :3].sum(axis=0),
        da.bincount(rows[:, 3].astype(np.int64), minlength=vocab),
        da.bincount(kept, minlength=vocab + 1)[:vocab],
    )


def _compute(graph: tuple, workers: int) -> tuple:
    """dask.compute on ``workers`` threads of a pool of our own, joined before returning or
    raising: a failed chunk must not leave other chunks' reads running while the process exits
    (zarr's event loop would print tracebacks into the one-line error)."""
    import dask

    if workers == 1:
        return dask.compute(*graph, scheduler="synchronous")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdcache-stats")
    try:
        return dask.compute(*graph, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _quantiles(counts: np.ndarray, edges: np.ndarray) -> dict[str, float]:
    """Quantiles from a histogram, linear inside a bin (error at most one bin width)."""
    n = counts.sum()
    if n == 0:
        return {f"p{round(q * 100):02d}": float("nan") for q in QUANTILES}
    cum = np.concatenate([[0], np.cumsum(counts)])
    return {f"p{round(q * 100):02d}": float(np.interp(q * n, cum, edges)) for q in QUANTILES}


def _coarse(counts: np.ndarray, edges: np.ndarray, bins: int) -> dict:
    step = len(counts) // bins
    return {
        "edges": [float(e) for e in edges[::step]],
        "counts": [int(c) for c in counts.reshape(bins, step).sum(axis=1)],
    }


def cache_stats(
    root: Path,
    *,
    top_ids: int = 10,
    chunk_entries: int = 1 << 20,
    workers: int | None = None,
) -> dict:
    """Top-k mass captured, entropy of the cached distribution, and the most frequent ids.

    Entropy is over the k+1 buckets (top-k entries and the tail as one bucket): a lower bound
    of the teacher's full entropy, exact when the tail mass is 0. chunk_entries bounds the
    top-k entries decoded per task (memory ~ 40 bytes each per worker); workers: threads
    (1: the synchronous scheduler; default min(4, CPUs)).
    """

    cache = CacheReader(root)
    schema, vocab = cache.schema, cache.vocab_size
    ent_max = math.log(schema.k + 1) * (1 + 1e-9)
    workers = workers or min(4, os.cpu_count() or 1)
    n = 0
    mass_h, ent_h = np.zeros(MASS_BINS, np.int64), np.zeros(ENTROPY_BINS, np.int64)
    sums = np.zeros(3)
    top1, topk = np.zeros(vocab, np.int64), np.zeros(vocab, np.int64)
    for p in range(cache.num_parts):  # one graph per part: an error names its part
        part = cache.part(p)
        graph = _part_graph(part, schema, chunk_entries, ent_max)
        if graph is None:
            continue
        try:
            results = _compute(graph[1:], workers)
        except KDCacheError:
            raise
        except (ValueError, RuntimeError, OSError) as e:  # zarr: a chunk's crc32c, zstd, ...
            raise IntegrityError(
                f"{part.part_dir}: a stored chunk could not be decoded ({type(e).__name__}: {e}); "
                "run `kdcache verify` and recapture the part"
            ) from e
        for acc, r in zip((mass_h, ent_h, sums, top1, topk), results):
            acc += r
        n += graph[0]
    mass_edges = np.linspace(0.0, 1.0, MASS_BINS + 1)
    ent_edges = np.linspace(0.0, ent_max, ENTROPY_BINS + 1)
    mass_q, ent_q = _quantiles(mass_h, mass_edges), _quantiles(ent_h, ent_edges)
    mass_sum, ent_sum, entries = (float(x) for x in sums)
    nbytes = int(cache.manifest["bytes_on_disk"])

    def most_frequent(counts: np.ndarray) -> list[dict]:
        order = np.argsort(-counts, kind="stable")[:top_ids]
        return [{"id": int(i), "count": int(counts[i])} for i in order if counts[i] > 0]

    nan = float("nan")
    return {
        "target_rows": n,
        "k": schema.k,
        "codec": schema.codec,
        "codec_error": cache.describe()["codec_error"],  # KL exact -> decoded top-k (per part)
        "bytes_per_position": nbytes / max(cache.num_positions, 1),
        "entries_per_row": entries / max(n, 1),
        "bytes_per_entry": nbytes / max(entries, 1),
        "topk_mass_mean": mass_sum / n if n else nan,
        "topk_mass_p05": mass_q["p05"],
        "topk_mass_p50": mass_q["p50"],
        "topk_mass_quantiles": mass_q,
        "topk_mass_histogram": _coarse(mass_h, mass_edges, SUMMARY_BINS),
        "entropy_mean_nats": ent_sum / n if n else nan,
        "entropy_p50_nats": ent_q["p50"],
        "entropy_p95_nats": ent_q["p95"],
        "entropy_quantiles_nats": ent_q,
        "entropy_histogram_nats": _coarse(ent_h, ent_edges, SUMMARY_BINS),
        "top1_distinct_ids": int((top1 > 0).sum()),
        "top1_most_frequent": most_frequent(top1),
        "topk_distinct_ids": int((topk > 0).sum()),
        "topk_most_frequent": most_frequent(topk),
    }


def plot_stats(stats: dict, out_dir: Path) -> list[Path]:
    """entropy.png, topk_mass.png and top_ids.png in out_dir; returns their paths."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "kdcache stats --plot needs matplotlib: pip install 'kdcache[plot]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def hist(key: str, xlabel: str, title: str, name: str) -> None:
        h = stats[key]
        edges = np.asarray(h["edges"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge")
        ax.set(xlabel=xlabel, ylabel="target rows", title=title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    n = stats["target_rows"]
    hist(
        "entropy_histogram_nats",
        "entropy over the top-k + tail buckets (nats)",
        f"Teacher entropy, {n:,} rows (mean {stats['entropy_mean_nats']:.2f})",
        "entropy.png",
    )
    hist(
        "topk_mass_histogram",
        "probability mass in the top-k",
        f"Top-{stats['k']} mass captured (mean {stats['topk_mass_mean']:.3f})",
        "topk_mass.png",
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in (
        (axes[0], "top1_most_frequent", "most frequent top-1 ids"),
        (axes[1], "topk_most_frequent", f"most frequent ids in the top-{stats['k']}"),
    ):
        top = stats[key]
        ax.barh([str(t["id"]) for t in top][::-1], [t["count"] for t in top][::-1])
        ax.set(xlabel="rows", ylabel="token id", title=title)
    fig.tight_layout()
    fig.savefig(out_dir / "top_ids.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "top_ids.png")
    return written

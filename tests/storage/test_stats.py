"""kdcache stats on dask.array: the same figures as a plain numpy pass, both backends and codecs,
plots, damaged chunks, and a cache whose decoded top-k exceeds the memory it is given."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.manifest import CacheIdentity, finalize
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import CacheSchema
from kdcache.storage.stats import cache_stats
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter, write_cache

SMALL = {"zarr": {"shard_rows": 64, "chunk_rows": 16}, "arrow": {"batch_positions": 50}}


def two_part_cache(root: Path, backend: str, codec: str, targets: str = "topk") -> Path:
    """Two parts; with targets="sampled" some rows end in padding (id 0, -inf)."""
    schema = CacheSchema(k=6, vocab_size=300, codec=codec, targets=targets)
    ident = CacheIdentity(
        backend=backend, schema=schema, fingerprints={}, settings={}, num_shards=2
    )
    rng = np.random.default_rng(3)
    for shard, lengths in enumerate(([40, 3, 77], [1, 90, 12, 25])):
        block = synthetic_block(rng, lengths, schema)
        if targets == "sampled":  # unique ids, most drawn first, then padding
            lp = block.topk_logprobs.astype(np.float32)
            ids = block.topk_ids.copy()
            pad = rng.integers(0, 4, size=len(lp))
            cols = np.arange(6)[None, :] >= 6 - pad[:, None]
            lp[cols], ids[cols] = -np.inf, 0
            lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)  # sampled rows carry all mass
            block = dataclasses.replace(
                block,
                topk_ids=ids,
                topk_logprobs=lp.astype(schema.logprob_dtype),
                log_tail=np.full(len(lp), -np.inf, np.float32),
            )
        w = PartWriter.open(root, ident, shard_index=shard, backend_options=SMALL[backend])
        w.add_block(block)
        w.commit()
    finalize(root)
    return root


def reference(root: Path) -> dict:
    """The figures by a plain numpy pass over the decoded cache."""
    cache = CacheReader(root)
    b = cache.block(0, cache.num_sequences)
    lp = b.topk_logprobs.astype(np.float64)
    p, t = np.exp(lp), np.exp(b.log_tail.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(1) - np.where(t > 0, t * np.log(t), 0.0)
    keep = np.isfinite(lp)
    return {
        "rows": b.num_rows,
        "mass": p.sum(1),
        "ent": ent,
        "entries": int(keep.sum()),
        "top1": np.bincount(b.topk_ids[:, 0].astype(np.int64), minlength=cache.vocab_size),
        "topk": np.bincount(b.topk_ids[keep].astype(np.int64), minlength=cache.vocab_size),
    }


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize(
    "codec, targets",
    [("plain", "topk"), ("sorted-q8", "topk"), ("plain", "sampled"), ("sorted-q12", "sampled")],
)
def test_stats_match_a_numpy_pass(tmp_path, backend, codec, targets):
    root = two_part_cache(tmp_path / "c", backend, codec, targets)
    ref = reference(root)
    for workers in (1, 2):  # synchronous and threaded schedulers; chunks smaller than a part
        s = cache_stats(root, chunk_entries=100, workers=workers, top_ids=5)
        assert s["target_rows"] == ref["rows"] == 248
        assert s["entries_per_row"] == pytest.approx(ref["entries"] / ref["rows"])
        assert s["topk_mass_mean"] == pytest.approx(ref["mass"].mean(), rel=1e-9)
        assert s["entropy_mean_nats"] == pytest.approx(ref["ent"].mean(), rel=1e-9)
        width = np.log(7) / 1000  # one histogram bin
        for q in (5, 25, 50, 75, 95, 99):
            want = np.quantile(ref["ent"], q / 100)
            assert abs(s["entropy_quantiles_nats"][f"p{q:02d}"] - want) < 3 * width + 0.02
        assert abs(s["topk_mass_p50"] - np.median(ref["mass"])) < 0.01
        assert sum(s["entropy_histogram_nats"]["counts"]) == ref["rows"]
        assert sum(s["topk_mass_histogram"]["counts"]) == ref["rows"]
        for key, counts in (
            ("top1_most_frequent", ref["top1"]),
            ("topk_most_frequent", ref["topk"]),
        ):
            got = s[key]
            assert [t["count"] for t in got] == sorted(counts, reverse=True)[:5]
            assert all(counts[t["id"]] == t["count"] for t in got)
        assert s["topk_distinct_ids"] == int((ref["topk"] > 0).sum())
        if targets == "sampled":
            assert s["topk_mass_mean"] == pytest.approx(1.0, abs=1e-3)
    # the reconstruction error of the codec, as recorded per part (none for plain)
    err = s["codec_error"]
    assert (err is None) == (codec == "plain")
    if err is not None:
        assert err["rows"] == 248 and 0 < err["kl_mean"] <= err["kl_p99"] <= err["kl_max"]


def kdcache(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["kdcache", *map(str, args)], capture_output=True, text=True, **kw)


def test_cli_stats_json_table_and_plots(tmp_path):
    root = two_part_cache(tmp_path / "c", "zarr", "plain")
    r = kdcache("stats", root, "--json", "--plot", tmp_path / "plots", "--top", "3")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for key in (
        "target_rows",
        "bytes_per_position",
        "entries_per_row",
        "bytes_per_entry",
        "topk_mass_mean",
        "topk_mass_p05",
        "topk_mass_p50",
        "entropy_mean_nats",
        "entropy_p50_nats",
        "entropy_p95_nats",
        "top1_most_frequent",
        "topk_most_frequent",
        "entropy_quantiles_nats",
        "entropy_histogram_nats",
    ):
        assert key in s, key
    assert len(s["top1_most_frequent"]) == 3
    for name in ("entropy.png", "topk_mass.png", "top_ids.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = kdcache("stats", root)
    assert table.returncode == 0 and "entropy (nats)" in table.stdout and "p99" in table.stdout


def test_stats_on_a_damaged_chunk_fails_with_one_line(tmp_path):
    root = two_part_cache(tmp_path / "c", "zarr", "plain")
    shard = root / "parts/part-00001/topk_logprobs/c/0/0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x40
    shard.write_bytes(bytes(data))
    r = kdcache("stats", root)
    assert r.returncode == 1 and "Traceback" not in r.stderr  # damaged data: exit 1
    assert "could not be decoded" in r.stderr and "part-00001" in r.stderr, r.stderr


def test_stats_names_the_missing_plot_extra(tmp_path):
    root = two_part_cache(tmp_path / "c", "arrow", "plain")
    # A matplotlib that cannot be imported, as when the plot extra is not installed.
    (tmp_path / "fake" / "matplotlib").mkdir(parents=True)
    (tmp_path / "fake" / "matplotlib" / "__init__.py").write_text("raise ImportError('none')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    r = kdcache("stats", root, "--plot", tmp_path / "p", env=env)
    assert r.returncode == 2 and "pip install 'kdcache[plot]'" in r.stderr


# -- out of core ---------------------------------------------------------------------------------
_PEAK = (
    "import atexit, sys; atexit.register(lambda: sys.stderr.write(next(l for l in "
    "open('/proc/self/status') if l.startswith('VmPeak')))); "
    "from kdcache.pipeline.cli import main; main()"
)


def _stats_under_limit(
    cache: Path, limit_mb: int | None
) -> tuple[subprocess.CompletedProcess, int]:
    """kdcache stats in a child with RLIMIT_AS = limit_mb; (result, child's VmPeak in MB)."""

    def limit() -> None:
        if limit_mb:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    # Fewer malloc arenas, zarr threads and no mimalloc reservations: a stable address space.
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "2",
        "ZARR_THREADING__MAX_WORKERS": "2",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, "stats", "--json", "--workers", "2", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limit,
    )
    peak = [line for line in r.stderr.splitlines() if line.startswith("VmPeak")]
    return r, int(peak[-1].split()[1]) >> 10 if peak else -1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_stats_out_of_core_under_a_memory_limit(tmp_path, backend):
    """The decoded top-k of the cache (514 MB) is twice the address space the child gets
    beyond what `kdcache stats` needs on a tiny cache: only a chunked pass can finish."""
    schema = CacheSchema(k=32, vocab_size=50_000, logprob_dtype="float32")
    ident = CacheIdentity(backend=backend, schema=schema, fingerprints={}, settings={})
    block = synthetic_block(np.random.default_rng(0), [2048] * 64, schema)  # 131,072 rows
    copies = 20
    blocks = (dataclasses.replace(block, sample_id=block.sample_id + 64 * i) for i in range(copies))
    write_cache(tmp_path / "big", ident, blocks)
    decoded_mb = copies * block.num_rows * (schema.k * (2 + 4) + 4) >> 20  # ids, log-probs, tail

    tiny = two_part_cache(tmp_path / "tiny", backend, "plain")
    r, baseline_mb = _stats_under_limit(tiny, None)
    assert r.returncode == 0 and baseline_mb > 0, r.stderr
    limit_mb = baseline_mb + decoded_mb // 2
    r, peak_mb = _stats_under_limit(tmp_path / "big", limit_mb)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    assert s["target_rows"] == copies * block.num_rows
    # What the big run needed beyond the tiny one is a fraction of the decoded top-k.
    assert peak_mb - baseline_mb < decoded_mb // 2
    print(
        f"{backend}: decoded top-k {decoded_mb} MB, baseline {baseline_mb} MB, limit {limit_mb} MB, "
        f"peak {peak_mb} MB"
    )


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_stats_of_a_sorted_counts_cache_equal_the_plain_ones(tmp_path, backend):
    """Lossless codec, same figures: every drawn id counts (singletons, stored as count - 1 = 0,
    included), padding does not."""
    import torch

    from kdcache.stages.capture.extract import row_seeds, sample_from_logits
    from kdcache.storage.convert import convert_cache
    from kdcache.storage.schema import Block, Sequence

    schema = CacheSchema(k=16, vocab_size=300, targets="sampled")
    z = torch.randn(200, 300, generator=torch.Generator().manual_seed(0)) * 2
    ids, lp, tail, _ = sample_from_logits(
        z, 16, row_seeds(torch.zeros(200).long(), torch.arange(200))
    )
    seq = Sequence(
        0,
        np.arange(200) % 300,
        np.ones(200, np.uint8),
        np.zeros(1, np.int32),
        ids.numpy(),
        lp.numpy().astype(np.float16),
        tail.numpy(),
    )
    ident = CacheIdentity(backend=backend, schema=schema, fingerprints={}, settings={})
    write_cache(tmp_path / "plain", ident, [Block.from_sequences([seq], schema)])
    convert_cache(tmp_path / "plain", tmp_path / "counts", backend, codec="sorted-counts")
    a, b = cache_stats(tmp_path / "plain"), cache_stats(tmp_path / "counts")
    assert b["codec"] == "sorted-counts"
    for key in ("entries_per_row", "topk_distinct_ids", "topk_most_frequent", "top1_most_frequent"):
        assert a[key] == b[key], key
    assert a["entropy_mean_nats"] == pytest.approx(b["entropy_mean_nats"])

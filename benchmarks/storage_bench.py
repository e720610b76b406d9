"""Storage benchmark: write then read ~1,000,000 positions at k=64, vocab 50,257, both backends.

Prints, per backend: write MB/s (logical bytes), read positions/s decoded to numpy in storage
order and in shuffled 64-sequence blocks, bytes per position on disk (every array counted), and
the physical limit: the same stored bytes read raw from disk plus zstd-decompressed in the same
chunk sizes, with no format logic. Run pinned to one core for the "one reading core" figure:

    taskset -c 0 python benchmarks/storage_bench.py [--positions 1000000] [--real CACHE]

--real CACHE rereads an existing cache (e.g. one captured from a real teacher) instead of
synthetic data: its read speed, bytes per position and physical limit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from kdcache.storage.checksums import data_files
from kdcache.storage.manifest import CacheIdentity, finalize
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import AXIS_OF, Block, CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter

zarr.config.set({"threading.max_workers": 1, "async.concurrency": 1})


def make_blocks(positions: int, schema: CacheSchema, seed: int = 0) -> list[Block]:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < positions:
        lengths.append(int(rng.integers(128, 2049)))
    lengths[-1] -= sum(lengths) - positions
    if lengths[-1] < 1:
        lengths.pop()
    blocks, first = [], 0
    for i in range(0, len(lengths), 64):
        blocks.append(synthetic_block(rng, lengths[i : i + 64], schema, first_sample_id=first))
        first += len(lengths[i : i + 64])
    return blocks


def logical_bytes(block: Block) -> int:
    names = list(AXIS_OF) + ["seq_offsets", "row_offsets", "doc_offsets"]
    return sum(getattr(block, n).nbytes for n in names)


def read_storage_order(cache: CacheReader) -> float:
    t = time.perf_counter()
    n = 0
    for block in cache.iter_blocks(block_sequences=64):
        n += block.num_positions
    return n / (time.perf_counter() - t)


def read_shuffled(cache: CacheReader, block_sequences: int = 64, seed: int = 0) -> float:
    starts = np.arange(0, cache.num_sequences, block_sequences)
    np.random.default_rng(seed).shuffle(starts)
    t = time.perf_counter()
    n = 0
    for s in starts:
        n += cache.block(int(s), int(s) + block_sequences).num_positions
    return n / (time.perf_counter() - t)


def physical_limit(cache: CacheReader, chunk_bytes: int) -> float:
    """positions/s for: read every stored file raw + zstd-decompress the same bytes in chunks."""
    files = [f for p in cache.part_names for f in data_files(cache.root / "parts" / p)]
    t = time.perf_counter()
    total = sum(len(f.read_bytes()) for f in files)
    t_read = time.perf_counter() - t
    # Decompression floor: the logical arrays compressed in chunks of the stored chunk size.
    zstd = numcodecs.Zstd(level=3)
    chunks = []
    for block in cache.iter_blocks(block_sequences=256):
        for name in AXIS_OF:
            raw = getattr(block, name).tobytes()
            chunks += [
                zstd.encode(raw[i : i + chunk_bytes]) for i in range(0, len(raw), chunk_bytes)
            ]
    t = time.perf_counter()
    for c in chunks:
        zstd.decode(c)
    t_dec = time.perf_counter() - t
    del total
    return cache.num_positions / (t_read + t_dec)


def bench_backend(backend: str, blocks: list[Block], schema: CacheSchema, out: Path) -> dict:
    identity = CacheIdentity(
        backend=backend, schema=schema, fingerprints={"teacher": "synthetic"}, settings={}
    )
    t = time.perf_counter()
    writer = PartWriter.open(out, identity, flush_positions=1 << 62)
    for b in blocks:
        writer.add_block(b)
    writer.commit()
    finalize(out)
    t_write = time.perf_counter() - t
    return {"write_MBps": sum(logical_bytes(b) for b in blocks) / t_write / 1e6, **bench_read(out)}


def bench_read(path: Path) -> dict:
    cache = CacheReader(path)
    read_storage_order(CacheReader(path))  # warm the page cache
    d = cache.describe()
    chunk_bytes = 8192 * cache.k * 2
    return {
        "positions": cache.num_positions,
        "sequences": cache.num_sequences,
        "bytes_per_position": d["bytes_per_position"],
        "read_storage_order_pos_s": read_storage_order(CacheReader(path)),
        "read_shuffled64_pos_s": read_shuffled(CacheReader(path)),
        "physical_limit_pos_s": physical_limit(cache, chunk_bytes),
    }


def show(name: str, r: dict) -> None:
    print(
        f"{name:>6}: {r['positions']:,} positions in {r['sequences']:,} sequences | "
        + (f"write {r['write_MBps']:.0f} MB/s | " if "write_MBps" in r else "")
        + f"read storage order {r['read_storage_order_pos_s']:,.0f} pos/s | "
        f"shuffled 64-seq blocks {r['read_shuffled64_pos_s']:,.0f} pos/s | "
        f"physical limit (raw read + zstd) {r['physical_limit_pos_s']:,.0f} pos/s | "
        f"{r['bytes_per_position']:.1f} B/position"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--real", type=Path, help="benchmark reading this existing cache instead")
    ap.add_argument(
        "--codecs",
        nargs="+",
        default=["plain"],
        help="codecs to measure (zarr backend for all but plain)",
    )
    args = ap.parse_args()
    if args.real:
        show("real", bench_read(args.real))
        return
    schema = CacheSchema(k=args.k, vocab_size=args.vocab)
    t = time.perf_counter()
    blocks = make_blocks(args.positions, schema)
    print(
        f"generated {sum(b.num_positions for b in blocks):,} synthetic positions in {time.perf_counter() - t:.1f}s"
    )
    runs = [("zarr", "plain"), ("arrow", "plain")] if "plain" in args.codecs else []
    runs += [("zarr", c) for c in args.codecs if c != "plain"]
    for backend, codec in runs:
        tmp = Path(tempfile.mkdtemp(prefix=f"kdcache-bench-{backend}-"))
        try:
            result = bench_backend(backend, blocks, replace(schema, codec=codec), tmp / "cache")
            show(backend if codec == "plain" else f"{backend} {codec}", result)
            err = CacheReader(tmp / "cache").describe()["codec_error"]
            if err:
                print(
                    f"        {codec}: {result['bytes_per_position'] / args.k:.2f} bytes per top-k entry, "
                    f"reconstruction KL mean {err['kl_mean']:.2e}, p99 {err['kl_p99']:.2e} nats"
                )
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

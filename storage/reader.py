"""One reader over both backends: open a cache, count, read sequences, slices and blocks.

cache = CacheReader("teacher-cache")
cache.num_sequences, cache.num_positions, cache.k
seq = cache[0]                      # Sequence: numpy arrays, top-k in probability order
block = cache.block(100, 164)       # Block: 64 sequences as flat arrays + offsets
for block in cache.iter_blocks():   # storage order, one part at a time
    ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.storage.backends import get_backend
from kdcache.storage.backends.base import BackendReader
from kdcache.storage.codecs import get_codec
from kdcache.storage.manifest import open_index, parts_dir
from kdcache.storage.schema import Block, CacheSchema, Sequence


class DecodedPart:
    """A part's backend reader seen through the cache's codec: reads return logical blocks."""

    def __init__(self, stored: BackendReader, schema: CacheSchema) -> None:
        self.stored, self.schema = stored, schema
        self.codec = get_codec(schema.codec)
        self.record, self.num_sequences, self.part_dir = (
            stored.record,
            stored.num_sequences,
            stored.part_dir,
        )

    def read(self, start: int, stop: int) -> Block:
        return self.codec.decode(self.stored.read(start, stop), self.schema)


class CacheReader:
    """A finalized cache, opened read-only. Errors name what is wrong and how to fix it.

    Opening checks the manifest against every part record (counts, k, identity); opening a part
    checks its files against its record, and every read goes through that file table."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest, self.records = open_index(self.root)
        self.schema = CacheSchema.from_dict(self.manifest["schema"])
        self.backend = get_backend(self.manifest["backend"])
        self.part_names = [p["name"] for p in self.manifest["parts"]]
        counts = [int(r["counts"]["sequences"]) for r in self.records]
        # (P+1,) global index of each part's first sequence.
        self.part_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._parts: dict[int, DecodedPart] = {}

    # -- description -------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.schema.k

    @property
    def vocab_size(self) -> int:
        return self.schema.vocab_size

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["totals"]["sequences"])

    @property
    def num_positions(self) -> int:
        return int(self.manifest["totals"]["positions"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["totals"]["rows"])

    @property
    def num_parts(self) -> int:
        return len(self.part_names)

    def __len__(self) -> int:
        return self.num_sequences

    # -- reading -----------------------------------------------------------------------------
    def part(self, index: int) -> DecodedPart:
        if index not in self._parts:
            name = self.part_names[index]
            record = self.records[index]
            stored = self.backend.reader(parts_dir(self.root) / name, self.schema, record)
            self._parts[index] = DecodedPart(stored, self.schema)
        return self._parts[index]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        p = int(np.searchsorted(self.part_starts, i, side="right")) - 1
        return p, i - int(self.part_starts[p])

    def sequence(self, i: int) -> Sequence:
        p, j = self._locate(i)
        return self.part(p).read(j, j + 1).sequence(0)

    def block(self, start: int, stop: int) -> Block:
        """Sequences [start, stop) as one block (a copy only where it spans parts)."""
        start, stop = max(0, start), min(stop, self.num_sequences)
        if stop <= start:
            return Block.empty(self.schema)
        blocks = []
        p = self._locate(start)[0]
        while start < stop:
            lo, hi = int(self.part_starts[p]), int(self.part_starts[p + 1])
            end = min(stop, hi)
            if end > start:
                blocks.append(self.part(p).read(start - lo, end - lo))
            start, p = end, p + 1
        return Block.concat(blocks, self.schema)

    def __getitem__(self, key: int | slice) -> Sequence | Block:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_sequences)
            if step != 1:
                raise IndexError(
                    "CacheReader slices take step 1; read blocks and index them instead"
                )
            return self.block(start, stop)
        return self.sequence(int(key) + (self.num_sequences if key < 0 else 0))

    def iter_blocks(self, block_sequences: int = 256) -> Iterator[Block]:
        """Every sequence in storage order, as blocks that never span two parts."""
        for p in range(self.num_parts):
            n = int(self.part_starts[p + 1] - self.part_starts[p])
            for start in range(0, n, block_sequences):
                yield self.part(p).read(start, min(start + block_sequences, n))

    def __iter__(self) -> Iterator[Sequence]:
        for block in self.iter_blocks():
            yield from block

    def to_arrow(self, block_sequences: int = 256):
        """The whole cache as a ``pyarrow.RecordBatchReader``: one row per sequence, the Arrow
        backend's columns (docs/FORMAT.md) with the targets decoded (probability order) and the
        log-probs as float32, whatever the backend and codec. DuckDB, Polars and pandas read it
        as it is (DuckDB cannot scan Arrow half floats, the default storage type)::

            reader = CacheReader("CACHE").to_arrow()
            duckdb.sql("SELECT count(*), sum(len(input_ids)) FROM reader")
        """
        import pyarrow as pa

        from kdcache.storage.backends.arrow import arrow_schema, block_to_batch

        logical = replace(self.schema, codec="plain", logprob_dtype="float32")
        schema = arrow_schema(logical)

        def batches():
            for block in self.iter_blocks(block_sequences):
                block.topk_logprobs = block.topk_logprobs.astype(np.float32, copy=False)
                yield block_to_batch(block, schema)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def describe(self) -> dict:
        """What ``kdcache inspect --json`` prints."""
        m = self.manifest
        nbytes = int(m["bytes_on_disk"])
        return {
            "path": str(self.root),
            "format": m["format"],
            "format_version": m["format_version"],
            "backend": m["backend"],
            "k": self.k,
            "vocab_size": self.vocab_size,
            "id_dtype": self.schema.id_dtype.name,
            "logprob_dtype": self.schema.logprob_dtype,
            "targets": self.schema.targets,
            "targets_on": self.schema.targets_on,
            "codec": self.schema.codec,
            "num_sequences": self.num_sequences,
            "num_positions": self.num_positions,
            "num_target_rows": self.num_rows,
            "bytes_on_disk": nbytes,
            "bytes_per_position": nbytes / self.num_positions if self.num_positions else 0.0,
            "bytes_per_entry": nbytes / (self.num_rows * self.k) if self.num_rows else 0.0,
            "codec_error": _merge_codec_error(m["parts"]),
            "content_sha256": m.get("content_sha256"),
            "teacher": m["fingerprints"].get("teacher"),
            "tokenizer": m["fingerprints"].get("tokenizer"),
            "data": m["fingerprints"].get("data"),
            "settings": m["settings"],
            "parts": m["parts"],
            "kdcache_version": m.get("kdcache_version"),
            "created": m.get("created"),
        }


def _merge_codec_error(parts: list[dict]) -> dict | None:
    """The reconstruction KL over all parts (mean weighted by rows; p99 and max: the worst part's)."""
    errs = [p["codec_error"] for p in parts if "codec_error" in p]
    if not errs:
        return None
    rows = sum(e["rows"] for e in errs)
    return {
        "rows": rows,
        "kl_mean": sum(e["kl_mean"] * e["rows"] for e in errs) / max(rows, 1),
        "kl_p99": max(e["kl_p99"] for e in errs),
        "kl_max": max(e["kl_max"] for e in errs),
    }

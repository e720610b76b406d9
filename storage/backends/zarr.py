"""Zarr v3 backend: one group per part, sharded arrays, zstd + crc32c per inner chunk.

Arrays (docs/FORMAT.md): the flat arrays of the schema plus ``seq_offsets``, ``row_offsets``,
``doc_offsets`` (S+1, int64). Every array is sharded (``shard_rows`` rows per shard file,
``chunk_rows`` per inner chunk) with zstd and a crc32c checksum on every inner chunk, so a read
of a damaged chunk fails loudly. With a compact codec (``schema.codec`` other than plain), the
delta-coded ids of top-k targets go through zstd at ``ids_level`` (12): a teacher's top-k rows
repeat, and zstd's matches find them (on a 32,000-id teacher's top-64, 11% fewer bytes than a
byte shuffle); the other multi-byte top-k arrays (sampled ids, counts, 9- to 12-bit levels) go
through Blosc's byte shuffle before zstd (level ``compact_level``, 5): the high bytes of small
numbers are mostly 0.

Every write covers whole shards: the writer keeps the rows of the array's last, incomplete shard
in memory and rewrites that shard whole (from its first row to the array's end) at each append;
zarr-python loses data when two writers touch one shard (zarr-python issue 3682), and a shard
written whole has exactly one writer. Durability: the written shard files and metadata are
fsync'd before ``append`` returns.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

from kdcache.storage.backends.base import Backend, BackendReader, BackendWriter
from kdcache.storage.checksums import PartFiles, file_crc32c
from kdcache.storage.durable import fsync_path
from kdcache.storage.errors import IntegrityError, KDCacheError
from kdcache.storage.schema import AXIS_OF, OFFSETS_OF_AXIS, Block, CacheSchema

OFFSET_ARRAYS = tuple(OFFSETS_OF_AXIS.values())  # seq_offsets, row_offsets, doc_offsets
# Every chunk is written, all-fill ones too, so a missing shard file is always damage (zarr
# reads a missing chunk as fill values). A runtime setting: given at every open for writing.
WRITE_CONFIG = {"write_empty_chunks": True}


def _array_specs(schema: CacheSchema) -> dict[str, tuple[np.dtype, tuple[int, ...], str]]:
    """name -> (dtype, inner shape, axis) for every stored array."""
    dtypes = schema.stored_dtypes()
    specs = {
        name: (dtypes[name], (schema.k,) if name in ("topk_ids", "topk_logprobs") else (), axis)
        for name, axis in AXIS_OF.items()
    }
    for name in OFFSET_ARRAYS:
        specs[name] = (np.dtype(np.int64), (), "offset")
    return specs


def _rows(counts: dict[str, int], axis: str) -> int:
    return counts["sequence"] + 1 if axis == "offset" else counts[axis]


class ZarrWriter(BackendWriter):
    name = "zarr"

    def __init__(
        self, part_dir: Path, schema: CacheSchema, options: dict, state: dict | None
    ) -> None:
        super().__init__(part_dir, schema, options)
        self.shard_rows = int(options["shard_rows"])
        self.chunk_rows = int(options["chunk_rows"])
        self.specs = _array_specs(schema)
        self.counts = (
            dict(state["counts"]) if state else {"sequence": 0, "position": 0, "row": 0, "doc": 0}
        )
        if state is None:
            # "a", not "w": the part writer has emptied the folder but for its lease file
            self.group = zarr.open_group(self.part_dir, mode="a", zarr_format=3)
            self.arrays = {name: self._create(name) for name in self.specs}
            for name in OFFSET_ARRAYS:  # offsets start with a single 0 row
                self._write(name, 0, np.zeros(1, dtype=np.int64))
            self._tail = {name: (0, np.zeros((1,), np.int64)) for name in OFFSET_ARRAYS}
        else:
            for partial in self.part_dir.rglob("*.partial"):  # zarr's temp files of a killed write
                partial.unlink(missing_ok=True)
            self.group = zarr.open_group(self.part_dir, mode="r+", zarr_format=3)
            self.arrays = {name: self.group[name].with_config(WRITE_CONFIG) for name in self.specs}
            self._tail = {}
            self._check_durable_shards()
        for name, (dtype, inner, axis) in self.specs.items():
            if name in self._tail:
                continue
            n = _rows(self.counts, axis)
            arr = self.arrays[name]
            if arr.shape[0] != n:  # drop rows written after the last durable append
                arr.resize((n, *inner))
            start = n // self.shard_rows * self.shard_rows
            self._tail[name] = (start, arr[start:n] if n > start else np.zeros((0, *inner), dtype))

    def _shard_path(self, name: str, shard: int) -> Path:
        suffix = "/0" if self.specs[name][1] else ""
        return self.part_dir / name / "c" / f"{shard}{suffix}"

    def _check_durable_shards(self) -> None:
        """Every shard of the durable rows must exist (every chunk is written, even all-fill
        ones): zarr would read a missing one as zeros and the resumed part would carry them."""
        for name, (_, _, axis) in self.specs.items():
            n = _rows(self.counts, axis)
            for shard in range(-(-n // self.shard_rows)):
                if not self._shard_path(name, shard).is_file():
                    raise IntegrityError(
                        f"{self._shard_path(name, shard)}: missing, but the part's progress "
                        f"records {n} durable rows of {name}"
                    )

    def _create(self, name: str) -> zarr.Array:
        dtype, inner, _ = self.specs[name]
        level = int(self.options["zstd_level"])
        compressor = ZstdCodec(level=level)
        if self.schema.codec != "plain" and name == "topk_ids" and self.schema.targets == "topk":
            # delta-coded top-k ids: rows repeat, and zstd's matches find them where a byte
            # shuffle would cut them apart (sampled ids are draws: they repeat less, and the
            # shuffle below stores them smaller)
            compressor = ZstdCodec(level=int(self.options["ids_level"]))
        elif self.schema.codec != "plain" and inner and dtype.itemsize > 1:
            compressor = BloscCodec(
                typesize=dtype.itemsize,
                cname="zstd",
                clevel=int(self.options["compact_level"]),
                shuffle="shuffle",
            )
        return self.group.create_array(
            name,
            shape=(0, *inner),
            chunks=(self.chunk_rows, *inner),
            shards=(self.shard_rows, *inner),
            dtype=dtype,
            compressors=[compressor, Crc32cCodec()],
            fill_value=0,
            config=WRITE_CONFIG,
        )

    def _write(self, name: str, start: int, rows: np.ndarray) -> None:
        """Write rows at [start, start+len) where start is a shard boundary; fsync the files."""
        arr = self.arrays[name]
        end = start + len(rows)
        arr.resize((end, *arr.shape[1:]))
        arr[start:end] = rows
        for shard in range(start // self.shard_rows, (end - 1) // self.shard_rows + 1):
            fsync_path(self._shard_path(name, shard))
        fsync_path(self.part_dir / name / "zarr.json")

    def append(self, block: Block) -> None:
        if block.num_sequences == 0:
            return
        new_counts = {axis: self.counts[axis] + n for axis, n in block.counts().items()}
        for name, (_, _, axis) in self.specs.items():
            if axis == "offset":
                axis_name = next(a for a, o in OFFSETS_OF_AXIS.items() if o == name)
                base = self.counts[axis_name]
                data = getattr(block, name)[1:] + base
            else:
                data = getattr(block, name)
            start, tail = self._tail[name]
            rows = np.concatenate([tail, data]) if len(tail) else data
            self._write(name, start, rows)
            end = start + len(rows)
            new_start = end // self.shard_rows * self.shard_rows
            self._tail[name] = (new_start, rows[new_start - start :].copy())
        for d in {self.part_dir / name / "c" for name in self.specs} | {self.part_dir}:
            if d.exists():
                fsync_path(d)
        self.counts = new_counts

    def state(self) -> dict:
        return {"counts": dict(self.counts)}


class CheckedStore(WrapperStore[LocalStore]):
    """A part's store, read through its recorded file table (``PartFiles.check``): zarr returns
    fill values for a chunk whose file is missing, so a deleted or replaced shard must be
    refused here, before zarr sees it. Keys are paths relative to the part folder."""

    def __init__(self, store: LocalStore, files: PartFiles) -> None:
        super().__init__(store)
        self._files = files

    def _with_store(self, store: LocalStore) -> CheckedStore:
        return type(self)(store, self._files)

    async def get(self, key, prototype=None, byte_range=None):
        if self._files.check(key) is None:
            return None  # not recorded and absent: a chunk the writer never wrote
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._files.check(key)
        return await self._store.get_partial_values(prototype, key_ranges)

    async def exists(self, key: str) -> bool:
        return self._files.check(key) is not None


def open_part_group(part_dir: Path, files: PartFiles) -> zarr.Group:
    """The committed part's zarr group, read-only, every read checked against its file table."""
    store = CheckedStore(LocalStore(part_dir, read_only=True), files)
    return zarr.open_group(store=store, mode="r", zarr_format=3)


class ZarrReader(BackendReader):
    name = "zarr"

    def __init__(self, part_dir: Path, schema: CacheSchema, record: dict) -> None:
        super().__init__(part_dir, schema, record)
        self._check_metadata()
        try:
            group = open_part_group(self.part_dir, self.files)
            self.arrays = {name: group[name] for name in _array_specs(schema)}
        except KDCacheError:
            raise
        except (KeyError, FileNotFoundError, ValueError, TypeError) as e:
            raise IntegrityError(
                f"{self.part_dir}: cannot open the part's zarr group ({e}); run `kdcache verify`"
            ) from e
        # (S+1,) int64 each: small, loaded once so any sequence is found without a read.
        whole = [slice(0, self.arrays[name].shape[0]) for name in OFFSET_ARRAYS]
        self.offsets = dict(zip(OFFSET_ARRAYS, _read_checked(self, list(OFFSET_ARRAYS), whole)))
        for name in OFFSET_ARRAYS:
            if len(self.offsets[name]) != self.num_sequences + 1:
                raise IntegrityError(
                    f"{self.part_dir}/{name}: expected {self.num_sequences + 1} offsets (part.json), "
                    f"found {len(self.offsets[name])}"
                )

    def _check_metadata(self) -> None:
        """The crc32c of every zarr.json against part.json before zarr parses it: chunks carry
        their own crc32c, metadata does not, and a damaged one could still parse (another
        shape, dtype or codec) and decode garbage."""
        for rel, want in self.record.get("files", {}).items():
            if not rel.endswith("zarr.json"):
                continue
            path = self.part_dir / rel
            found = file_crc32c(path) if path.is_file() else "missing"
            if found != want["crc32c"]:
                raise IntegrityError(
                    f"{path}: crc32c {found} does not match {want['crc32c']} in part.json; "
                    "the part's metadata is damaged: run `kdcache verify` and recapture the part"
                )

    def layout_problems(self, where: str) -> list[str]:
        """Every array's shape and dtype against part.json's counts and the schema."""
        counts = self.record["counts"]
        n = {
            "sequence": counts["sequences"],
            "position": counts["positions"],
            "row": counts["rows"],
            "doc": counts["docs"],
            "offset": counts["sequences"] + 1,
        }
        problems = []
        for name, (dtype, inner, axis) in _array_specs(self.schema).items():
            arr, want = self.arrays[name], (n[axis], *inner)
            if tuple(arr.shape) != want:
                problems.append(
                    f"{where}/{name}: wrong shape {tuple(arr.shape)}, part.json counts give {want}"
                )
            if arr.dtype != dtype:
                problems.append(f"{where}/{name}: dtype {arr.dtype}, the schema stores {dtype}")
        return problems

    def topk_arrays(self, chunk_entries: int) -> tuple:
        """dask.array.from_zarr of the three arrays, row chunks of whole inner chunks."""
        import dask.array as da

        k = self.schema.k
        inner = int(self.arrays["topk_ids"].chunks[0])
        rows = max(inner, chunk_entries // max(k, 1) // inner * inner)
        return tuple(
            da.from_zarr(self.arrays[name], chunks=(rows, k)[: self.arrays[name].ndim])
            for name in ("topk_ids", "topk_logprobs", "log_tail")
        )

    def read(self, start: int, stop: int) -> Block:
        so, ro, do = (self.offsets[n] for n in OFFSET_ARRAYS)
        ranges = {
            "sequence": (start, stop),
            "position": (so[start], so[stop]),
            "row": (ro[start], ro[stop]),
            "doc": (do[start], do[stop]),
        }
        names = list(AXIS_OF)
        slices = [slice(int(ranges[AXIS_OF[n]][0]), int(ranges[AXIS_OF[n]][1])) for n in names]
        flat = dict(zip(names, _read_checked(self, names, slices)))
        return Block(
            seq_offsets=so[start : stop + 1] - so[start],
            row_offsets=ro[start : stop + 1] - ro[start],
            doc_offsets=do[start : stop + 1] - do[start],
            **flat,
        )


def _read_checked(reader: ZarrReader, names: list[str], slices: list[slice]) -> list[np.ndarray]:
    """The rows ``slices[i]`` of array ``names[i]``, all in one pass of zarr's event loop (one
    round trip for a block's arrays instead of one each: that hand-off, not the decoding,
    bounds a one-core reader of small blocks)."""

    async def gather():
        return await asyncio.gather(
            *(reader.arrays[n].async_array.getitem((s,)) for n, s in zip(names, slices))
        )

    try:
        return [np.asarray(a) for a in sync(gather())]
    except KDCacheError:
        raise  # a missing or replaced file, named by the store
    except Exception as e:  # zarr raises plain ValueError/RuntimeError on a bad checksum
        raise IntegrityError(
            f"{reader.part_dir}: rows {', '.join(f'{n}[{s.start}, {s.stop})' for n, s in zip(names, slices))} "
            f"could not be decoded ({type(e).__name__}: {e}); the part is damaged: run "
            "`kdcache verify` and recapture the part"
        ) from e


BACKEND = Backend(
    "zarr",
    ZarrWriter,
    ZarrReader,
    defaults={
        "shard_rows": 65536,
        "chunk_rows": 8192,
        "zstd_level": 3,
        "compact_level": 5,
        "ids_level": 12,
    },
)

__all__ = ["BACKEND", "ZarrReader", "ZarrWriter"]

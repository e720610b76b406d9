"""Arrow backend: Arrow IPC files, one row per sequence with list columns.

Each durable append writes one complete IPC *file* (``block-NNNNN.arrow``, footer included, so
it is memory-mappable and readable at random by record batch); a part is the ordered list of its
block files, recorded in part.json. Record batches hold at most ``batch_positions`` positions.
``pyarrow.dataset.dataset(PART_DIR, format="ipc")``, pandas and DuckDB open them as they are.

Columns: sample_id uint64; input_ids list<uint16|uint32>; loss_mask list<uint8>;
doc_starts list<int32>; topk_ids list<fixed_size_list<uint16|uint32, k>>;
topk_logprobs list<fixed_size_list<float16|float32, k>>; log_tail list<float32>.
Arrow IPC has no checksums of its own: part.json records a crc32c of every file, checked the
first time a reader touches the file (and by ``kdcache verify``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.storage.backends.base import Backend, BackendReader, BackendWriter
from kdcache.storage.checksums import file_crc32c
from kdcache.storage.durable import write_durable
from kdcache.storage.errors import IntegrityError
from kdcache.storage.schema import Block, CacheSchema

LIST_COLUMNS = ("input_ids", "loss_mask", "doc_starts", "topk_ids", "topk_logprobs", "log_tail")
OFFSETS_FOR = {
    "input_ids": "seq_offsets",
    "loss_mask": "seq_offsets",
    "doc_starts": "doc_offsets",
    "topk_ids": "row_offsets",
    "topk_logprobs": "row_offsets",
    "log_tail": "row_offsets",
}


def arrow_schema(schema: CacheSchema) -> pa.Schema:
    dt = schema.stored_dtypes()

    def prim(name: str) -> pa.DataType:
        return pa.from_numpy_dtype(dt[name])

    return pa.schema(
        [
            ("sample_id", pa.uint64()),
            ("input_ids", pa.list_(prim("input_ids"))),
            ("loss_mask", pa.list_(prim("loss_mask"))),
            ("doc_starts", pa.list_(prim("doc_starts"))),
            ("topk_ids", pa.list_(pa.list_(prim("topk_ids"), schema.k))),
            ("topk_logprobs", pa.list_(pa.list_(prim("topk_logprobs"), schema.k))),
            ("log_tail", pa.list_(prim("log_tail"))),
        ],
        metadata={"kdcache.k": str(schema.k), "kdcache.vocab_size": str(schema.vocab_size)},
    )


def block_to_batch(block: Block, schema: pa.Schema) -> pa.RecordBatch:
    cols = [pa.array(block.sample_id, pa.uint64())]
    for name in LIST_COLUMNS:
        values = getattr(block, name)
        field_type = schema.field(name).type
        if values.ndim == 2:  # (R, k) -> fixed_size_list<k>
            flat = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            flat = pa.array(values)
        offsets = pa.array(getattr(block, OFFSETS_FOR[name]).astype(np.int32))
        cols.append(pa.ListArray.from_arrays(offsets, flat, type=field_type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def batch_to_block(batch: pa.RecordBatch, k: int) -> Block:
    out = {"sample_id": batch.column("sample_id").to_numpy()}
    for name in LIST_COLUMNS:
        col = batch.column(name)
        offsets = col.offsets.to_numpy().astype(np.int64)
        out.setdefault(OFFSETS_FOR[name], offsets - offsets[0])
        values = col.flatten()
        if isinstance(values, pa.FixedSizeListArray):
            values = values.flatten()
            out[name] = values.to_numpy().reshape(-1, k)
        else:
            out[name] = values.to_numpy()
    return Block(**out)


def _split(block: Block, max_positions: int) -> list[Block]:
    """Cut a block into runs of whole sequences of at most max_positions (>= 1 sequence each)."""
    pieces, start = [], 0
    so = block.seq_offsets
    while start < block.num_sequences:
        stop = int(np.searchsorted(so, so[start] + max_positions, side="right")) - 1
        stop = max(stop, start + 1)
        pieces.append(block.slice(start, stop))
        start = stop
    return pieces


class ArrowWriter(BackendWriter):
    name = "arrow"

    def __init__(
        self, part_dir: Path, schema: CacheSchema, options: dict, state: dict | None
    ) -> None:
        super().__init__(part_dir, schema, options)
        self.part_dir.mkdir(parents=True, exist_ok=True)
        self.files: list[dict] = list(state["files"]) if state else []
        self.schema_pa = arrow_schema(schema)
        compression = options["compression"]
        self.write_options = pa.ipc.IpcWriteOptions(
            compression=None if compression == "none" else compression
        )
        keep = {f["name"] for f in self.files}
        for stale in self.part_dir.glob("block-*.arrow"):  # written after the last durable append
            if stale.name not in keep:
                stale.unlink()

    def append(self, block: Block) -> None:
        if block.num_sequences == 0:
            return
        name = f"block-{len(self.files):05d}.arrow"
        path = self.part_dir / name
        batches = [
            block_to_batch(b, self.schema_pa)
            for b in _split(block, int(self.options["batch_positions"]))
        ]

        def write(f) -> None:
            with pa.ipc.new_file(f, self.schema_pa, options=self.write_options) as w:
                for b in batches:
                    w.write_batch(b)

        write_durable(path, write)
        self.files.append({"name": name, "batches": [b.num_rows for b in batches]})

    def state(self) -> dict:
        return {"files": list(self.files)}


class ArrowReader(BackendReader):
    name = "arrow"

    def __init__(self, part_dir: Path, schema: CacheSchema, record: dict) -> None:
        super().__init__(part_dir, schema, record)
        self.blocks = record["backend_state"].get("files")
        if not isinstance(self.blocks, list) or not all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and isinstance(f.get("batches"), list)
            and all(isinstance(n, int) and n >= 0 for n in f["batches"])
            for f in self.blocks
        ):
            raise IntegrityError(
                f"{self.part_dir}/part.json: backend_state.files is damaged (expected a list of "
                "block files with their record-batch sizes); run `kdcache verify`"
            )
        self.checksums = {name: v["crc32c"] for name, v in record["files"].items()}
        # Global sequence index of each record batch's first sequence: (B+1,) int64.
        sizes = [
            (fi, bi, n) for fi, f in enumerate(self.blocks) for bi, n in enumerate(f["batches"])
        ]
        self.batch_index = [(fi, bi) for fi, bi, _ in sizes]
        self.batch_starts = np.concatenate([[0], np.cumsum([n for _, _, n in sizes])]).astype(
            np.int64
        )
        if self.batch_starts[-1] != self.num_sequences:
            raise IntegrityError(
                f"{self.part_dir}: record batches hold {self.batch_starts[-1]} sequences, "
                f"part.json says {self.num_sequences}; run `kdcache verify`"
            )
        self._open: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._last: tuple[tuple[int, int], pa.RecordBatch] | None = None
        self._checked: set[int] = set()

    def _check(self, fi: int) -> Path:
        """The path of file fi, its crc32c checked against part.json on first use."""
        name = self.blocks[fi]["name"]
        path = self.files.check(name)  # recorded, present, unchanged since the part was opened
        if path is None:
            raise IntegrityError(
                f"{self.part_dir / name}: part.json lists this block but records no checksum for "
                "it; the part record is damaged: run `kdcache verify`"
            )
        if fi not in self._checked:
            found = file_crc32c(path)
            if found != self.checksums[name]:
                raise IntegrityError(
                    f"{path}: crc32c {found} does not match {self.checksums[name]} in part.json; "
                    "the file is damaged: recapture the part"
                )
            self._checked.add(fi)
        return path

    def _file(self, fi: int) -> pa.ipc.RecordBatchFileReader:
        if fi not in self._open:
            self._open[fi] = pa.ipc.open_file(pa.memory_map(str(self._check(fi)), "r"))
        return self._open[fi]

    def _batch(self, fi: int, bi: int) -> pa.RecordBatch:
        """Record batch bi of file fi, decompressed; the last one is kept, so that reading a
        batch in several blocks (storage order) decompresses it once."""
        if self._last is None or self._last[0] != (fi, bi):
            self._last = ((fi, bi), self._file(fi).get_batch(bi))
        return self._last[1]

    def batch_rows(self) -> list[tuple[int, int, int]]:
        """(file index, batch index, target rows) of every record batch, in order; decodes only
        the small log_tail column of each batch (after the file's checksum)."""
        out = []
        for fi, f in enumerate(self.blocks):
            with self._columns(fi, ("log_tail",)) as (reader, _):
                for bi in range(len(f["batches"])):
                    out.append((fi, bi, len(self._get(reader, fi, bi).column(0).flatten())))
        return out

    def read_topk(self, fi: int, bi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored (topk_ids (R, k), topk_logprobs (R, k), log_tail (R,)) of one record batch.
        Reads that batch's buffers only (no memory map: out-of-core passes such as
        ``kdcache stats`` keep their address space small); safe from many threads."""
        names = ("topk_ids", "topk_logprobs", "log_tail")
        with self._columns(fi, names) as (reader, _):
            batch = self._get(reader, fi, bi)
            try:
                ids, lp = (batch.column(n).flatten().flatten().to_numpy() for n in names[:2])
                tail = batch.column("log_tail").flatten().to_numpy()
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
                raise IntegrityError(
                    f"{self.part_dir}: cannot decode record batch {bi} of {self.blocks[fi]['name']}: {e}"
                ) from e
        k = self.schema.k
        return ids.reshape(-1, k), lp.reshape(-1, k), tail

    @contextmanager
    def _columns(self, fi: int, names: tuple[str, ...]):
        """(reader of file fi that decodes only the named columns, its file), read with plain
        file reads."""
        path = self._check(fi)
        with pa.OSFile(str(path), "rb") as f:
            try:
                fields = [pa.ipc.open_file(f).schema.get_field_index(n) for n in names]
                options = pa.ipc.IpcReadOptions(included_fields=fields)
                yield pa.ipc.open_file(f, options=options), f
            except (pa.ArrowInvalid, pa.ArrowIOError) as e:
                raise IntegrityError(
                    f"{path}: cannot open the Arrow file ({e}); run `kdcache verify`"
                ) from e

    def _get(self, reader: pa.ipc.RecordBatchFileReader, fi: int, bi: int) -> pa.RecordBatch:
        try:
            return reader.get_batch(bi)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise IntegrityError(
                f"{self.part_dir}: cannot decode record batch {bi} of {self.blocks[fi]['name']}: {e}"
            ) from e

    def topk_arrays(self, chunk_entries: int) -> tuple:
        """One delayed read per record batch (``read_topk``), cut into row chunks."""
        import dask
        import dask.array as da

        k, dtypes = self.schema.k, self.schema.stored_dtypes()
        names = ("topk_ids", "topk_logprobs", "log_tail")
        pieces: tuple[list, list, list] = ([], [], [])
        for fi, bi, rows in self.batch_rows():
            arrays = dask.delayed(self.read_topk, nout=3, pure=True)(fi, bi)
            for out, arr, name, shape in zip(
                pieces, arrays, names, ((rows, k), (rows, k), (rows,))
            ):
                out.append(da.from_delayed(arr, shape=shape, dtype=dtypes[name]))
        if not pieces[0]:
            return tuple(
                da.zeros(shape, dtypes[n]) for n, shape in zip(names, ((0, k), (0, k), (0,)))
            )
        rows = max(1, chunk_entries // max(k, 1))  # a record batch may be larger: cut it
        return tuple(da.concatenate(p).rechunk({0: rows}) for p in pieces)

    def read(self, start: int, stop: int) -> Block:
        if stop <= start:
            return Block.empty(self.schema)
        first = int(np.searchsorted(self.batch_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.batch_starts, stop, side="left"))
        blocks = []
        for b in range(first, last):
            fi, bi = self.batch_index[b]
            lo = max(start, self.batch_starts[b]) - self.batch_starts[b]
            hi = min(stop, self.batch_starts[b + 1]) - self.batch_starts[b]
            try:
                batch = self._batch(fi, bi).slice(int(lo), int(hi - lo))
                blocks.append(batch_to_block(batch, self.schema.k))
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
                raise IntegrityError(
                    f"{self.part_dir}: cannot decode record batch {bi} of {self.blocks[fi]['name']}: {e}"
                ) from e
        return Block.concat(blocks, self.schema)


BACKEND = Backend(
    "arrow",
    ArrowWriter,
    ArrowReader,
    # 8,192 positions: a shuffled block of 64 short sequences decompresses about one batch
    defaults={"compression": "zstd", "batch_positions": 8192},
)

__all__ = ["BACKEND", "ArrowReader", "ArrowWriter", "arrow_schema"]

"""Checksums of stored files and ``verify``: recompute them and check the structure."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c as _crc32c

from kdcache.storage.errors import IntegrityError
from kdcache.storage.manifest import PART_RECORD, PROGRESS

_CHUNK = 1 << 22  # 4 MiB reads
TEMP_SUFFIXES = (".partial", ".tmp")  # zarr's and kdcache's files being written: never data
MASS_TOLERANCE = 0.02  # float16 log-probs round each probability by up to ~0.4%


def file_crc32c(path: Path) -> str:
    """crc32c of a whole file as 8 hex digits (hardware-accelerated; ~GB/s)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = _crc32c.crc32c(chunk, value)
    return f"{value:08x}"


def data_files(part_dir: Path) -> list[Path]:
    """Every file of a part but its records, in a stable order."""
    skip = {PART_RECORD, PROGRESS}
    return sorted(
        p
        for p in Path(part_dir).rglob("*")
        if p.is_file()
        and p.name not in skip
        and not p.name.startswith(".")
        and not p.name.endswith(TEMP_SUFFIXES)
    )


def file_table(part_dir: Path) -> dict[str, dict]:
    """{relative path: {"bytes": n, "crc32c": hex}} for every data file of a part."""
    part_dir = Path(part_dir)
    return {
        p.relative_to(part_dir).as_posix(): {"bytes": p.stat().st_size, "crc32c": file_crc32c(p)}
        for p in data_files(part_dir)
    }


class PartFiles:
    """A committed part's recorded file table, held against its folder while a reader uses it.

    Opening checks that every recorded file exists with its recorded size: zarr reads a missing
    chunk as fill values (it cannot tell a deleted chunk from one it never wrote), so without this
    a deleted shard would read as zeros. Every later access (``check``) compares the file's
    identity (inode, size, modification time) with what opening saw, so a reader whose part is
    deleted or replaced under it (``--replace``) stops instead of reading other data. A file the
    table does not record must not exist (``None``: a chunk the writer never wrote).
    One ``stat`` per file access; checksums are the backends' business.
    """

    def __init__(self, part_dir: Path, table: dict[str, dict]) -> None:
        self.dir = Path(part_dir)
        self.table = table
        self._seen: dict[str, tuple[int, int, int]] = {}
        for rel, want in table.items():
            st = self._stat(rel)
            if st.st_size != want["bytes"]:
                raise IntegrityError(
                    f"{self.dir / rel}: {st.st_size} bytes, part.json records {want['bytes']}; "
                    "the part is damaged: run `kdcache verify` and recapture the part"
                )
            self._seen[rel] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _stat(self, rel: str) -> os.stat_result:
        try:
            return os.stat(self.dir / rel)
        except FileNotFoundError:
            raise IntegrityError(
                f"{self.dir / rel}: missing, but part.json records it; the part was deleted, "
                "replaced or damaged: run `kdcache verify` and recapture the part"
            ) from None

    def check(self, rel: str) -> Path | None:
        """The path of ``rel`` if it is recorded and unchanged since the part was opened; None if
        it is not recorded and absent; IntegrityError otherwise."""
        path = self.dir / rel
        if rel not in self._seen:
            if path.exists():
                raise IntegrityError(
                    f"{path}: a file part.json does not record appeared while reading; the part "
                    "is being rewritten or is damaged: run `kdcache verify`"
                )
            return None
        st = self._stat(rel)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._seen[rel]:
            raise IntegrityError(
                f"{path}: changed while this reader had the part open (the cache was replaced or "
                "rewritten); reopen it, and run `kdcache verify`"
            )
        return path


def check_files(
    part_dir: Path, expected: dict[str, dict], *, where: str | None = None
) -> list[str]:
    """Problems found comparing a part's files against its recorded table (empty when intact).

    Each names the file (as ``where/relative path``; where defaults to part_dir) and what is
    wrong: missing, wrong size, checksum mismatch, or not recorded in part.json."""
    part_dir = Path(part_dir)
    where = str(part_dir) if where is None else where
    problems = []
    for rel, want in sorted(expected.items()):
        p = part_dir / rel
        if not p.is_file():
            problems.append(f"{where}/{rel}: missing file (part.json records it)")
            continue
        size = p.stat().st_size
        if size != want["bytes"]:
            problems.append(
                f"{where}/{rel}: wrong size: {size} bytes, part.json records {want['bytes']}"
            )
            continue
        got = file_crc32c(p)
        if got != want["crc32c"]:
            problems.append(
                f"{where}/{rel}: checksum mismatch: crc32c {got}, part.json records {want['crc32c']}"
            )
    extra = sorted(
        set(f.relative_to(part_dir).as_posix() for f in data_files(part_dir)) - set(expected)
    )
    problems += [f"{where}/{rel}: file not recorded in part.json" for rel in extra]
    return problems


def verify_cache(root: Path, *, decode: bool = True) -> list[str]:
    """Every problem found in a finalized cache (empty when intact), each naming the part and
    file and what is wrong.

    Checks: the manifest against the part records (``manifest_problems``: identity, counts,
    bytes, tokens hash, the part list); each record's structure; every file's size and crc32c
    against part.json; each array's shape against the part's counts; then (decode=True) every
    chunk decoded (zarr checks each chunk's crc32c) and the structure: offsets, counts, id
    ranges, target rows against the loss mask, each row's probabilities summing to 1, and the
    recomputed tokens_sha256. Raises (a KDCacheError) only when root is not a cache of a
    version this kdcache reads: then nothing can be verified.
    """
    from kdcache.storage.errors import KDCacheError
    from kdcache.storage.manifest import (
        MANIFEST,
        check_format,
        load_manifest,
        manifest_problems,
        parts_dir,
        read_json,
        record_problems,
    )
    from kdcache.storage.schema import CacheSchema

    root = Path(root)
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        if (root / MANIFEST).is_file():
            return [f"{MANIFEST}: damaged (not valid JSON); rerun `kdcache finalize {root}`"]
        load_manifest(root)  # raises: no such directory, not a cache, not finalized
    check_format(manifest, root / MANIFEST)
    try:
        schema = CacheSchema.from_dict(manifest["schema"])
    except (KeyError, TypeError, KDCacheError) as e:
        return [f"{MANIFEST}: its schema is damaged ({e})"]
    problems: list[str] = []
    records: dict[str, dict | None] = {}
    entries = manifest.get("parts") if isinstance(manifest.get("parts"), list) else []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue  # manifest_problems names a damaged parts list
        where = f"parts/{name}"
        part_dir = parts_dir(root) / name
        if not part_dir.is_dir():
            problems.append(f"{where}: missing part (listed in {MANIFEST})")
            continue
        record = read_json(part_dir / PART_RECORD)
        if record is None:
            what = "damaged (not valid JSON)" if (part_dir / PART_RECORD).exists() else "missing"
            problems.append(f"{where}/{PART_RECORD}: {what}; the part is not committed")
            continue
        try:
            check_format(record, part_dir / PART_RECORD)
        except KDCacheError as e:
            problems.append(f"{where}/{PART_RECORD}: {e}")
            continue
        if bad := record_problems(record):
            problems += [f"{where}/{PART_RECORD}: damaged: {b}" for b in bad]
            continue
        records[name] = record
    index_problems = manifest_problems(manifest, records)
    problems += index_problems
    mismatched = {p.split("/")[1] for p in index_problems if p.startswith("parts/")}
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in records or name in mismatched:
            continue
        where = f"parts/{name}"
        file_problems = check_files(parts_dir(root) / name, records[name]["files"], where=where)
        problems += file_problems
        if not file_problems:
            problems += _check_part(root, manifest, schema, i, where, decode)
    return problems


def _check_part(
    root: Path, manifest: dict, schema, index: int, where: str, decode: bool
) -> list[str]:
    """Structure of one part whose files match their checksums: shapes against counts, then
    (decode) every block decoded and checked."""
    import hashlib

    import numpy as np

    from kdcache.storage.base import get_backend
    from kdcache.storage.errors import KDCacheError
    from kdcache.storage.manifest import parts_dir, read_json
    from kdcache.storage.reader import DecodedPart
    from kdcache.storage.writer import _tokens_update

    problems: list[str] = []
    try:
        # Not CacheReader(root): it refuses a cache with a missing part, and verify goes on.
        name = manifest["parts"][index]["name"]
        part_dir = parts_dir(root) / name
        record = read_json(part_dir / PART_RECORD)  # checked by verify_cache
        stored = get_backend(manifest["backend"]).reader(part_dir, schema, record)
        reader = DecodedPart(stored, schema)
        problems += _check_shapes(reader.stored, schema, where)
        if problems or not decode:
            return problems
        seen = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
        h = hashlib.sha256()
        for start in range(0, reader.num_sequences, 1024):
            b = reader.read(start, min(start + 1024, reader.num_sequences))
            for off in ("seq_offsets", "row_offsets", "doc_offsets"):
                o = getattr(b, off)
                if o[0] != 0 or (np.diff(o) < 0).any():
                    problems.append(
                        f"{where}: {off} decrease near sequence {start} (offsets must not decrease)"
                    )
            for key, n in zip(
                seen, (b.num_sequences, b.num_positions, b.num_rows, len(b.doc_starts))
            ):
                seen[key] += n
            for ids_name in ("input_ids", "topk_ids"):
                ids = getattr(b, ids_name)
                if ids.size and int(ids.max()) >= schema.vocab_size:
                    problems.append(
                        f"{where}/{ids_name}: holds id {int(ids.max())} >= vocab_size "
                        f"{schema.vocab_size} near sequence {start}"
                    )
            if schema.targets_on == "mask" and b.num_positions:
                rows = np.add.reduceat(b.loss_mask.astype(np.int64), b.seq_offsets[:-1])
                rows[np.diff(b.seq_offsets) == 0] = 0
                if not np.array_equal(np.diff(b.row_offsets), rows):
                    problems.append(
                        f"{where}: target rows do not match the loss mask near sequence {start}"
                    )
            if b.num_rows:  # a row is a distribution: top-k mass + tail mass = 1
                with np.errstate(over="ignore", invalid="ignore"):
                    mass = np.exp(b.topk_logprobs.astype(np.float64)).sum(axis=1) + np.exp(
                        b.log_tail.astype(np.float64)
                    )
                bad = np.flatnonzero(~(np.abs(mass - 1) <= MASS_TOLERANCE))
                if bad.size:
                    problems.append(
                        f"{where}: {bad.size} target rows near sequence {start} hold "
                        f"probabilities that sum to {mass[bad[0]]:.4g}, not 1 (top-k plus tail)"
                    )
            _tokens_update(h, b)
    except KDCacheError as e:
        return problems + [f"{where}: {e}"]
    if seen != {k: int(v) for k, v in record["counts"].items()}:
        problems.append(f"{where}: decoded counts {seen} differ from part.json {record['counts']}")
    elif h.hexdigest() != record.get("tokens_sha256"):
        problems.append(f"{where}: tokens_sha256 of the decoded input ids differs from part.json")
    return problems


def _check_shapes(stored, schema, where: str) -> list[str]:
    """Zarr: every array's shape and dtype against part.json's counts and the schema.
    Arrow: the record batches' sequences are checked when the reader opens."""
    if stored.name != "zarr":
        return []
    from kdcache.storage.zarr_backend import _array_specs

    counts = stored.record["counts"]
    n = {
        "sequence": counts["sequences"],
        "position": counts["positions"],
        "row": counts["rows"],
        "doc": counts["docs"],
        "offset": counts["sequences"] + 1,
    }
    problems = []
    for name, (dtype, inner, axis) in _array_specs(schema).items():
        arr = stored.arrays[name]
        want = (n[axis], *inner)
        if tuple(arr.shape) != want:
            problems.append(
                f"{where}/{name}: wrong shape {tuple(arr.shape)}, part.json counts give {want}"
            )
        if arr.dtype != dtype:
            problems.append(f"{where}/{name}: dtype {arr.dtype}, the schema stores {dtype}")
    return problems

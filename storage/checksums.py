"""Checksums: of stored files (crc32c, each part's recorded file table) and of token ids.

file_crc32c(path)              crc32c of a whole file, 8 hex digits
file_table(part_dir)           {relative path: {bytes, crc32c}} of every data file
check_files(part_dir, table)   the differences, one line each (``kdcache verify``)
PartFiles(part_dir, table)     the table held against the folder while a reader reads it
update_tokens_sha256(h, block) the part record's tokens_sha256, independent of the backend
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import crc32c as _crc32c
import numpy as np

from kdcache.storage.errors import IntegrityError
from kdcache.storage.manifest import PART_RECORD, PROGRESS
from kdcache.storage.schema import Block

_CHUNK = 1 << 22  # 4 MiB reads
TEMP_SUFFIXES = (".partial", ".tmp")  # zarr's and kdcache's files being written: never data


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


def update_tokens_sha256(h: hashlib._Hash, block: Block) -> None:
    """Hash of the token ids, independent of backend, dtype and flush boundaries: per sequence
    its length as uint64 LE, then its ids as uint32 LE (docs/FORMAT.md)."""
    for j in range(block.num_sequences):
        ids = block.input_ids[block.seq_offsets[j] : block.seq_offsets[j + 1]]
        h.update(np.uint64(len(ids)).tobytes())
        h.update(ids.astype("<u4").tobytes())

"""Checksums of stored files and ``verify``: recompute them and check the structure."""

from __future__ import annotations

from pathlib import Path

import crc32c as _crc32c

from kdcache.storage.manifest import PART_RECORD, PROGRESS

_CHUNK = 1 << 22  # 4 MiB reads


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
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    )


def file_table(part_dir: Path) -> dict[str, dict]:
    """{relative path: {"bytes": n, "crc32c": hex}} for every data file of a part."""
    part_dir = Path(part_dir)
    return {
        p.relative_to(part_dir).as_posix(): {"bytes": p.stat().st_size, "crc32c": file_crc32c(p)}
        for p in data_files(part_dir)
    }


def check_files(part_dir: Path, expected: dict[str, dict]) -> list[str]:
    """Problems found comparing a part's files against its recorded table (empty when intact)."""
    part_dir = Path(part_dir)
    problems = []
    for rel, want in sorted(expected.items()):
        p = part_dir / rel
        if not p.exists():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{p}: {size} bytes, part.json records {want['bytes']}")
            continue
        got = file_crc32c(p)
        if got != want["crc32c"]:
            problems.append(f"{p}: crc32c {got}, part.json records {want['crc32c']}")
    extra = sorted(
        set(f.relative_to(part_dir).as_posix() for f in data_files(part_dir)) - set(expected)
    )
    problems += [f"{part_dir / rel}: not recorded in part.json" for rel in extra]
    return problems


def verify_cache(root: Path, *, decode: bool = True) -> list[str]:
    """Every problem found in a cache (empty when intact): files against their checksums,
    then (decode=True) every block decoded (zarr checks each chunk's crc32c) and its structure
    checked: offsets, counts, id ranges, target rows against the loss mask."""
    import numpy as np

    from kdcache.storage.errors import KDCacheError
    from kdcache.storage.reader import CacheReader

    cache = CacheReader(root)
    problems: list[str] = []
    for p, name in enumerate(cache.part_names):
        part_dir = Path(root) / "parts" / name
        record = cache.part(p).record
        file_problems = check_files(part_dir, record["files"])
        problems += file_problems
        if file_problems or not decode:
            continue
        seen = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
        try:
            reader = cache.part(p)
            for start in range(0, reader.num_sequences, 1024):
                b = reader.read(start, min(start + 1024, reader.num_sequences))
                for key, n in zip(
                    seen,
                    (b.num_sequences, b.num_positions, b.num_rows, len(b.doc_starts)),
                    strict=True,
                ):
                    seen[key] += n
                for ids_name in ("input_ids", "topk_ids"):
                    ids = getattr(b, ids_name)
                    if ids.size and int(ids.max()) >= cache.vocab_size:
                        problems.append(
                            f"{part_dir}: {ids_name} holds id {int(ids.max())} >= vocab_size {cache.vocab_size}"
                        )
                if cache.schema.targets_on == "mask":
                    rows = (
                        np.add.reduceat(b.loss_mask.astype(np.int64), b.seq_offsets[:-1])
                        if b.num_positions
                        else []
                    )
                    if not np.array_equal(np.diff(b.row_offsets), rows):
                        problems.append(
                            f"{part_dir}: target rows do not match the loss mask near sequence {start}"
                        )
        except KDCacheError as e:
            problems.append(str(e))
            continue
        if seen != {k: int(v) for k, v in record["counts"].items()}:
            problems.append(
                f"{part_dir}: decoded counts {seen} differ from part.json {record['counts']}"
            )
    return problems

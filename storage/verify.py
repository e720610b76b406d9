"""``kdcache verify``: every problem of a finalized cache, each naming the part, file and what.

    problems = verify_cache("CACHE")          # [] when intact
    problems = verify_cache("CACHE", decode=False)   # checksums and layout only

Checks, in order: the manifest against the part records (``manifest_problems``); each record's
structure; every file's size and crc32c against part.json; the backend's layout against the
part's counts (``BackendReader.layout_problems``); then (decode) every block decoded and checked:
offsets, counts, id ranges, target rows against the loss mask, each row a distribution, and the
recomputed tokens_sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from kdcache.storage.backends import get_backend
from kdcache.storage.checksums import check_files, update_tokens_sha256
from kdcache.storage.durable import read_json
from kdcache.storage.errors import KDCacheError
from kdcache.storage.manifest import (
    MANIFEST,
    PART_RECORD,
    check_format,
    load_manifest,
    manifest_problems,
    parts_dir,
    record_problems,
)
from kdcache.storage.reader import DecodedPart
from kdcache.storage.schema import Block, CacheSchema

MASS_TOLERANCE = 0.02  # float16 log-probs round each probability by up to ~0.4%
VERIFY_BLOCK = 1024  # sequences decoded at a time


def verify_cache(root: Path, *, decode: bool = True) -> list[str]:
    """Every problem found (empty when intact). Raises a KDCacheError only when root is not a
    cache of a version this kdcache reads: then nothing can be verified."""
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
    entries = manifest.get("parts") if isinstance(manifest.get("parts"), list) else []
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    names = [n for n in names if isinstance(n, str)]  # manifest_problems names a damaged list
    problems, records = _read_records(root, names)
    index_problems = manifest_problems(manifest, records)
    problems += index_problems
    mismatched = {p.split("/")[1] for p in index_problems if p.startswith("parts/")}
    for name in names:
        if name not in records or name in mismatched:
            continue
        where = f"parts/{name}"
        file_problems = check_files(parts_dir(root) / name, records[name]["files"], where=where)
        problems += file_problems
        if not file_problems:
            problems += _check_part(root, manifest["backend"], schema, records[name], where, decode)
    return problems


def _read_records(root: Path, names: list[str]) -> tuple[list[str], dict[str, dict]]:
    """(problems, the sound records by part name) of the listed parts."""
    problems: list[str] = []
    records: dict[str, dict] = {}
    for name in names:
        where, part_dir = f"parts/{name}", parts_dir(root) / name
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
    return problems, records


def _check_part(
    root: Path, backend: str, schema: CacheSchema, record: dict, where: str, decode: bool
) -> list[str]:
    """The layout of one part whose files match their checksums, then (decode) every block."""
    try:
        # Not CacheReader(root): it refuses a cache with a missing part, and verify goes on.
        part_dir = parts_dir(root) / record["name"]
        stored = get_backend(backend).reader(part_dir, schema, record)
        problems = stored.layout_problems(where)
        if problems or not decode:
            return problems
        return _check_blocks(DecodedPart(stored, schema), schema, record, where)
    except KDCacheError as e:
        return [f"{where}: {e}"]


def _check_blocks(part: DecodedPart, schema: CacheSchema, record: dict, where: str) -> list[str]:
    """Every block decoded: its structure, then the counts and tokens hash against part.json."""
    problems: list[str] = []
    seen = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
    h = hashlib.sha256()
    for start in range(0, part.num_sequences, VERIFY_BLOCK):
        b = part.read(start, min(start + VERIFY_BLOCK, part.num_sequences))
        problems += [f"{where}{p} near sequence {start}" for p in block_problems(b, schema)]
        for key, n in zip(seen, (b.num_sequences, b.num_positions, b.num_rows, len(b.doc_starts))):
            seen[key] += n
        update_tokens_sha256(h, b)
    if seen != {k: int(v) for k, v in record["counts"].items()}:
        problems.append(f"{where}: decoded counts {seen} differ from part.json {record['counts']}")
    elif h.hexdigest() != record.get("tokens_sha256"):
        problems.append(f"{where}: tokens_sha256 of the decoded input ids differs from part.json")
    return problems


def block_problems(b: Block, schema: CacheSchema) -> list[str]:
    """What is wrong inside one decoded block (each line starts with ``/array:`` or ``:``)."""
    problems = []
    for off in ("seq_offsets", "row_offsets", "doc_offsets"):
        o = getattr(b, off)
        if o[0] != 0 or (np.diff(o) < 0).any():
            problems.append(f": {off} decrease (offsets must not decrease)")
    for name in ("input_ids", "topk_ids"):
        ids = getattr(b, name)
        if ids.size and int(ids.max()) >= schema.vocab_size:
            problems.append(f"/{name}: holds id {int(ids.max())} >= vocab_size {schema.vocab_size}")
    if schema.targets_on == "mask" and b.num_positions:
        rows = np.add.reduceat(b.loss_mask.astype(np.int64), b.seq_offsets[:-1])
        rows[np.diff(b.seq_offsets) == 0] = 0
        if not np.array_equal(np.diff(b.row_offsets), rows):
            problems.append(": target rows do not match the loss mask")
    if b.num_rows:  # a row is a distribution: top-k mass + tail mass = 1
        with np.errstate(over="ignore", invalid="ignore"):
            lp, tail = b.topk_logprobs.astype(np.float64), b.log_tail.astype(np.float64)
            mass = np.exp(lp).sum(axis=1) + np.exp(tail)
        bad = np.flatnonzero(~(np.abs(mass - 1) <= MASS_TOLERANCE))
        if bad.size:
            problems.append(
                f": {bad.size} target rows hold probabilities that sum to {mass[bad[0]]:.4g}, "
                "not 1 (top-k plus tail)"
            )
    return problems

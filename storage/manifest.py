"""Part records, the cache-level manifest, and the finalize step that builds one from the other.

A cache directory::

    CACHE/
      manifest.json              # cache-level index, built by finalize from the part records
      parts/part-00000/
        part.json                # commit record: written last, after fsync of the part's data
        progress.json            # while writing: what has been flushed (resume point)
        ...                      # the backend's files (docs/FORMAT.md)

No step depends on a rename: a part counts as committed when its part.json parses and names
this format; a torn part.json (killed mid-write) does not parse and the part is not committed.
Many jobs never rewrite one shared file: each writes only its own part; finalize (run once,
after all of them) writes manifest.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kdcache.storage.errors import (
    CacheMismatchError,
    FormatVersionError,
    IntegrityError,
    KDCacheError,
    MissingPartError,
    NotACacheError,
    NotFinalizedError,
)
from kdcache.storage.schema import FORMAT_NAME, FORMAT_VERSION, CacheSchema

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
PART_RECORD = "part.json"
PROGRESS = "progress.json"


def kdcache_version() -> str:
    try:
        return metadata.version("kdcache")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so a new directory entry is durable too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durable(path: Path, obj: Any) -> None:
    """Write JSON and fsync it and its directory.

    Written under a temporary name and renamed where the file system has renames (so a kill
    never leaves a torn file there); correctness does not depend on it: readers treat a torn
    file as absent.
    """
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_json(path: Path) -> dict | None:
    """The parsed object, or None if the file is missing or torn (not valid JSON)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def check_format(obj: dict, where: Path) -> None:
    """Refuse a record of another format or of a version this kdcache does not know."""
    if obj.get("format") != FORMAT_NAME:
        raise NotACacheError(
            f"{where}: expected a {FORMAT_NAME!r} record, found format={obj.get('format')!r}"
        )
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: cache format version {version!r}; this kdcache ({kdcache_version()}) reads version "
            f"{FORMAT_VERSION}; upgrade kdcache (or convert the cache with the kdcache that wrote it)"
        )


def identity_diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two identity dicts, with both values."""
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: cache has {_short(b)}, this run has {_short(a)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


IDENTITY_KEYS = ("backend", "schema", "fingerprints", "settings", "num_shards")


def identity_of(record: dict) -> dict:
    """The identity fields of a part record or manifest, with the schema in its current form:
    fields added since the record was written compare as their defaults, so older parts still
    match newer ones (resume, finalize, verify)."""
    found = {k: record.get(k) for k in IDENTITY_KEYS}
    if isinstance(found["schema"], dict):
        try:
            found["schema"] = CacheSchema.from_dict(found["schema"]).to_dict()
        except KDCacheError:
            pass  # a schema this kdcache cannot read: reported as a difference
    return found


@dataclass(frozen=True)
class CacheIdentity:
    """What must be equal for parts to belong to one cache (and for a rerun to resume).

    fingerprints: teacher / tokenizer / data (sources + settings, known before teacher work).
    settings: the resolved capture settings that change the stored values (k, seq_len, ...).
    """

    backend: str
    schema: CacheSchema
    fingerprints: dict
    settings: dict
    num_shards: int = 1

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "schema": self.schema.to_dict(),
            "fingerprints": self.fingerprints,
            "settings": self.settings,
            "num_shards": self.num_shards,
        }

    def check_matches(self, found: dict, where: Path) -> None:
        diffs = identity_diff(self.to_dict(), identity_of(found))
        if diffs:
            raise CacheMismatchError(
                f"{where} holds a cache made with other settings ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}); pass --replace to start it over, or choose another --out"
            )


def parts_dir(root: Path) -> Path:
    return Path(root) / PARTS_DIR


def committed_records(root: Path) -> dict[str, dict]:
    """Every committed part record under root, by part name (format-checked)."""
    out = {}
    pdir = parts_dir(root)
    if not pdir.is_dir():
        return out
    for d in sorted(pdir.iterdir()):
        rec = read_json(d / PART_RECORD)
        if rec is not None:
            check_format(rec, d / PART_RECORD)
            out[d.name] = rec
    return out


def in_progress_parts(root: Path) -> list[str]:
    pdir = parts_dir(root)
    if not pdir.is_dir():
        return []
    return [d.name for d in sorted(pdir.iterdir()) if d.is_dir() and not (d / PART_RECORD).exists()]


def finalize(root: Path) -> dict:
    """Build manifest.json from the committed part records; refuse if any part is missing.

    Returns the manifest. Idempotent: running it again rewrites the same content (but the
    creation time). Names the missing shards (and the ones still in progress) otherwise.
    """
    root = Path(root)
    records = committed_records(root)
    if not records:
        if (root / MANIFEST).exists():
            raise NotACacheError(
                f"{root}: manifest.json exists but no part is committed; the cache is damaged"
            )
        raise NotACacheError(
            f"{root}: no committed part found (expected {PARTS_DIR}/part-NNNNN/{PART_RECORD}); "
            "run `kdcache cache` first"
        )
    first_name, first = next(iter(records.items()))
    for name, rec in records.items():
        diffs = identity_diff(identity_of(first), identity_of(rec))
        if diffs:
            raise CacheMismatchError(
                f"{root}: parts {first_name} and {name} were made with different settings ({'; '.join(diffs[:3])}); "
                f"delete one of them and recapture it"
            )
    num_shards = int(first["num_shards"])
    expected = [part_name(i) for i in range(num_shards)]
    missing = [n for n in expected if n not in records]
    if missing:
        running = set(in_progress_parts(root))
        detail = ", ".join(
            f"{n} ({'in progress' if n in running else 'not started'})" for n in missing[:10]
        )
        raise MissingPartError(
            f"{root}: {len(missing)} of {num_shards} parts not committed yet: {detail}"
            f"{', ...' if len(missing) > 10 else ''}; run the missing shards (kdcache cache --shard-index I), "
            "then `kdcache finalize` again"
        )
    extra = sorted(set(records) - set(expected))
    if extra:
        raise CacheMismatchError(
            f"{root}: parts {extra} lie outside num_shards={num_shards}; delete them"
        )
    parts = []
    totals = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
    for name in expected:
        rec = records[name]
        parts.append(
            {
                "name": name,
                "counts": rec["counts"],
                "bytes": rec["bytes"],
                "tokens_sha256": rec["tokens_sha256"],
                "created": rec["created"],
                **({"codec_error": rec["codec_error"]} if "codec_error" in rec else {}),
            }
        )
        for key in totals:
            totals[key] += int(rec["counts"][key])
    manifest_bytes = sum(p["bytes"] for p in parts)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": "manifest",
        **{k: first[k] for k in IDENTITY_KEYS},
        "config": first.get("config", {}),
        "backend_options": first.get("backend_options", {}),
        "parts": parts,
        "totals": totals,
        "bytes_on_disk": manifest_bytes,
        "kdcache_version": kdcache_version(),
        "created": now_iso(),
    }
    write_json_durable(root / MANIFEST, manifest)
    return manifest


def load_manifest(root: Path) -> dict:
    """The manifest of a finalized cache, or a clear error saying what the path holds instead."""
    root = Path(root)
    if not root.exists():
        raise NotACacheError(
            f"{root}: no such directory; expected a kdcache cache (made by `kdcache cache`)"
        )
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        if (root / MANIFEST).exists():
            raise NotACacheError(
                f"{root}/{MANIFEST} is damaged (not valid JSON); rerun `kdcache finalize {root}`"
            )
        if committed_records(root):
            raise NotFinalizedError(
                f"{root}: parts are committed but the cache is not finalized; run `kdcache finalize {root}`"
            )
        raise NotACacheError(f"{root}: not a kdcache cache (no {MANIFEST} and no committed part)")
    check_format(manifest, root / MANIFEST)
    for p in manifest["parts"]:
        record = parts_dir(root) / p["name"] / PART_RECORD
        if read_json(record) is None and record.exists():
            raise IntegrityError(
                f"{record} is damaged (not valid JSON); recapture part {p['name']}"
            )
        if read_json(record) is None:
            raise MissingPartError(
                f"{root}: part {p['name']} is listed in the manifest but missing on disk; "
                f"restore it, or recapture it (kdcache cache ... --shard-index {int(p['name'].split('-')[1])})"
            )
    return manifest

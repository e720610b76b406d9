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
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kdcache.storage.durable import read_json, write_json_durable
from kdcache.storage.errors import (
    CacheMismatchError,
    FormatVersionError,
    IntegrityError,
    KDCacheError,
    MissingPartError,
    NotACacheError,
    NotFinalizedError,
)
from kdcache.storage.lease import Lease, live_lease
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
        if diffs == [d for d in diffs if d.startswith("num_shards:")] and diffs:
            raise CacheMismatchError(
                f"{where} holds a cache of {found.get('num_shards')} parts, this run has "
                f"{self.num_shards}; leave out --num-shards (or pass --num-shards "
                f"{found.get('num_shards')}) to resume it, or pass --replace to start it over"
            )
        if diffs:
            raise CacheMismatchError(
                f"{where} holds a cache made with other settings ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}); pass --replace to start it over, or choose another --out"
            )


def parts_dir(root: Path) -> Path:
    return Path(root) / PARTS_DIR


def committed_records(root: Path) -> dict[str, dict]:
    """Every committed part record under root, by part name (format- and structure-checked)."""
    out = {}
    pdir = parts_dir(root)
    if not pdir.is_dir():
        return out
    for d in sorted(pdir.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        rec = read_part_record(d / PART_RECORD)
        if rec is not None:
            out[d.name] = rec
    return out


COUNT_KEYS = ("sequences", "positions", "rows", "docs")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def record_problems(record: dict) -> list[str]:
    """What is missing or ill-typed in a committed part record (empty when it is sound): the
    fields every reader relies on, so that an edited or damaged part.json is refused with one
    line instead of a KeyError deep inside a read."""
    p = []
    for key, kind in (
        ("name", str),
        ("backend", str),
        ("schema", dict),
        ("fingerprints", dict),
        ("settings", dict),
        ("counts", dict),
        ("files", dict),
        ("backend_state", dict),
        ("tokens_sha256", str),
    ):
        if not isinstance(record.get(key), kind):
            p.append(f"{key}: expected a {kind.__name__}, found {_short(record.get(key))}")
    for key in ("num_shards", "bytes", "shard_index"):
        if not _is_count(record.get(key)):
            p.append(f"{key}: expected a whole number >= 0, found {_short(record.get(key))}")
    counts = record.get("counts")
    if isinstance(counts, dict) and not all(_is_count(counts.get(k)) for k in COUNT_KEYS):
        p.append(f"counts: expected whole numbers {list(COUNT_KEYS)}, found {_short(counts)}")
    files = record.get("files")
    if isinstance(files, dict):
        bad = [
            rel
            for rel, f in files.items()
            if not (
                isinstance(f, dict)
                and _is_count(f.get("bytes"))
                and isinstance(f.get("crc32c"), str)
                and len(f["crc32c"]) == 8
            )
        ]
        if bad:
            p.append(f"files: entries without a size and an 8-digit crc32c: {bad[:3]}")
        elif _is_count(record.get("bytes")) and record["bytes"] != sum(
            f["bytes"] for f in files.values()
        ):
            p.append(
                f"bytes: {record['bytes']} differs from the sum of its files' sizes "
                f"{sum(f['bytes'] for f in files.values())}"
            )
    if not p:
        try:
            CacheSchema.from_dict(record["schema"])
        except KDCacheError as e:
            p.append(f"schema: {e}")
        except TypeError as e:
            p.append(f"schema: {e}")
    return p


def read_part_record(path: Path) -> dict | None:
    """A committed part record (None when absent or torn: the part is not committed), refused
    when it is of another format or version, or its structure is damaged."""
    record = read_json(path)
    if record is None:
        return None
    check_format(record, path)
    problems = record_problems(record)
    if problems:
        raise IntegrityError(
            f"{path} is damaged ({'; '.join(problems[:3])}); run `kdcache verify` and recapture the part"
        )
    return record


def manifest_problems(manifest: dict, records: dict[str, dict | None]) -> list[str]:
    """Where a manifest disagrees with itself or with the part records it lists (records: by
    part name, None for a part that is missing or not committed). Each problem names the file
    (``manifest.json`` or ``parts/NAME/part.json``); empty when the cache's index can be trusted.
    The reader refuses a cache with any of these; ``kdcache verify`` lists them all."""
    p = []
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("counts"), dict)
        for e in parts
    ):
        return [f"{MANIFEST}: its parts list is damaged (expected name and counts per part)"]
    if not _is_count(manifest.get("num_shards")):
        return [f"{MANIFEST}: num_shards {_short(manifest.get('num_shards'))} is not a number"]
    listed = [e["name"] for e in parts]
    expected = [part_name(i) for i in range(int(manifest["num_shards"]))]
    if listed != expected:
        p.append(
            f"{MANIFEST}: lists parts {_names(listed)}, num_shards={manifest['num_shards']} "
            f"expects {_names(expected)}"
        )
    try:
        totals = {k: sum(int(e["counts"][k]) for e in parts) for k in COUNT_KEYS}
    except (KeyError, TypeError, ValueError):
        return p + [f"{MANIFEST}: a part's counts are damaged"]
    if totals != manifest.get("totals"):
        p.append(f"{MANIFEST}: totals {manifest.get('totals')}, its parts sum to {totals}")
    try:
        if sum(int(e["bytes"]) for e in parts) != manifest.get("bytes_on_disk"):
            p.append(f"{MANIFEST}: bytes_on_disk differs from the sum of its parts' bytes")
    except (KeyError, TypeError, ValueError):
        p.append(f"{MANIFEST}: a part's bytes are damaged")
    for entry in parts:
        record = records.get(entry["name"])
        if record is None:
            continue  # the caller names a missing part in its own words
        diffs = identity_diff(identity_of(manifest), identity_of(record))
        for key in ("counts", "bytes", "tokens_sha256"):
            if record.get(key) != entry.get(key):
                diffs.append(
                    f"{key}: part.json has {record.get(key)}, manifest has {entry.get(key)}"
                )
        if record.get("name") != entry["name"]:
            diffs.append(f"name: part.json has {record.get('name')!r}")
        if diffs:
            p.append(
                f"{PARTS_DIR}/{entry['name']}/{PART_RECORD}: does not match {MANIFEST} "
                f"({'; '.join(diffs[:4])}); rerun `kdcache finalize` if the part is right"
            )
    found = [records.get(e["name"]) for e in parts]
    if "content_sha256" in manifest and found and None not in found and not p:
        if manifest["content_sha256"] != content_digest(found[0], found):
            p.append(f"{MANIFEST}: content_sha256 differs from its parts' records")
    return p


def _names(names: list[str]) -> str:
    return f"[{names[0]} .. {names[-1]}] ({len(names)})" if len(names) > 3 else str(names)


def recorded_num_shards(root: Path) -> int | None:
    """The number of parts the cache at root was made with: from its manifest, a part record or
    a part in progress; None for a folder that holds none of them (a new cache)."""
    root = Path(root)
    candidates = [root / MANIFEST]
    if parts_dir(root).is_dir():
        for d in sorted(parts_dir(root).iterdir()):
            candidates += [d / PART_RECORD, d / PROGRESS]
    for path in candidates:
        record = read_json(path)
        if record is not None and _is_count(record.get("num_shards")) and record["num_shards"]:
            return int(record["num_shards"])
    return None


def missing_parts(root: Path, records: dict[str, dict], num_shards: int) -> str | None:
    """What is missing before a cache of ``num_shards`` parts can be finalized, in one line (None
    when every part is committed): each missing part in progress (its live writer named),
    interrupted (its writer is gone: rerun that shard) or not started."""
    missing = [i for i in range(num_shards) if part_name(i) not in records]
    if not missing:
        return None

    def state(i: int) -> str:
        d = parts_dir(root) / part_name(i)
        if not d.is_dir():
            return "not started"
        lease = live_lease(d)
        if lease is not None:
            return f"in progress: {Lease.describe(lease)}"
        return f"interrupted: rerun shard {i}"

    detail = ", ".join(f"{part_name(i)} ({state(i)})" for i in missing[:10])
    return (
        f"{root}: {len(missing)} of {num_shards} parts not committed yet: {detail}"
        f"{', ...' if len(missing) > 10 else ''}; run the missing shards (kdcache cache "
        "--shard-index I, or sbatch --array=I), then `kdcache finalize` again"
    )


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
    if problem := missing_parts(root, records, num_shards):
        raise MissingPartError(problem)
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
        "content_sha256": content_digest(first, [records[n] for n in expected]),
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


def content_digest(first: dict, records: list[dict]) -> str:
    """sha256 of what the cache holds, and nothing of when or how fast it was written: the
    identity (schema, fingerprints, settings, backend, parts) and each part's counts, token
    hash and file table (sizes and crc32c of every data file). A bit-identical recapture has
    the same digest, though its records' timestamps and timings differ (DVC stages depend on
    it, not on the folder)."""
    payload = {
        "identity": identity_of(first),
        "parts": [
            {k: rec[k] for k in ("name", "counts", "tokens_sha256", "files")} for rec in records
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_manifest(root: Path) -> dict:
    """The manifest of a finalized cache (format-checked), or a clear error saying what the
    path holds instead. Readers use ``open_index``, which also checks it against the parts."""
    root = Path(root)
    if not root.exists():
        raise NotACacheError(
            f"{root}: no such directory; expected a kdcache cache (made by `kdcache cache`)"
        )
    if not root.is_dir():
        raise NotACacheError(f"{root} is a file; expected a kdcache cache directory")
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        if (root / MANIFEST).exists():
            raise NotACacheError(
                f"{root}/{MANIFEST} is damaged (not valid JSON); rerun `kdcache finalize {root}`"
            )
        records = committed_records(root)
        if records:
            num_shards = int(next(iter(records.values()))["num_shards"])
            if problem := missing_parts(root, records, num_shards):
                raise MissingPartError(problem)
            raise NotFinalizedError(
                f"{root}: parts are committed but the cache is not finalized; run `kdcache finalize {root}`"
            )
        raise NotACacheError(f"{root}: not a kdcache cache (no {MANIFEST} and no committed part)")
    check_format(manifest, root / MANIFEST)
    return manifest


def open_index(root: Path) -> tuple[dict, list[dict]]:
    """The manifest of a finalized cache and the record of every part it lists, in order,
    checked against each other (``manifest_problems``): an edited or stale manifest is refused
    before its counts or k are used. Cheap: a JSON file per part."""
    root = Path(root)
    manifest = load_manifest(root)
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in parts
    ):
        raise IntegrityError(
            f"{root}/{MANIFEST}: its parts list is damaged; rerun `kdcache finalize {root}`"
        )
    records: dict[str, dict | None] = {}
    for entry in parts:
        name = entry["name"]
        path = parts_dir(root) / name / PART_RECORD
        record = read_part_record(path)
        if record is None and path.exists():
            raise IntegrityError(f"{path} is damaged (not valid JSON); recapture part {name}")
        if record is None:
            index = name.rsplit("-", 1)[-1]
            raise MissingPartError(
                f"{root}: part {name} is listed in the manifest but missing on disk; "
                f"restore it, or recapture it (kdcache cache ... --shard-index {int(index) if index.isdigit() else 'I'})"
            )
        records[name] = record
    problems = manifest_problems(manifest, records)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(
            f"{root}: the manifest does not match the parts: {problems[0]}{more}; "
            f"run `kdcache verify {root}`"
        )
    return manifest, [records[e["name"]] for e in parts]

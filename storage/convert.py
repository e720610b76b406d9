"""Rewrite a cache with another backend or codec, part by part (same identity otherwise)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kdcache.storage.errors import ConfigError
from kdcache.storage.manifest import CacheIdentity, finalize
from kdcache.storage.paths import is_within
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import CacheSchema
from kdcache.storage.writer import PartWriter


def convert_cache(
    src: Path,
    dst: Path,
    backend: str,
    *,
    codec: str | None = None,
    block_sequences: int = 256,
    replace_out: bool = False,
) -> dict:
    """Copy every sequence of src into a new cache at dst stored with ``backend`` (and ``codec``,
    default: the source's).

    Parts keep their names and shard indices; with the same codec the result reads back
    bit-identical; another codec re-encodes (its error against the source is recorded).
    Returns the new manifest. Each written part must hash to its source part's tokens_sha256
    and counts before it is committed.
    """
    if is_within(dst, src) or is_within(src, dst):
        raise ConfigError(
            f"convert {src} into {dst}: expected an output outside the source cache (and not "
            "containing it), found them nested; converting reads the source while writing the "
            "output, so write to a new folder, then move it"
        )
    cache = CacheReader(src)
    m = cache.manifest
    identity = CacheIdentity(
        backend=backend,
        schema=replace(CacheSchema.from_dict(m["schema"]), **({"codec": codec} if codec else {})),
        fingerprints=m["fingerprints"],
        settings=m["settings"],
        num_shards=m["num_shards"],
    )
    for p, name in enumerate(cache.part_names):
        record = cache.part(p).record
        writer = PartWriter.open(
            dst,
            identity,
            replace=replace_out,
            shard_index=int(record["shard_index"]),
            config=record.get("config", {}),
        )
        if writer.committed:
            continue
        reader = cache.part(p)
        for start in range(writer.resume_sequences, reader.num_sequences, block_sequences):
            writer.add_block(reader.read(start, min(start + block_sequences, reader.num_sequences)))
        writer.commit(
            {"converted_from": {"backend": m["backend"], "path": str(src), "part": name}},
            expect={"counts": record["counts"], "tokens_sha256": record["tokens_sha256"]},
        )
    return finalize(dst)

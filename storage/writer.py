"""Writing one part of a cache: buffer sequences, flush durable blocks, resume, commit.

    writer = PartWriter.open(root, identity, shard_index=0)
    if not writer.committed:
        for seq in sequences[writer.resume_sequences:]:   # skip what is already durable
            writer.add(seq)                                # flushes every flush_positions
        writer.commit()
    finalize(root)

After every flush the part's ``progress.json`` records what is durable; a rerun (same identity)
continues from there, so at most one flush interval of work is repeated and the result is
bit-identical to an uninterrupted run. ``part.json`` is written last, after fsync of the data.

One writer per part: the writer holds the part's lease (kdcache.storage.lease) from before it
touches the folder until its commit, renewed by a heartbeat and at each flush; a second writer
is refused while the lease is live. An OSError while writing (disk full) stops the writer with
a one-line ``WriteFailedError``; what was flushed before stays durable and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdcache.storage.backends import get_backend
from kdcache.storage.checksums import file_table, update_tokens_sha256
from kdcache.storage.codecs import get_codec, reconstruction_kl
from kdcache.storage.durable import read_json, write_json_durable
from kdcache.storage.errors import CacheMismatchError, IntegrityError, WriteFailedError
from kdcache.storage.lease import DEFAULT_LEASE_SECONDS, Lease, lease_name, remove_leases
from kdcache.storage.manifest import (
    MANIFEST,
    PART_RECORD,
    PARTS_DIR,
    PROGRESS,
    CacheIdentity,
    kdcache_version,
    now_iso,
    part_name,
    parts_dir,
)
from kdcache.storage.schema import FORMAT_NAME, FORMAT_VERSION, Block, Sequence

log = logging.getLogger(__name__)

DEFAULT_FLUSH_POSITIONS = 65536  # positions per durable flush: the most work a crash can cost


class KLHistogram:
    """Reconstruction KL of every row, as a log-spaced histogram (mean exact, p99 to 1/20 decade)."""

    BINS = np.linspace(-12, 2, 281)  # log10(KL) bin edges

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.counts = np.array(
            state.get("counts", np.zeros(len(self.BINS) + 1, np.int64)), np.int64
        )
        self.total, self.n, self.max = (
            state.get("total", 0.0),
            state.get("n", 0),
            state.get("max", 0.0),
        )

    def add(self, kl: np.ndarray) -> None:
        kl = np.maximum(kl, 0.0)
        self.counts += np.bincount(
            np.searchsorted(self.BINS, np.log10(kl + 1e-300)), minlength=len(self.counts)
        )
        self.total += float(kl.sum())
        self.n += int(kl.size)
        self.max = max(self.max, float(kl.max(initial=0.0)))

    def state(self) -> dict:
        return {"counts": self.counts.tolist(), "total": self.total, "n": self.n, "max": self.max}

    def summary(self) -> dict:
        if self.n == 0:
            return {"rows": 0, "kl_mean": 0.0, "kl_p99": 0.0, "kl_max": 0.0}
        i = int(np.searchsorted(np.cumsum(self.counts), 0.99 * self.n))
        p99 = (
            10 ** self.BINS[min(i, len(self.BINS) - 1)]
        )  # upper edge of the bin holding the 99th percentile
        return {
            "rows": self.n,
            "kl_mean": self.total / self.n,
            "kl_p99": float(min(p99, self.max)),
            "kl_max": self.max,
        }


CACHE_ENTRIES = {MANIFEST, PARTS_DIR, "config.json"}  # what a cache folder holds (dot-files aside)


def prepare_output(root: Path, identity: CacheIdentity, *, replace: bool) -> None:
    """Refuse (or with replace, clear) whatever at root was made with another identity.

    Replacing never races a writer: each stale part's lease is taken first (a live writer's
    refuses with its owner named, and nothing is deleted), the manifest goes before any part (new
    readers refuse at once), and each part's record before its data (it is uncommitted before a
    byte of it disappears; a reader that has it open stops at its next read)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CacheMismatchError(
            f"{root} exists and is a file; expected a cache directory: choose another --out"
        )
    if not root.exists():
        return
    # Dot-files are not data (FORMAT.md): .DS_Store, .gitignore, finalize's temp files.
    entries = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    if entries - CACHE_ENTRIES:
        raise CacheMismatchError(
            f"{root} exists and is not a kdcache cache (found {sorted(entries - CACHE_ENTRIES)[:5]}); "
            "choose an empty or new --out directory"
        )
    manifest = read_json(root / MANIFEST)
    stale_manifest = False
    if manifest is not None:
        try:
            identity.check_matches(manifest, root)
        except CacheMismatchError:
            if not replace:
                raise
            stale_manifest = True
    stale = []
    pdir = parts_dir(root)
    for d in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        rec = read_json(d / PART_RECORD) or read_json(d / PROGRESS)
        if rec is None:
            continue
        try:
            identity.check_matches(rec, d)
        except CacheMismatchError:
            if not replace:
                raise
            stale.append(d)
    if not stale and not stale_manifest:
        return
    leases: list[Lease] = []
    try:
        for d in stale:  # all or nothing: refuse before deleting anything
            leases.append(Lease(d).acquire())
        if (root / MANIFEST).exists():  # it names parts that are about to go
            log.warning("replacing %s: it was made with other settings", root / MANIFEST)
            (root / MANIFEST).unlink()
        for d, lease in zip(stale, leases, strict=True):
            log.warning("replacing %s: it was made with other settings", d)
            _delete_part(d, lease)
    finally:
        for lease in leases:
            lease.release()


def _delete_part(d: Path, lease: Lease) -> None:
    """Delete a part whose lease this process holds: its record first, the lease last."""
    (d / PART_RECORD).unlink(missing_ok=True)
    (d / PROGRESS).unlink(missing_ok=True)
    own = lease_name(lease.generation)
    for p in d.iterdir():
        if p.name != own:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    lease.release()
    try:
        d.rmdir()
    except OSError:
        pass  # a new writer's lease file arrived after ours went: the folder is its now


def part_committed(part_dir: Path) -> bool:
    """Whether the part is committed (its part.json parses); a committed part's leftover lease
    files (a writer killed between its commit and its release) are removed."""
    if read_json(Path(part_dir) / PART_RECORD) is None:
        return False
    remove_leases(part_dir)
    return True


class PartWriter:
    """Writes part ``part-{shard_index:05d}`` of the cache at root. One writer per part."""

    def __init__(
        self,
        root: Path,
        identity: CacheIdentity,
        *,
        shard_index: int = 0,
        backend_options: dict | None = None,
        config: dict | None = None,
        flush_positions: int = DEFAULT_FLUSH_POSITIONS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        lease_wait: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.identity = identity
        self.shard_index = shard_index
        self.name = part_name(shard_index)
        self.dir = parts_dir(self.root) / self.name
        self.backend = get_backend(identity.backend)
        self.backend_options = self.backend.options(backend_options)
        self.config = config or {}
        self.flush_positions = flush_positions
        self.schema = identity.schema
        self._buffer: list[Sequence] = []
        self._buffered_positions = 0
        self._hash = hashlib.sha256()
        self.counts = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
        self.codec = get_codec(self.schema.codec)
        self.codec_error = KLHistogram()
        self._writer = None
        self.committed = False
        self.lease: Lease | None = None
        if part_committed(self.dir):
            self.committed = True
            return
        # The lease first: nothing in the folder is touched while another writer is live.
        self.lease = Lease(self.dir, duration=lease_seconds).acquire(wait=lease_wait)
        try:
            self.committed = self._is_committed()  # finished while we waited for the lease
            if self.committed:
                self.release()
                return
            self._open()
        except BaseException:
            self.release()
            raise
        self.lease.start_heartbeat()

    def _is_committed(self) -> bool:
        return read_json(self.dir / PART_RECORD) is not None

    def _open(self) -> None:
        progress = read_json(self.dir / PROGRESS)
        if progress is not None:
            try:
                self._resume(progress)
                return
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                # KDCacheError and zarr's errors are ValueErrors: the durable data is gone or
                # damaged, so the resume point cannot be trusted; the part is not committed.
                log.warning(
                    "%s: the interrupted run's data cannot be resumed (%s); starting the part over",
                    self.name,
                    str(e).splitlines()[0] if str(e) else type(e).__name__,
                )
                self._writer, self._hash = None, hashlib.sha256()
                self.counts = {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
                self.codec_error = KLHistogram()
        # Nothing durable to keep (killed before its first flush, or damaged): empty the folder.
        for p in self.dir.iterdir():
            if not p.name.startswith(".lease"):  # leases, and files of writers taking one
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self._writer = self.backend.writer(self.dir, self.schema, self.backend_options, None)

    def _resume(self, progress: dict) -> None:
        state = progress["backend_state"]
        self.counts = {k: int(progress["counts"][k]) for k in self.counts}
        self._writer = self.backend.writer(self.dir, self.schema, self.backend_options, state)
        self.codec_error = KLHistogram(progress.get("codec_error"))
        self._rehash_durable(state)
        log.info("%s: resuming after %d durable sequences", self.name, self.counts["sequences"])

    @classmethod
    def open(
        cls, root: Path, identity: CacheIdentity, *, replace: bool = False, **kwargs
    ) -> PartWriter:
        prepare_output(Path(root), identity, replace=replace)
        return cls(root, identity, **kwargs)

    @property
    def resume_sequences(self) -> int:
        """Sequences already durable in this part: the caller continues after them."""
        return self.counts["sequences"]

    def _rehash_durable(self, state: dict) -> None:
        record = self._record(state, file_table(self.dir))
        reader = self.backend.reader(self.dir, self.schema, record)
        step = 4096
        for start in range(0, self.counts["sequences"], step):
            update_tokens_sha256(
                self._hash, reader.read(start, min(start + step, self.counts["sequences"]))
            )

    def add(self, seqs: Sequence | list[Sequence]) -> None:
        """Buffer one sequence or a batch; flush once flush_positions are buffered.

        A batch is never split by a flush, so a resume point is always a batch boundary and a
        rerun batches exactly as the uninterrupted run did."""
        for seq in [seqs] if isinstance(seqs, Sequence) else seqs:
            self._buffer.append(seq)
            self._buffered_positions += len(seq.input_ids)
        if self._buffered_positions >= self.flush_positions:
            self.flush()

    def add_block(self, block: Block) -> None:
        """Append a whole block durably (flushing what is buffered first)."""
        self.flush()
        self._append(block)

    def flush(self) -> None:
        """Make every buffered sequence durable and record the resume point."""
        if not self._buffer:
            return
        block = Block.from_sequences(self._buffer, self.schema)
        self._buffer, self._buffered_positions = [], 0
        self._append(block)

    def _append(self, block: Block) -> None:
        if block.num_sequences == 0:
            return
        stored = self.codec.encode(block, self.schema)
        if self.codec.name != "plain":  # measure what the codec loses, row by row
            if self.codec.lossless:
                kl = np.zeros(block.num_rows)
            else:
                kl = reconstruction_kl(block, self.codec.decode(stored, self.schema))
            self.codec_error.add(kl)
        counts = dict(self.counts)
        c = block.counts()
        for key, axis in (
            ("sequences", "sequence"),
            ("positions", "position"),
            ("rows", "row"),
            ("docs", "doc"),
        ):
            counts[key] += c[axis]
        self.lease.check()  # never write next to a writer that took the part over
        self._io(lambda: self._writer.append(stored))
        self._io(
            lambda: write_json_durable(
                self.dir / PROGRESS,
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "kind": "progress",
                    **self.identity.to_dict(),
                    "counts": counts,
                    "backend_state": self._writer.state(),
                    "codec_error": self.codec_error.state(),
                },
            )
        )
        self.counts = counts
        update_tokens_sha256(self._hash, block)
        self._io(self.lease.renew)

    def _io(self, write: Callable[[], object]) -> None:
        """Run one write; an OSError (disk full, I/O error) becomes a one-line WriteFailedError."""
        try:
            write()
        except OSError as e:
            reason = f"{e.strerror or e} ({e.filename})" if e.filename else str(e)
            raise WriteFailedError(
                f"{self.dir}: writing failed after {self.counts['sequences']:,} durable sequences "
                f"({self.counts['positions']:,} positions): {reason}; free space or fix the disk, then "
                "rerun the same command: it resumes after the durable sequences"
            ) from e

    def _record(self, state: dict, files: dict) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": "part",
            "name": self.name,
            "shard_index": self.shard_index,
            **self.identity.to_dict(),
            "backend_options": self.backend_options,
            "config": self.config,
            "counts": dict(self.counts),
            "files": files,
            "bytes": sum(f["bytes"] for f in files.values()),
            "backend_state": state,
        }

    def commit(self, extra: dict | None = None, *, expect: dict | None = None) -> dict:
        """Flush, fsync, then write part.json last. Returns the part record.

        ``expect``: ``counts`` and ``tokens_sha256`` the part must have (a conversion's source
        part); a part that differs is not committed (IntegrityError)."""
        if self.committed:
            return read_json(self.dir / PART_RECORD)
        self.flush()
        self._io(self._writer.close)
        self.lease.check()
        if expect is not None:
            found = {"counts": dict(self.counts), "tokens_sha256": self._hash.hexdigest()}
            wrong = [key for key in ("counts", "tokens_sha256") if expect[key] != found[key]]
            if wrong:
                raise IntegrityError(
                    f"{self.dir}: the written part's {' and '.join(wrong)} differ from the "
                    f"source's ({found['counts']} against {expect['counts']}); it is not committed: "
                    "the source changed or is damaged while it was read; run `kdcache verify` on it"
                )
        record = self._record(self._writer.state(), file_table(self.dir))
        if self.codec.name != "plain":
            record["codec_error"] = self.codec_error.summary()
        record.update(
            tokens_sha256=self._hash.hexdigest(),
            kdcache_version=kdcache_version(),
            created=now_iso(),
            **(extra or {}),
        )
        self._io(lambda: write_json_durable(self.dir / PART_RECORD, record))
        (self.dir / PROGRESS).unlink(missing_ok=True)
        self.committed = True
        self.release()
        remove_leases(self.dir)
        return record

    def release(self) -> None:
        """Give up the part's lease (commit does; call it when stopping on an error)."""
        if self.lease is not None:
            self.lease.release()


def write_cache(root: Path, identity: CacheIdentity, blocks: list[Block], **kwargs) -> dict:
    """Write blocks as one finalized single-part cache; returns the manifest (tests, convert)."""
    from kdcache.storage.manifest import finalize

    writer = PartWriter.open(root, identity, **kwargs)
    for block in blocks:
        writer.add_block(block)
    writer.commit()
    return finalize(root)

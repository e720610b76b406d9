"""Part leases: at most one live writer per part, even across hosts and after a node dies.

A lease is a small JSON file inside the part directory, ``.lease-{generation:06d}.json``::

    {"owner": {"host": ..., "pid": ..., "id": uuid4}, "expires_at": unix seconds, ...}

* **Acquire.** With no lease file, create generation 1. A lease that is still live (not
  expired, not held by a process of this host that no longer exists, not held by this same
  process: there the newest writer object wins) refuses the new writer with ``PartLockedError`` naming its owner and expiry (or, with ``wait``, waits for it
  to expire). An expired lease is taken over by creating the next generation. Each generation
  is created exclusively (``kdcache.storage.durable.create_durable``: a hard link of a fully
  written file, ``O_EXCL`` where links are not supported), so of many writers racing for one
  lease exactly one wins, on NFS too.
* **Renew.** The owner rewrites its own generation's file durably (write, fsync, rename), from a
  heartbeat thread every ``duration / 4`` and at each flush. It never renews a lease that has
  already expired or been superseded: it stops and reports it as lost instead, so a writer that
  stalled longer than the lease (swapped out, network partition) cannot keep writing next to
  the writer that took over.
* **Release.** On commit (or when the writer stops on an error) the owner deletes its file.
  A killed writer leaves its file; the next writer takes over at once on the same host (the
  pid is gone) and after expiry elsewhere (a host/pid lock alone stays stuck when a node dies).

The names start with a dot: integrity checks, Zarr and Arrow datasets skip them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from kdcache.storage.durable import create_durable, write_durable
from kdcache.storage.errors import PartLockedError

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 120.0
_NAME = re.compile(r"^\.lease-(\d{6})\.json$")


def lease_name(generation: int) -> str:
    return f".lease-{generation:06d}.json"


def is_lease_file(name: str) -> bool:
    return _NAME.match(name) is not None


def remove_leases(part_dir: Path) -> None:
    """Delete every lease file of a committed part: a committed part has no writer, and a writer
    killed between its commit and its release leaves its lease behind."""
    try:
        names = os.listdir(part_dir)
    except FileNotFoundError:
        return
    for name in names:
        if is_lease_file(name):
            (Path(part_dir) / name).unlink(missing_ok=True)


def live_lease(part_dir: Path) -> dict | None:
    """The record of the live lease on a part (a writer at work), or None: no lease, or its
    writer is gone (expired, or its process no longer exists on this host)."""
    probe = Lease(part_dir)
    gens = probe._generations()
    record = probe._read(gens[-1]) if gens else None
    return record if record is not None and probe._is_live(record, own_process="alive") else None


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class Lease:
    """The lease on one part directory, for one writer (this process, a fresh owner id)."""

    def __init__(self, part_dir: Path, *, duration: float = DEFAULT_LEASE_SECONDS) -> None:
        if not duration > 0:
            raise ValueError(f"lease duration must be > 0 seconds, got {duration!r}")
        self.dir = Path(part_dir)
        self.duration = float(duration)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
        self.generation: int | None = None
        self.expires_at = 0.0
        self.lost: str | None = None  # why the lease was lost, once it is
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading the directory ------------------------------------------------------------
    def _generations(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))

    def _read(self, generation: int) -> dict | None:
        """The lease record, {} if present but unreadable (being created), None if gone."""
        path = self.dir / lease_name(generation)
        try:
            obj = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            try:  # an O_EXCL file being written: live for one lease from its creation
                return {"expires_at": path.stat().st_mtime + self.duration, "owner": {}}
            except FileNotFoundError:
                return None
        return obj if isinstance(obj, dict) else {}

    def _record(self) -> bytes:
        return json.dumps(
            {
                "kind": "lease",
                "owner": self.owner,
                "generation": self.generation,
                "expires_at": self.expires_at,
                "expires": _iso(self.expires_at),
                "duration": self.duration,
            },
            sort_keys=True,
        ).encode()

    def _create(self, generation: int) -> bool:
        """Create ``generation`` exclusively with our record; False if it already exists."""
        self.generation, self.expires_at = generation, time.time() + self.duration
        return create_durable(
            self.dir / lease_name(generation), self._record(), tag=self.owner["id"]
        )

    @staticmethod
    def describe(record: dict) -> str:
        o = record.get("owner") or {}
        who = f"host {o.get('host', '?')} pid {o.get('pid', '?')} (id {str(o.get('id', '?'))[:8]})"
        left = float(record.get("expires_at", 0)) - time.time()
        return (
            f"{who}, live until {_iso(float(record.get('expires_at', 0)))} ({left:.0f}s from now)"
        )

    def _is_live(self, record: dict, *, own_process: str = "take over") -> bool:
        """Whether the lease a record describes is live for this writer. ``own_process``: a
        lease of this very process counts as free to "take over" (an abandoned writer object)
        or, for a look from outside ("alive"), as live while it lasts."""
        o = record.get("owner") or {}
        if o.get("host") == self.owner["host"] and isinstance(o.get("pid"), int):
            if o["pid"] == self.owner["pid"] and own_process == "take over":
                # This process opened the part before (an abandoned writer object): the newest
                # writer of a process wins and the older one stops at its next flush.
                log.warning("%s: taking over this process's earlier writer", self.dir.name)
                return False
            if not _pid_alive(o["pid"]):
                return False  # its process died on this host: no need to wait for the expiry
        return float(record.get("expires_at", 0)) > time.time()

    # -- the lease's life -----------------------------------------------------------------
    def acquire(self, *, wait: float = 0.0) -> Lease:
        """Take the lease (waiting up to ``wait`` s for a live one to expire), or raise
        PartLockedError. Starts nothing: call ``start_heartbeat`` to keep it live."""
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        while True:
            gens = self._generations()
            if not gens:
                if self._create(1):
                    break
                continue
            top = gens[-1]
            record = self._read(top)
            if record is None:
                continue  # released meanwhile: look again
            if not self._is_live(record):
                if self._create(top + 1):
                    log.info("%s: took over the lease of %s", self.dir.name, self.describe(record))
                    break
                continue  # another writer took it first: look again
            if time.monotonic() >= deadline:
                raise PartLockedError(
                    f"{self.dir}: another writer holds the lease on this part: {self.describe(record)}; "
                    "wait for it to finish (a killed writer's lease expires by itself), or delete "
                    f"{lease_name(top)} if you are sure no writer is alive"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        for old in gens:  # superseded generations: clean up (best effort)
            if old != self.generation:
                (self.dir / lease_name(old)).unlink(missing_ok=True)
        return self

    def check(self) -> None:
        """Raise PartLockedError unless this writer still owns a live lease."""
        if self.lost is None and self.generation is not None:
            if time.time() >= self.expires_at:
                self.lost = f"it expired at {_iso(self.expires_at)} before it was renewed (the writer stalled)"
            elif any(g > self.generation for g in self._generations()):
                self.lost = "another writer took it over"
            elif not self._owns_file():
                self.lost = "its lease file was removed"
        if self.lost is not None:
            raise PartLockedError(
                f"{self.dir}: this writer lost its lease on the part ({self.lost}); it stopped "
                "writing; rerun to resume the part (if no other writer finishes it)"
            )

    def _owns_file(self) -> bool:
        record = self._read(self.generation) or {}
        return (record.get("owner") or {}).get("id") == self.owner["id"]

    def renew(self) -> None:
        """Extend the lease by its duration, or raise PartLockedError if it is lost."""
        with self._lock:
            self.check()
            self.expires_at = time.time() + self.duration
            write_durable(self.dir / lease_name(self.generation), self._record())
            if any(g > self.generation for g in self._generations()):
                self.lost = "another writer took it over"
                self.check()

    def start_heartbeat(self, interval: float | None = None) -> None:
        """Renew every ``interval`` s (default duration / 4) in a daemon thread until release."""
        interval = self.duration / 4 if interval is None else interval

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except PartLockedError:
                    return  # self.lost is set: the writer sees it at its next check
                except OSError as e:  # disk trouble: keep trying until the lease runs out
                    log.warning("%s: could not renew the lease: %s", self.dir.name, e)

        self._thread = threading.Thread(target=beat, daemon=True, name=f"lease-{self.dir.name}")
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete this writer's lease file (if it still owns it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self.generation is None:
                return
            if self._owns_file():
                (self.dir / lease_name(self.generation)).unlink(missing_ok=True)
            self.generation = None
            self.lost = self.lost or "it was released"  # a thread still writing stops now

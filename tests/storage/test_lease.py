"""Part leases: one live writer per part; a dead or stalled writer's part is taken over.

Writers of other "hosts" are simulated by writing their lease record (the owner's host name is
all that tells hosts apart); a stalled writer is a real process stopped with SIGSTOP.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.errors import PartLockedError
from kdcache.storage.lease import Lease, is_lease_file, lease_name
from kdcache.storage.manifest import CacheIdentity, finalize, part_name, parts_dir
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter, write_cache

SCHEMA = CacheSchema(k=4, vocab_size=300)
IDENT = CacheIdentity(backend="zarr", schema=SCHEMA, fingerprints={}, settings={})


def foreign_lease(part_dir: Path, *, host: str, pid: int, expires_in: float, gen: int = 1) -> None:
    """The lease record another writer would leave (another host, or a process of this one)."""
    part_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "owner": {"host": host, "pid": pid, "id": "f" * 32},
        "expires_at": time.time() + expires_in,
    }
    (part_dir / lease_name(gen)).write_text(json.dumps(record))


def leases(part_dir: Path) -> list[str]:
    return sorted(p.name for p in part_dir.iterdir() if is_lease_file(p.name))


def test_live_lease_of_another_host_refuses_then_expires(tmp_path):
    part = tmp_path / "part-00000"
    foreign_lease(part, host="gpu-node-17", pid=4242, expires_in=1.0)
    with pytest.raises(PartLockedError) as e:
        Lease(part, duration=5).acquire()
    msg = str(e.value)
    assert "\n" not in msg and "host gpu-node-17 pid 4242" in msg and "live until" in msg
    t0 = time.monotonic()
    lease = Lease(part, duration=5).acquire(wait=10)  # waits out the expiry, then takes over
    assert 0.5 < time.monotonic() - t0 < 5
    assert lease.generation == 2 and leases(part) == [lease_name(2)]  # the old one cleaned up
    lease.check()
    lease.release()
    assert leases(part) == []


def test_dead_process_of_this_host_is_taken_over_at_once(tmp_path):
    part = tmp_path / "part-00000"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    foreign_lease(part, host=socket.gethostname(), pid=int(gone.stdout), expires_in=600)
    lease = Lease(part, duration=5).acquire()  # no wait: its pid no longer exists
    assert lease.generation == 2
    lease.release()


def contend(part: Path, host: str, barrier: threading.Barrier, outcome: list[str]) -> None:
    lease = Lease(part, duration=30)
    lease.owner["host"] = host
    barrier.wait()
    try:
        lease.acquire()
        outcome.append("won")
    except PartLockedError:
        outcome.append("refused")


def test_racing_takeovers_of_an_expired_lease_have_one_winner(tmp_path):
    for round_ in range(10):
        part = tmp_path / f"part-{round_}"
        foreign_lease(part, host="dead-node", pid=1, expires_in=-1)
        barrier, outcome = threading.Barrier(8), []
        threads = [  # 8 writers on 8 hosts
            threading.Thread(target=contend, args=(part, f"node-{i}", barrier, outcome))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome) == ["refused"] * 7 + ["won"], outcome


def test_heartbeat_keeps_a_short_lease_live_and_release_stops_it(tmp_path):
    part = tmp_path / "part-00000"
    lease = Lease(part, duration=0.4).acquire()
    lease.start_heartbeat()
    time.sleep(1.2)  # three lease lengths
    lease.check()
    other = Lease(part, duration=0.4)
    other.owner["host"] = "elsewhere"
    with pytest.raises(PartLockedError, match="another writer holds the lease"):
        other.acquire()
    lease.release()
    other.acquire().release()


def test_a_lease_that_ran_out_is_lost_and_not_renewed(tmp_path):
    part = tmp_path / "part-00000"
    lease = Lease(part, duration=0.2).acquire()
    time.sleep(0.3)  # no heartbeat: the writer "stalled"
    with pytest.raises(PartLockedError, match="lost its lease.*expired"):
        lease.renew()
    other = Lease(part, duration=5)
    other.owner["host"] = "elsewhere"
    other.acquire()
    with pytest.raises(PartLockedError, match="lost its lease"):
        lease.check()


def test_writer_holds_the_lease_until_commit_and_records_no_lease_file(tmp_path):
    block = synthetic_block(np.random.default_rng(0), [5, 7, 3], SCHEMA)
    w = PartWriter.open(tmp_path, IDENT)
    part = parts_dir(tmp_path) / part_name(0)
    assert leases(part) == [lease_name(1)]
    w.add_block(block)
    record = w.commit()
    assert leases(part) == [] and not any(".lease" in f for f in record["files"])
    finalize(tmp_path)
    assert CacheReader(tmp_path).block(0, 3).equals(block)


STALLED_WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_lease import IDENT, SCHEMA
from kdcache.storage.errors import PartLockedError
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter
block = synthetic_block(np.random.default_rng(1), [6] * 12, SCHEMA)
w = PartWriter.open(sys.argv[1], IDENT, lease_seconds=1.5)
w.add_block(block.slice(0, 5))
print("flushed", flush=True)
sys.stdin.readline()  # the test stops (SIGSTOP) and resumes (SIGCONT) this process meanwhile
try:
    w.add_block(block.slice(5, 12))
    w.commit()
except PartLockedError as e:
    print("stopped:", e, flush=True)
    sys.exit(3)
"""


def test_second_writer_refused_while_live_takes_over_after_expiry_and_first_stops(tmp_path):
    """Two writers on one part: the second is refused while the first is alive; the first
    stalls (SIGSTOP) past its lease, the second takes over and finishes; the first, resumed,
    stops without writing."""
    script = tmp_path / "writer.py"
    script.write_text(STALLED_WRITER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "cache"
    first = subprocess.Popen(
        [sys.executable, script, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "flushed"
        with pytest.raises(PartLockedError, match=f"pid {first.pid}.*live until"):
            PartWriter.open(out, IDENT, lease_seconds=1.5)
        first.send_signal(signal.SIGSTOP)  # its heartbeat stops with it
        time.sleep(2.0)
        second = PartWriter.open(out, IDENT, lease_seconds=1.5)
        assert second.resume_sequences == 5  # the first writer's durable flush
        block = synthetic_block(np.random.default_rng(1), [6] * 12, SCHEMA)
        second.add_block(block.slice(5, 12))
        second.commit()
        first.send_signal(signal.SIGCONT)
        out_text, _ = first.communicate("go\n", timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 3 and "lost its lease" in out_text, out_text
    finalize(out)
    assert CacheReader(out).block(0, 12).equals(block)
    straight = write_cache(tmp_path / "straight", IDENT, [block])
    taken_over = CacheReader(out).manifest
    assert taken_over["parts"][0]["tokens_sha256"] == straight["parts"][0]["tokens_sha256"]


def test_an_abandoned_writer_never_brings_its_lease_back(tmp_path):
    """A writer object left behind in this process (its heartbeat still running) loses the
    part to a newer writer, and does not recreate its lease after that one commits."""
    block = synthetic_block(np.random.default_rng(2), [4, 4, 4], SCHEMA)
    part = parts_dir(tmp_path) / part_name(0)
    old = PartWriter.open(tmp_path, IDENT, lease_seconds=0.4)  # heartbeat every 0.1 s
    old.add_block(block.slice(0, 1))
    new = PartWriter.open(tmp_path, IDENT)
    new.add_block(block.slice(1, 3))
    new.commit()
    time.sleep(0.5)
    assert leases(part) == []
    with pytest.raises(PartLockedError, match="lost its lease"):
        old.add_block(block.slice(1, 3))

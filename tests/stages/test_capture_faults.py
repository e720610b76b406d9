"""Fault injection on stage one: kill -9 at random moments, a full disk, a second writer.

Every fault is followed by a rerun of the same command; the final cache must equal the one an
uninterrupted run writes (every array of every sequence, and the token checksums).
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_capture import (
    SLOW_TEACHER,
    capture,
    env_with_path,
    kdcache_args,
    text_records,
    write_jsonl,
)

from kdcache.pipeline.cli import main as cli_main
from kdcache.storage import writer
from kdcache.storage.backends import arrow as arrow_backend
from kdcache.storage.backends import zarr as zarr_backend
from kdcache.storage.durable import read_json
from kdcache.storage.errors import PartLockedError, WriteFailedError
from kdcache.storage.lease import is_lease_file
from kdcache.storage.manifest import PROGRESS
from kdcache.storage.reader import CacheReader

K = 8


def assert_same_cache(got: Path, want: Path) -> None:
    a, b = CacheReader(got), CacheReader(want)
    assert a.num_sequences == b.num_sequences and a.num_positions == b.num_positions
    assert a.block(0, a.num_sequences).equals(b.block(0, b.num_sequences))
    for pa, pb in zip(a.manifest["parts"], b.manifest["parts"], strict=True):
        assert pa["tokens_sha256"] == pb["tokens_sha256"] and pa["counts"] == pb["counts"]
    leftovers = [
        p for p in (got / "parts").rglob("*") if is_lease_file(p.name) or p.name == PROGRESS
    ]
    assert not leftovers, leftovers


# -- kill -9 at random moments ----------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(tok_dir, corpus, tmp_path):
    """SIGKILL at >= 10 moments drawn uniformly over an uninterrupted run's duration (start-up,
    planning, the hot loop, flushes, commit, finalize), each followed by a rerun that is itself
    the next victim; a run that finishes before its kill is checked and the cache started over."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "slow_teacher.py").write_text(SLOW_TEACHER)
    env = {**env_with_path(tmp_path / "mods"), "SLOW_TEACHER_DELAY": "0.04"}
    data = write_jsonl(tmp_path / "docs.jsonl", text_records(corpus["train"], 100, 200))
    args = ["-v", "cache", "--teacher", "slow_teacher:make", "--tokenizer", tok_dir]
    args += ["--data", data, "--k", K, "--batch-tokens", 256, "--flush-positions", 300]
    args += ["--no-progress"]

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            kdcache_args(*args, "--out", out),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    t0 = time.monotonic()
    whole = start(tmp_path / "whole")
    assert whole.wait(timeout=120) == 0, whole.stderr.read()
    runtime = time.monotonic() - t0  # ~ 2 s start-up + ~ 1.5 s of teacher calls

    rng = np.random.default_rng(7)
    kills = resumes = after_a_flush = rounds = 0
    out = tmp_path / "c0"
    while kills < 10:
        victim = start(out)
        at = rng.uniform(0, runtime)
        try:
            victim.wait(timeout=at)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        if not finished:
            after_a_flush += (out / "parts/part-00000" / PROGRESS).exists()
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
        err = victim.stderr.read()
        resumes += "resuming after" in err
        if finished:  # it beat its kill: the cache is complete; check it, start another
            assert victim.returncode == 0, err[-2000:]
            assert_same_cache(out, tmp_path / "whole")
            rounds += 1
            out = tmp_path / f"c{rounds}"
    last = start(out)  # the last rerun runs to the end
    assert last.wait(timeout=120) == 0, last.stderr.read()[-2000:]
    resumes += "resuming after" in last.stderr.read()
    assert_same_cache(out, tmp_path / "whole")
    assert after_a_flush >= 1 and resumes >= 1, (after_a_flush, resumes)


# -- a full disk ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs(corpus, tmp_path_factory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("faults") / "docs.jsonl", text_records(corpus["train"], 120, 120)
    )


SETTINGS = dict(k=K, seq_len=64, batch_tokens=512, flush_positions=600)


def fail_after(monkeypatch, owner: object, name: str, calls: int, where: str) -> None:
    """Make ``owner.name`` raise ENOSPC from its ``calls + 1``-th call on (a disk gone full)."""
    real = getattr(owner, name)
    count = {"n": 0}

    def full(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device", where)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, full)


@pytest.mark.parametrize(
    "backend, target",
    [
        ("zarr", (zarr_backend.ZarrWriter, "append")),  # the data
        ("arrow", (arrow_backend.ArrowWriter, "append")),
        ("zarr", (writer, "write_json_durable")),  # the resume point
    ],
    ids=["zarr-data", "arrow-data", "progress-record"],
)
def test_disk_full_mid_part_is_one_clear_line_and_resumes(
    gpt_teacher, docs, tmp_path, monkeypatch, backend, target
):
    straight = tmp_path / "straight"
    capture(gpt_teacher, docs, straight, backend=backend, **SETTINGS)
    out = tmp_path / "c"
    cmd = ["cache", "--teacher", gpt_teacher, "--data", docs, "--out", out, "--backend", backend]
    cmd += ["--k", K, "--seq-len", 64, "--batch-tokens", 512, "--flush-positions", 600]
    cmd += ["--no-progress"]
    with monkeypatch.context() as m:
        fail_after(m, *target, 3, str(out / "parts/part-00000/somefile"))
        r = CliRunner().invoke(cli_main, [str(a) for a in cmd])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache: error: "), r.output
    assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    progress = read_json(out / "parts/part-00000" / PROGRESS)
    assert progress["counts"]["sequences"] > 0  # three flushes stayed durable
    assert not any(is_lease_file(p.name) for p in (out / "parts/part-00000").iterdir())

    summary = capture(gpt_teacher, docs, out, backend=backend, **SETTINGS)  # the rerun
    assert summary.resumed_sequences == progress["counts"]["sequences"]
    assert_same_cache(out, straight)
    # The summary counts the whole part (bytes per position of the part) and says it resumed.
    assert summary.part_positions == CacheReader(out).num_positions > summary.positions
    line = summary.line()
    assert f"resumed after {summary.resumed_sequences:,} durable sequences" in line
    bpp = summary.bytes / summary.part_positions
    assert f"({bpp:.1f} bytes/position)" in line and f"{summary.part_positions:,} positions" in line


def test_write_failed_error_names_the_durable_point(gpt_teacher, docs, tmp_path, monkeypatch):
    fail_after(monkeypatch, zarr_backend.ZarrWriter, "append", 1, "x")
    with pytest.raises(WriteFailedError, match=r"after [\d,]+ durable sequences .* No space left"):
        capture(gpt_teacher, docs, tmp_path / "c", **SETTINGS)


# -- a second writer --------------------------------------------------------------------------
def test_capture_refuses_a_part_leased_by_a_live_writer_elsewhere(gpt_teacher, docs, tmp_path):
    import json

    part = tmp_path / "c" / "parts" / "part-00000"
    part.mkdir(parents=True)
    lease = {
        "owner": {"host": "gpu-node-3", "pid": 77, "id": "a" * 32},
        "expires_at": time.time() + 2,
    }
    (part / ".lease-000001.json").write_text(json.dumps(lease))
    with pytest.raises(PartLockedError, match="host gpu-node-3 pid 77.*live until"):
        capture(gpt_teacher, docs, tmp_path / "c", **SETTINGS)
    assert sorted(p.name for p in part.iterdir()) == [".lease-000001.json"]  # nothing touched
    summary = capture(gpt_teacher, docs, tmp_path / "c", lease_wait=10, **SETTINGS)
    assert summary.finalized  # waited for the expiry, took the part over, finished it
    assert socket.gethostname()  # (this host's writer held the new lease)


@pytest.mark.slow
def test_replace_while_another_capture_writes_is_refused_and_loses_nothing(
    tok_dir, corpus, tmp_path
):
    """A second `kdcache cache --k 4 --replace` while the first writes: refused in one line
    naming the live writer; the first finishes a cache that verifies; afterwards --replace works."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "slow_teacher.py").write_text(SLOW_TEACHER)
    env = {**env_with_path(tmp_path / "mods"), "SLOW_TEACHER_DELAY": "0.05"}
    data = write_jsonl(tmp_path / "docs.jsonl", text_records(corpus["train"], 100, 120))
    out = tmp_path / "c"
    args = ["cache", "--teacher", "slow_teacher:make", "--tokenizer", tok_dir, "--data", data]
    args += ["--out", out, "--batch-tokens", 256, "--flush-positions", 300, "--no-progress"]
    first = subprocess.Popen(
        kdcache_args(*args, "--k", K), env=env, stderr=subprocess.PIPE, text=True
    )
    part = out / "parts" / "part-00000"
    deadline = time.monotonic() + 60
    while not (part / PROGRESS).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # a live writer, paused mid-part: its lease stays live
    try:
        assert first.poll() is None, "the first capture ended before the test could interfere"
        second = subprocess.run(
            kdcache_args(*args, "--k", 4, "--replace"), env=env, capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "another writer holds the lease" in lines[0], second.stderr
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert CacheReader(out).k == K
    verified = subprocess.run(kdcache_args("verify", out), capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    again = subprocess.run(
        kdcache_args(*args, "--k", 4, "--replace"), env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert CacheReader(out).k == 4

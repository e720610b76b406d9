"""Stage one's executors: a Dask cluster and SLURM-style array tasks write the same cache as
one process running the same settings, and a worker that dies mid-part is replaced cleanly.

Everything is tiny: a byte-level BPE tokenizer of 512 ids and a 2-layer GPT teacher built here,
documents cut from the standard library's own sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdcache.pipeline.cli import main as cli_main
from kdcache.pipeline.corpus import builtin_corpus
from kdcache.pipeline.executors import run_capture, run_dask, run_local
from kdcache.stages.capture import CaptureConfig
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import (
    make_tokenizer_info,
    save_tokenizer,
    train_builtin_tokenizer,
)
from kdcache.storage.lease import is_lease_file
from kdcache.storage.reader import CacheReader

SHARDS = 3


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [d.text for d in builtin_corpus("all", max_files=6)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, texts) -> Path:
    """A random built-in GPT folder (model.pt + its tokenizer)."""
    folder = tmp_path_factory.mktemp("teacher")
    save_tokenizer(make_tokenizer_info(train_builtin_tokenizer(texts, vocab_size=512)), folder)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_embd=32, block_size=128))
    save_checkpoint(model, folder / "model.pt")
    return folder


@pytest.fixture(scope="module")
def docs(tmp_path_factory, texts) -> Path:
    """120 documents of ~50 tokens: 4 groups of 32 documents, spread over 3 parts."""
    records = [{"text": t[i : i + 200]} for t in texts for i in range(0, len(t), 200)][:120]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def settings(teacher: Path | str, docs: Path, out: Path, **more) -> CaptureConfig:
    return CaptureConfig(
        teacher=str(teacher),
        data=str(docs),
        out=str(out),
        k=8,
        seq_len=64,
        group_docs=32,
        batch_tokens=512,
        flush_positions=400,
        num_shards=SHARDS,
        progress=False,
        **more,
    )


@pytest.fixture(scope="module")
def local_cache(teacher, docs, tmp_path_factory) -> Path:
    """The reference: every part captured by this one process, in order."""
    out = tmp_path_factory.mktemp("local") / "c"
    run = run_local(settings(teacher, docs, out))
    assert run.finalized and len(run.parts) == SHARDS
    return out


def assert_same_parts(got: Path, want: Path) -> None:
    """Part by part: the same sequences, arrays and token checksums."""
    a, b = CacheReader(got), CacheReader(want)
    assert a.num_parts == b.num_parts == SHARDS
    for pa, pb in zip(a.manifest["parts"], b.manifest["parts"], strict=True):
        assert pa["name"] == pb["name"] and pa["counts"] == pb["counts"]
        assert pa["tokens_sha256"] == pb["tokens_sha256"]
    assert a.block(0, a.num_sequences).equals(b.block(0, b.num_sequences))
    assert not [p for p in (got / "parts").rglob("*") if is_lease_file(p.name)]


def test_dask_local_cluster_equals_one_process(teacher, docs, local_cache, tmp_path):
    out = tmp_path / "dask"
    cfg = settings(teacher, docs, out)
    run = run_dask(cfg, workers=2, processes=False)  # 2 workers in threads: quick to start
    assert run.finalized and run.workers == 2
    assert sorted(p.part for p in run.parts) == [f"part-{i:05d}" for i in range(SHARDS)]
    assert run.positions == CacheReader(local_cache).num_positions
    assert_same_parts(out, local_cache)

    again = run_dask(cfg, workers=2, processes=False)  # a rerun finds every part committed
    assert again.finalized and all(p.skipped for p in again.parts)


DYING_TEACHER = '''
import os

import torch


class DyingLM(torch.nn.Module):
    """A causal LM whose process dies (os._exit) at its 4th call while $DIE_ONCE exists."""

    max_positions = 64

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(512, 16)
        self.out = torch.nn.Linear(16, 512)
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        marker = os.environ.get("DIE_ONCE", "")
        if self.calls == 4 and marker and os.path.exists(marker):
            os.unlink(marker)
            os._exit(1)  # the worker dies mid-part, after a flush, holding the part's lease
        steps = torch.arange(1, ids.shape[1] + 1)[:, None]  # (T, 1)
        return 4 * self.out(torch.tanh(self.emb(ids).cumsum(1) / steps))  # (B, T, V)


def make():
    torch.manual_seed(0)
    return DyingLM()
'''


@pytest.mark.slow
def test_cli_dask_executor_survives_a_worker_killed_mid_part(teacher, docs, tmp_path, monkeypatch):
    """``kdcache cache --executor dask`` on a LocalCluster of 2 worker processes; one worker
    dies mid-part; the scheduler retries its task, the retry takes the dead writer's part over
    (its lease's pid is gone) and resumes it; the cache equals one process's."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "dying_teacher.py").write_text(DYING_TEACHER)
    monkeypatch.syspath_prepend(str(mods))
    tok = str(teacher)  # the built-in teacher's folder holds the tokenizer
    # 600 short documents: 3 groups of the command's 256 documents, one per part
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    records = [{"text": t[i : i + 40]} for t in texts for i in range(0, len(t), 40)][:600]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    reference = tmp_path / "local"
    cfg = replace(settings("dying_teacher:make", data, reference, tokenizer=tok), group_docs=256)
    run_local(cfg)

    marker = tmp_path / "die-once"
    marker.touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(mods), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "DIE_ONCE": str(marker),
    }
    script = Path(sys.executable).with_name("kdcache")
    args = [str(script), "cache", "--executor", "dask", "--workers", 2, "--teacher"]
    args += ["dying_teacher:make", "--tokenizer", tok, "--data", data, "--out", tmp_path / "dask"]
    args += ["--num-shards", SHARDS, "--k", 8, "--seq-len", 64, "--batch-tokens", 512]
    args += ["--flush-positions", 400, "--no-progress"]
    r = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "still alive" not in r.stderr  # the LocalCluster closes cleanly
    assert not marker.exists(), "no worker died: the test did not test a retry"
    assert "3 parts captured" in r.stdout and "cache finalized" in r.stdout, r.stdout
    assert_same_parts(tmp_path / "dask", reference)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--executor", "dask", "--shard-index", "1"], "drop --shard-index"),
        (["--scheduler", "tcp://somewhere:8786"], "go with --executor dask"),
        (["--executor", "dask", "--shard-index", "env"], "drop --shard-index"),
    ],
)
def test_executor_options_that_do_not_fit_are_refused(teacher, docs, tmp_path, extra, message):
    args = ["cache", "--teacher", teacher, "--data", docs, "--out", tmp_path / "c", *extra]
    r = CliRunner().invoke(cli_main, [str(a) for a in args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "c").exists()


def slurm_env(monkeypatch, task: int, lo: int, hi: int) -> None:
    """The variables SLURM sets in task ``task`` of ``sbatch --array=lo-hi``."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (
        ("ID", task),
        ("MIN", lo),
        ("MAX", hi),
        ("COUNT", hi - lo + 1),
        ("STEP", 1),
    ):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))


def test_slurm_array_tasks_then_finalize_lists_missing_parts(
    teacher, docs, local_cache, tmp_path, monkeypatch
):
    """One array task per shard (--shard-index env, --array=0-2), in any order; `kdcache
    finalize` names the parts still missing; the documented rerun of one task (`sbatch
    --array=1`: SLURM describes a one-task array) resumes part 1 of 3 and keeps the others."""
    out = tmp_path / "slurm"
    cfg = replace(settings(teacher, docs, out), shard_index="env", num_shards=None)
    for task in (2, 0):
        slurm_env(monkeypatch, task, 0, SHARDS - 1)
        assert not run_capture(cfg).finalized
    r = CliRunner().invoke(cli_main, ["finalize", str(out)])
    assert r.exit_code == 2, r.output
    assert "1 of 3 parts not committed yet: part-00001 (not started)" in r.output
    assert not (out / "manifest.json").exists()
    kept = {n: (out / "parts" / n / "part.json").read_bytes() for n in ("part-00000", "part-00002")}

    slurm_env(monkeypatch, 1, 1, 1)  # the rerun: MIN = MAX = 1, COUNT = 1
    summary = run_capture(cfg)
    assert summary.part == "part-00001" and summary.num_shards == SHARDS
    assert summary.finalized  # the last task to finish finalizes
    assert kept == {n: (out / "parts" / n / "part.json").read_bytes() for n in kept}
    r = CliRunner().invoke(cli_main, ["finalize", str(out)])  # the dependent job: idempotent
    assert r.exit_code == 0 and "finalized 3 parts" in r.output, r.output
    assert_same_parts(out, local_cache)


def test_an_empty_shard_commits_an_empty_part_that_every_command_accepts(teacher, docs, tmp_path):
    """120 documents in groups of 256 give shard 1 of 2 nothing (a SLURM array or a Dask run
    larger than the data): it commits an empty part, and finalize, verify, inspect, stats and
    train take the cache; --group-docs 32 deals the documents out instead."""
    args = ["cache", "--teacher", teacher, "--data", docs, "--k", "8", "--seq-len", "64"]
    args += ["--num-shards", "2", "--no-progress"]
    out = tmp_path / "a"
    for shard in ("1", "0"):
        r = CliRunner().invoke(
            cli_main, [str(a) for a in [*args, "--shard-index", shard, "--out", out]]
        )
        assert r.exit_code == 0, r.output
    empty = json.loads((out / "parts/part-00001/part.json").read_text())
    assert empty["counts"] == {"sequences": 0, "positions": 0, "rows": 0, "docs": 0}
    for command in (["verify", out], ["inspect", out], ["stats", out, "--json"], ["finalize", out]):
        r = CliRunner().invoke(cli_main, [str(a) for a in command])
        assert r.exit_code == 0, (command, r.output)
    train = [
        "train",
        "--cache",
        out,
        "--student",
        "nano",
        "--out",
        tmp_path / "run",
        "--steps",
        "2",
    ]
    r = CliRunner().invoke(
        cli_main, [str(a) for a in [*train, "--batch-size", "2", "--no-progress"]]
    )
    assert r.exit_code == 0, r.output
    assert CacheReader(out).num_sequences == CacheReader(out).part(0).num_sequences > 0
    more = ["--out", tmp_path / "b", "--group-docs", "32", "--shard-index", "1"]
    r = CliRunner().invoke(cli_main, [str(a) for a in [*args, *more]])
    assert r.exit_code == 0, r.output
    part = json.loads((tmp_path / "b" / "parts" / "part-00001" / "part.json").read_text())
    assert part["counts"]["sequences"] > 0 and part["config"]["group_docs"] == 32


@pytest.mark.slow
def test_dask_worker_processes_equal_one_process_bit_for_bit_by_default(teacher, docs, tmp_path):
    """A one-process capture at 2 torch threads and a LocalCluster of worker processes, both at
    their default settings, store the same bits: the capture's thread count is recorded and the
    workers use it. (Workers used to run 1 thread each, and BLAS rounds the few-row products of
    the head, 5 rows against 50,257 ids here, differently then: 310 of 17,696 tails differed.)"""
    wide = tmp_path / "wide-teacher"
    shutil.copytree(teacher, wide)  # the tokenizer; a GPT-2-sized head over its 512 ids
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32, block_size=64))
    save_checkpoint(gpt, wide / "model.pt")
    cfg = replace(settings(wide, docs, tmp_path / "local"), chunk_rows=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_local(cfg)
        run = run_dask(replace(cfg, out=str(tmp_path / "dask")))  # processes, default workers
    finally:
        torch.set_num_threads(threads)
    assert run.finalized
    assert CacheReader(tmp_path / "dask").manifest["settings"]["cpu_threads"] == 2
    assert_same_parts(tmp_path / "dask", tmp_path / "local")

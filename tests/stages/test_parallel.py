"""Stage two on torch's engines under torchrun-style ranks (gloo on this CPU): DDP and FSDP2
reach the parameters of one process; sharded checkpoints survive kill -9 and load on another
number of ranks; activation checkpointing changes nothing but memory; the export of a
Hugging Face student from sharded checkpoints.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT per
process), each running the installed ``kdcache`` command. Tolerances: one process and N ranks
sum the same gradients in another order, so they agree to float32 rounding (atol 1e-5 on the
weights after 6 AdamW steps); a rerun on the same ranks is bit-exact.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    assert_same_params,
    kdcache,
    launch_ranks,
    lengths,
    one_thread_env,
    run_ranks,
    step_rows,
    student_params,
    synthetic_cache,
    train_args,
    wait_until,
)

from kdcache.stages.train.rundir import committed_checkpoints

pytestmark = pytest.mark.slow

OPTS = dict(steps=6, batch_size=4, grad_accum=2, eval_every=3, eval_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    # 21 sequences in parts of 9 and 12; micro-batches of 2 (batch 4, grad-accum 2): block
    # [8, 9) holds one sequence, so one rank's slice of it is empty; 6 steps reach a 2nd epoch.
    return synthetic_cache(
        tmp_path_factory.mktemp("par") / "c",
        [lengths(9, seed=5), lengths(12, seed=6)],
        masked=True,
    )


def ranks(args: list[str], world: int = 2, env: dict | None = None) -> None:
    """Run ``kdcache ARGS`` on ``world`` ranks to the end; every rank must succeed."""
    for r in run_ranks(args, world, env):
        assert r.returncode == 0, r.stderr[-3000:]


def one(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    r = kdcache(*args, env={**one_thread_env(), **(env or {})}, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def hf_student(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=True,
        # no dropout: one process and two ranks draw their dropout masks differently
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config.save_pretrained(folder)
    return folder


def hf_params(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).state_dict()


def assert_same_runs(a: Path, b: Path, params, atol: float) -> None:
    assert_same_params(params(a / "student"), params(b / "student"), atol)
    rows_a, rows_b = step_rows(a), step_rows(b)
    assert [r[3] for r in rows_a] == [r[3] for r in rows_b]  # tokens: the same global batches
    np.testing.assert_allclose(
        [float(r[1]) for r in rows_a], [float(r[1]) for r in rows_b], rtol=1e-5, atol=1e-6
    )
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("ce", "kl_topk", "top1_agreement"):
        assert ma["eval"][key] == pytest.approx(mb["eval"][key], rel=1e-5, abs=1e-6)


def builtin_params(student: Path) -> dict[str, torch.Tensor]:
    return student_params(student.parent)


@pytest.mark.parametrize(
    "parallel,student,extra",
    [
        ("ddp", "nano", {}),
        ("fsdp", "nano", {}),
        ("fsdp", "hf", {"activation_checkpointing": True}),
    ],
)
def test_two_ranks_reach_the_parameters_of_one_process(cache, tmp_path, parallel, student, extra):
    hf = student == "hf"
    opts = {**OPTS, **extra}
    if hf:
        opts.update(student=hf_student(tmp_path / "hf"), tokenizer_check="off")
    one(train_args(cache, tmp_path / "one", **opts))
    ranks(train_args(cache, tmp_path / "two", parallel=parallel, **opts))
    assert_same_runs(tmp_path / "one", tmp_path / "two", hf_params if hf else builtin_params, 1e-5)
    if hf:  # the sharded checkpoint exports as a plain Hugging Face folder, on one process
        one(["export", tmp_path / "two", "--out", tmp_path / "exported"])
        assert_same_params(
            hf_params(tmp_path / "two" / "student"), hf_params(tmp_path / "exported")
        )


def test_activation_checkpointing_changes_nothing_but_memory(cache, tmp_path):
    # The built-in GPT here; a Hugging Face student under FSDP2 in the first test.
    runs = [tmp_path / "off", tmp_path / "on"]
    one(train_args(cache, runs[0], **OPTS))
    one(train_args(cache, runs[1], activation_checkpointing=True, **OPTS))
    assert_same_params(
        builtin_params(runs[0] / "student"), builtin_params(runs[1] / "student"), 1e-6
    )


def test_an_fsdp_checkpoint_of_two_ranks_resumes_on_one_process(cache, tmp_path):
    # Two ranks save step 3 (and 6); drop step 6 and what came after: one process resumes at
    # step 3, at the same data position, and ends where one process trained all along ends.
    opts = dict(OPTS, checkpoint_every=3)
    ranks(train_args(cache, tmp_path / "two", parallel="fsdp", **opts))
    run = tmp_path / "two"
    assert [p.name for p in committed_checkpoints(run)] == ["step-00000003", "step-00000006"]
    shutil.rmtree(committed_checkpoints(run)[-1])
    shutil.rmtree(run / "student")
    r = one(train_args(cache, run, **opts))
    assert "resumed at step 3" in r.stdout
    one(train_args(cache, tmp_path / "straight", **opts))
    assert_same_runs(tmp_path / "straight", run, builtin_params, 1e-5)


def test_killed_two_rank_run_resumes_to_the_uninterrupted_run(cache, tmp_path):
    opts = dict(OPTS, steps=16, checkpoint_every=4, eval_every=5)
    args = train_args(cache, tmp_path / "killed", parallel="fsdp", **opts)
    run = tmp_path / "killed"
    procs = launch_ranks(args, 2)
    try:

        def past_a_checkpoint() -> bool:  # a committed checkpoint, and a later step logged
            steps = run / "steps.tsv"
            done = committed_checkpoints(run)
            return bool(done) and steps.exists() and len(steps.read_text().splitlines()) >= 7

        assert wait_until(past_a_checkpoint, procs[0], timeout=180), procs[0].communicate()[1]
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    saved = int(committed_checkpoints(run)[-1].name.removeprefix("step-"))
    assert 4 <= saved < 16, "killed too late: the run had finished"
    ranks(args)  # the same command again, on the same two ranks
    ranks(train_args(cache, tmp_path / "straight", parallel="fsdp", **opts))
    assert_same_runs(tmp_path / "straight", run, builtin_params, 0.0)  # bit-exact
    assert step_rows(run) == step_rows(tmp_path / "straight")


def test_a_student_whose_head_cannot_be_reached_trains_through_logits(cache, tmp_path):
    # A module:factory student hands over logits (no head kdcache can reach): DDP still
    # reaches the one-process parameters.
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "logits_student.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "mods")}
    opts = dict(OPTS, student="logits_student:make", tokenizer_check="off")
    one(train_args(cache, tmp_path / "one", **opts), env)
    ranks(train_args(cache, tmp_path / "two", parallel="ddp", **opts), env=env)
    a, b = (
        torch.load(d / "student" / "state_dict.pt") for d in (tmp_path / "one", tmp_path / "two")
    )
    assert_same_params(a, b, 1e-5)

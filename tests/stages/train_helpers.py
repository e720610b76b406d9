"""Helpers of the stage-two tests: synthetic caches written without a teacher, small training
configs, and ``kdcache`` subprocesses.

Synthetic caches come from ``kdcache.storage.synthetic`` (top-k rows with realistic
statistics) written by the real writer, so the trainer reads them exactly as it reads a capture.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.stages.train import TrainConfig
from kdcache.storage.manifest import CacheIdentity, finalize
from kdcache.storage.schema import Block, CacheSchema, Sequence
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter

VOCAB = 64  # synthetic teachers' vocabulary: a nano student's head stays tiny
K = 8


def synthetic_cache(
    path: Path,
    parts: list[list[int]],
    *,
    vocab: int = VOCAB,
    k: int = K,
    targets_on: str = "all",
    pack: bool = False,
    tail: str = "stored",
    seed: int = 0,
    backend: str = "zarr",
    tokenizer: dict | None = None,
    logprob_dtype: str = "float32",
    masked: bool = False,
) -> Path:
    """A finalized cache with one part per entry of ``parts`` (the sequence lengths of that part).

    targets_on="mask": random loss masks, top-k rows stored only where the mask is 1;
    masked=True: random loss masks on an "all" cache too (as windows' context-only rows are).
    k == vocab: the stored log-probs are normalized (the whole distribution, log_tail -inf).
    pack=True: 1-3 documents per sequence (doc_starts) and settings.pack, as ``--pack`` makes.
    tail="nan": every log_tail is NaN (a cache whose tail mass is unusable).
    """
    schema = CacheSchema(k=k, vocab_size=vocab, logprob_dtype=logprob_dtype, targets_on=targets_on)
    ident = CacheIdentity(
        backend=backend,
        schema=schema,
        fingerprints={
            "teacher": {"name": "synthetic"},
            "tokenizer": tokenizer or {"hash": "synthetic"},
            "data": {"hash": f"synthetic-{seed}"},
        },
        settings={"seed": seed, "pack": pack},
        num_shards=len(parts),
    )
    rng = np.random.default_rng(seed)
    first = 0
    for shard, lengths in enumerate(parts):
        seqs = [
            _sequence(s, rng, targets_on, pack, tail, masked)
            for s in synthetic_block(rng, lengths, schema, first_sample_id=first)
        ]
        first += len(lengths)
        writer = PartWriter.open(path, ident, shard_index=shard)
        writer.add_block(Block.from_sequences(seqs, schema))
        writer.commit()
    finalize(path)
    return path


def _sequence(
    s: Sequence, rng: np.random.Generator, targets_on: str, pack: bool, tail: str, masked: bool
) -> Sequence:
    T = len(s.input_ids)
    # input ids drawn independently of the top-k (synthetic rows hold ids[:, 0] as input)
    ids = rng.integers(0, int(s.topk_ids.max()) + 1, size=T).astype(s.input_ids.dtype)
    mask = np.ones(T, np.uint8)
    if targets_on == "mask" or masked:
        mask = (rng.random(T) < 0.6).astype(np.uint8)
    keep = mask.astype(bool) if targets_on == "mask" else slice(None)
    docs = np.zeros(1, np.int32)
    if pack and T > 2:
        extra = rng.choice(np.arange(1, T), size=min(2, T - 1), replace=False)
        docs = np.unique(np.concatenate([[0], extra])).astype(np.int32)
    topk_ids, logprobs, log_tail = s.topk_ids[keep], s.topk_logprobs[keep], s.log_tail[keep]
    if np.isneginf(log_tail).all():  # k == vocabulary: the k entries are the whole distribution
        lp = logprobs.astype(np.float64)
        logprobs = (lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))).astype(logprobs.dtype)
        # synthetic_rows repeats ids when k is near the vocabulary (_make_distinct can push ranks
        # below 0): every row gets a permutation of the vocabulary instead.
        topk_ids = np.argsort(rng.random(topk_ids.shape), axis=1).astype(topk_ids.dtype)
    if tail == "nan":
        log_tail = np.full_like(log_tail, np.nan)
    return Sequence(
        sample_id=s.sample_id,
        input_ids=ids,
        loss_mask=mask,
        doc_starts=docs,
        topk_ids=topk_ids,
        topk_logprobs=logprobs,
        log_tail=log_tail,
    )


def lengths(n: int, seed: int = 0, lo: int = 3, hi: int = 17) -> list[int]:
    return np.random.default_rng(seed).integers(lo, hi, size=n).tolist()


def config(cache: Path, out: Path, **overrides) -> TrainConfig:
    """A run that takes a second or two on a CPU: a nano student, a few steps of 4 sequences."""
    settings = dict(
        student="nano",
        steps=6,
        batch_size=4,
        warmup=2,
        lr=3e-3,
        eval_fraction=0.2,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=3,
        device="cpu",
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(cache=str(cache), out=str(out), **settings)


def student_params(run: Path) -> dict[str, torch.Tensor]:
    """The trained built-in student's weights (RUN/student/model.pt)."""
    from kdcache.stages.models.gpt import load_checkpoint

    model, _ = load_checkpoint(run / "student" / "model.pt")
    return model.state_dict()


def assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def step_rows(run: Path) -> list[list[str]]:
    """steps.tsv as rows (step, loss, lr, tokens), without the wall-clock column."""
    lines = (run / "steps.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "loss", "lr", "tokens", "seconds"]
    return [line.split("\t")[:4] for line in lines[1:]]


# -- the command line ---------------------------------------------------------------------------
def kdcache_args(*args: object) -> list[str]:
    """``kdcache ARGS`` with the installed script of this environment (as a user runs it)."""
    script = Path(sys.executable).with_name("kdcache")
    return [str(script) if script.exists() else "kdcache", *map(str, args)]


def one_thread_env() -> dict:
    """This environment with one intra-op thread: tiny models on a shared CPU run many times
    faster so, and every process of a comparison computes the same way."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def kdcache(
    *args: object, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``kdcache ARGS`` to completion (one thread unless env says otherwise)."""
    return subprocess.run(
        kdcache_args(*args),
        capture_output=True,
        text=True,
        env=env or one_thread_env(),
        timeout=timeout,
    )


def train_args(cache: Path, out: Path, **options) -> list[str]:
    """``train --cache C --out O`` + options (``steps=6`` -> ``--steps 6``; True: a flag)."""
    opts = dict(student="nano", steps=6, batch_size=4, warmup=2, device="cpu")
    opts.update(options)
    args = ["train", "--cache", str(cache), "--out", str(out), "--no-progress"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and one ``kdcache: error:`` line on stderr (no traceback) naming ``needles``."""
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("kdcache: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    return {
        **one_thread_env(),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
    }


def launch_ranks(args: list, world: int, env: dict | None = None) -> list[subprocess.Popen]:
    """Start ``kdcache ARGS`` on ``world`` ranks the way torchrun starts them."""
    port = free_port()
    return [
        subprocess.Popen(
            kdcache_args(*args),
            env={**rank_env(rank, world, port), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def run_ranks(
    args: list, world: int = 2, env: dict | None = None
) -> list[subprocess.CompletedProcess]:
    """Run ``kdcache ARGS`` on ``world`` ranks to the end: each rank's result."""
    procs = launch_ranks(args, world, env)
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outs)
    ]


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll until predicate() holds (True), or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()

"""Data parallel on this machine: one process against 2 gloo ranks under DDP and FSDP2.

    python benchmarks/ddp_bench.py [--steps 30] [--size micro]

Trains the same built-in student on the same synthetic cache (vocabulary 4,096, sequences of
256 tokens, global batch 8, grad-accum 2) with ``kdcache train`` as one process and as 2 ranks
(started as torchrun starts them, one thread each), and prints tokens/s from each run's
metrics.json and the largest weight difference from the one-process run. On a 2-core CPU the
figure is about correctness and the engines' overhead, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdcache.stages.models.gpt import load_checkpoint
from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import write_cache

KDCACHE = str(Path(sys.executable).with_name("kdcache"))


def make_cache(path: Path, n: int = 256, seq_len: int = 256) -> None:
    schema = CacheSchema(k=32, vocab_size=4096)
    block = synthetic_block(np.random.default_rng(0), [seq_len] * n, schema)
    ident = CacheIdentity(
        backend="zarr", schema=schema, fingerprints={}, settings={"seq_len": seq_len}
    )
    write_cache(path, ident, [block])


def train(cache: Path, out: Path, steps: int, size: str, world: int, parallel: str) -> dict:
    args = [KDCACHE, "train", "--cache", str(cache), "--out", str(out), "--student", size]
    args += ["--steps", str(steps), "--batch-size", "8", "--grad-accum", "2", "--warmup", "2"]
    args += ["--eval-fraction", "0", "--device", "cpu", "--no-progress", "--parallel", parallel]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            args,
            env={
                **env,
                "MASTER_PORT": str(port),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(world),
            },
            stdout=subprocess.DEVNULL,
        )
        for r in range(world)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit(f"{parallel} on {world} rank(s) failed")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", default="micro")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_cache(tmp / "c")
        runs = {
            "one process": (1, "none"),
            "2 ranks, ddp": (2, "ddp"),
            "2 ranks, fsdp": (2, "fsdp"),
        }
        base = None
        print(
            f"student {args.size}, {args.steps} steps of 8 x 256 tokens, vocabulary 4,096, gloo, 1 thread per rank:"
        )
        for name, (world, parallel) in runs.items():
            out = tmp / parallel
            m = train(tmp / "c", out, args.steps, args.size, world, parallel)
            params = load_checkpoint(out / "student" / "model.pt")[0].state_dict()
            base = base or params
            diff = max(float((params[k] - base[k]).abs().max()) for k in base)
            print(
                f"  {name:>14}: {m['tokens_per_second']:8,.0f} tokens/s, loss {m['train_loss']:.5f}, max |weight - one process| {diff:.2e}"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

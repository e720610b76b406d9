"""Dask benchmark: stage one on a LocalCluster of workers against one process, same data.

Same teacher (the built-in GPT at ``--size``, random init: speed does not depend on the
weights), same documents (the built-in corpus), same settings and the same ``--num-shards``
parts, three ways:

  (a) one process: ``run_local``, every part in order, at ``--cpu-threads`` torch threads;
  (b) Dask, end to end: ``run_dask`` making its own LocalCluster of ``--workers`` worker
      processes (default: cores / --cpu-threads; what ``kdcache cache --executor dask`` does),
      each computing at the same --cpu-threads: includes starting the workers and loading the
      teacher once per worker;
  (c) Dask on a running cluster (started before the clock, as with ``--scheduler``).

Prints tokens/s of each (whole run, from start to manifest; teacher loads included) and the
ratios (b)/(a), (c)/(a); checks that all three caches are equal part by part.

    python benchmarks/dask_bench.py                        # 1 thread, 1 worker per core, mini teacher
    python benchmarks/dask_bench.py --workers 4 --docs 100 --num-shards 16 --size micro
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from kdcache.pipeline.corpus import builtin_corpus
from kdcache.pipeline.executors import run_dask, run_local
from kdcache.pipeline.executors.base import available_cpus
from kdcache.stages.capture import CaptureConfig
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import (
    make_tokenizer_info,
    save_tokenizer,
    train_builtin_tokenizer,
)
from kdcache.storage.reader import CacheReader


def build_inputs(tmp: Path, args) -> tuple[Path, Path]:
    docs = builtin_corpus("train", max_files=args.docs)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    teacher = tmp / "teacher"
    tok = train_builtin_tokenizer([d.text for d in docs[:200]], vocab_size=args.vocab)
    save_tokenizer(make_tokenizer_info(tok), teacher)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size(args.size, tok.get_vocab_size(), args.seq_len))
    save_checkpoint(model, teacher / "model.pt")
    return teacher, data


def same_parts(a: Path, b: Path) -> bool:
    ra, rb = CacheReader(a), CacheReader(b)
    return [p["tokens_sha256"] for p in ra.manifest["parts"]] == [
        p["tokens_sha256"] for p in rb.manifest["parts"]
    ] and ra.block(0, ra.num_sequences).equals(rb.block(0, rb.num_sequences))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workers", type=int, default=None, help="Dask workers (default: cores / --cpu-threads)."
    )
    ap.add_argument(
        "--cpu-threads",
        type=int,
        default=1,
        help="Torch threads of the capture, in the single process and in every worker (recorded "
        "in the cache: the same count gives the same bits).",
    )
    ap.add_argument("--num-shards", type=int, default=4, help="Parts (Dask tasks).")
    ap.add_argument("--docs", type=int, default=12, help="Standard-library files to capture.")
    ap.add_argument("--size", default="mini", help="Built-in GPT size of the teacher.")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = available_cpus()  # taskset / cpuset aware
    workers = args.workers or max(1, cores // args.cpu_threads)
    logging.getLogger("distributed").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory(prefix="kdcache-dask-bench-") as tmp_name:
        tmp = Path(tmp_name)
        teacher, data = build_inputs(tmp, args)
        cfg = CaptureConfig(
            teacher=str(teacher),
            data=str(data),
            out=str(tmp / "local"),
            k=args.k,
            seq_len=args.seq_len,
            num_shards=args.num_shards,
            group_docs=max(1, args.docs // args.num_shards),  # every part gets documents
            device=args.device,
            cpu_threads=args.cpu_threads,
            progress=False,
        )
        local = run_local(cfg)
        dask = run_dask(replace(cfg, out=str(tmp / "dask")), workers=workers)

        from distributed import LocalCluster

        with LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster:
            warm = run_dask(replace(cfg, out=str(tmp / "warm")), scheduler=cluster)

        equal = same_parts(tmp / "local", tmp / "dask") and same_parts(tmp / "local", tmp / "warm")
        print(
            f"data: {local.positions:,} positions in {len(local.parts)} parts; teacher: built-in "
            f"GPT {args.size}, vocab {args.vocab}, k {args.k}, seq-len {args.seq_len}, {args.device}; "
            f"{cores} cores, {args.cpu_threads} torch thread(s) in the single process and in "
            f"each of {workers} Dask workers"
        )
        rows = [
            ("(a) single process", local),
            (f"(b) dask LocalCluster, {workers} workers, end to end", dask),
            (f"(c) dask on a running cluster, {workers} workers", warm),
        ]
        for name, run in rows:
            print(f"{name:<45} {run.tokens_per_second:>10,.0f} tokens/s  {run.seconds:6.1f} s")
        print(
            f"ratio (b)/(a): {dask.tokens_per_second / local.tokens_per_second:.2f}   "
            f"(c)/(a): {warm.tokens_per_second / local.tokens_per_second:.2f}   "
            f"caches equal part by part: {equal}"
        )


if __name__ == "__main__":
    main()

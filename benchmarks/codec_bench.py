"""Codec benchmark on a real teacher with a 32,000-id vocabulary: bytes per entry, error, speed.

Builds (once, kept under --workdir) the whole standard library corpus with a 32,000-id BPE
tokenizer and the built-in GPT teacher trained on it by steps (``mini``, 400 steps of 16 x 128
tokens: about 15 minutes on 2 cores), then captures its top-64 (float32 log-probs, the exact
reference) and sampled N = 16 / 64 targets over the first --positions positions of the training
text, converts each into every codec and prints, per codec: bytes per position and per stored
entry, the reconstruction KL (mean / p99 / max, nats, as recorded per part) and the read speed
on one core in storage order and in shuffled 64-sequence blocks (benchmarks/storage_bench.py's
measure, run one after another). Run pinned to one core:

    taskset -c 0 python benchmarks/codec_bench.py --workdir bench-codecs

The caches stay under WORKDIR/caches/ for ``storage_bench.py --real``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.pipeline.demo import prepare
from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain
from kdcache.storage.convert import convert_cache
from kdcache.storage.reader import CacheReader

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402
from storage_bench import bench_read  # noqa: E402

TOPK_CODECS = ["plain", "sorted-q8", "sorted-q9", "sorted-q10"]
SAMPLED_CODECS = ["plain", "sorted-counts"]


def build_teacher(work: Path, args) -> dict:
    prepare(work, max_files=None, vocab_size=args.vocab_size)
    teacher = work / "teacher"
    if not (teacher / "metrics.json").is_file():
        run_pretrain(
            PretrainConfig(
                data=str(work / "data" / "train.jsonl"),
                tokenizer=str(work / "tokenizer"),
                out=str(teacher),
                heldout=str(work / "data" / "heldout.jsonl"),
                size=args.teacher_size,
                block_size=args.seq_len,
                steps=args.teacher_steps,
                warmup=args.teacher_steps // 10,
                progress=False,
            )
        )
    return json.loads((teacher / "metrics.json").read_text())


def subset(work: Path, positions: int) -> Path:
    """The first training documents holding about ``positions`` bytes / 3.5 tokens."""
    out = work / "data" / f"first-{positions}.jsonl"
    if not out.is_file():
        lines, size = [], 0
        with open(work / "data" / "train.jsonl") as f:
            for line in f:
                lines.append(line)
                size += len(json.loads(line)["text"])
                if size > positions * 3.5:
                    break
        out.write_text("".join(lines))
    return out


def capture(work: Path, name: str, data: Path, args, **opts) -> Path:
    """The teacher's float32 targets over ``data`` (the exact reference of every codec's error)."""
    return quality.capture(work, name, data, args.seq_len, logprob_dtype="float32", **opts)["path"]


def measure(path: Path, stored_entries: float | None = None) -> dict:
    d = CacheReader(path).describe()
    per_row = stored_entries or d["k"]
    r = bench_read(path)
    err = d.get("codec_error") or {}
    return {
        **r,
        "bytes_per_entry": r["bytes_per_position"] / per_row,
        "kl_mean": err.get("kl_mean", 0.0),
        "kl_p99": err.get("kl_p99", 0.0),
        "kl_max": err.get("kl_max", 0.0),
    }


def stored_entries_per_row(path: Path) -> float:
    """Mean real (id, count) entries per row of a sampled cache: the unique ids drawn."""
    cache = CacheReader(path)
    real = rows = 0
    for block in cache.iter_blocks(block_sequences=1024):
        real += int(np.isfinite(block.topk_logprobs).sum())
        rows += block.num_rows
    return real / max(rows, 1)


def show(name: str, codec: str, r: dict) -> None:
    print(
        f"| {name} | {codec} | {r['bytes_per_position']:.1f} | {r['bytes_per_entry']:.3f} | "
        f"{r['kl_mean']:.1e} / {r['kl_p99']:.1e} / {r['kl_max']:.1e} | "
        f"{r['read_storage_order_pos_s'] / 1e3:,.0f}K | {r['read_shuffled64_pos_s'] / 1e3:,.0f}K |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench-codecs"))
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--teacher-size", default="mini")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--positions", type=int, default=500_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--topk-codecs", nargs="+", default=TOPK_CODECS)
    ap.add_argument("--sampled-codecs", nargs="+", default=SAMPLED_CODECS)
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--backends", nargs="+", default=["zarr", "arrow"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = args.workdir
    t = time.perf_counter()
    teacher = build_teacher(work, args)
    print(
        f"teacher: built-in GPT {args.teacher_size}, vocabulary {args.vocab_size:,}, "
        f"{teacher['steps']} steps, held-out CE {teacher['heldout_ce']:.3f} "
        f"({time.perf_counter() - t:.0f} s incl. building)",
        flush=True,
    )
    data = subset(work, args.positions)
    topk = capture(work, f"top{args.k}", data, args, k=args.k)
    print(f"top-{args.k}: {CacheReader(topk).num_positions:,} positions")
    print(
        "| targets | codec | B/position | B/entry | KL mean / p99 / max (nats) | read storage order | read shuffled 64-seq |"
    )
    print("|---|---|---|---|---|---|---|")
    for codec in args.topk_codecs:
        for backend in args.backends:
            show(f"top-{args.k}", f"{backend} {codec}", measure(stored(work, topk, backend, codec)))
    for n in args.samples:
        sampled = capture(work, f"sampled{n}", data, args, k=n, targets="sampled")
        entries = stored_entries_per_row(sampled)
        for codec in args.sampled_codecs:
            for backend in args.backends:
                path = stored(work, sampled, backend, codec)
                show(
                    f"sampled N={n} ({entries:.1f} stored/row)",
                    f"{backend} {codec}",
                    measure(path, entries),
                )


def stored(work: Path, source: Path, backend: str, codec: str) -> Path:
    """``source`` converted to ``backend`` and ``codec`` (once; the capture itself for zarr plain)."""
    if backend == "zarr" and codec == "plain":
        return source
    path = work / "caches" / f"{source.name}-{backend}-{codec}"
    if not (path / "manifest.json").is_file():
        convert_cache(source, path, backend, codec=codec, replace_out=True)
    return path


if __name__ == "__main__":
    main()

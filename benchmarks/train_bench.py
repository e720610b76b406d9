"""Stage-two benchmarks: the reader, the cost of a KD step, and many students from one cache.

    taskset -c 0 python benchmarks/train_bench.py reader     # positions/s as torch tensors, one core
    python benchmarks/train_bench.py step                    # KD step vs CE step: time and peak memory
    python benchmarks/train_bench.py step --vocab 151936 --seq-len 4096 --size nano   # memory at V=152k
    python benchmarks/train_bench.py students                # 3 students: from the cache vs teacher online

reader:   a 1,000,000-position cache (k=64, vocabulary 50,257, realistic synthetic outputs),
          read as shuffled batch blocks and collated to padded torch tensors on one thread, next to
          the positions/s one training step of the demo student consumes.
step:     vocabulary 32,768, 2,048 positions per sequence, k=64; the same student and batch with
          (1) plain cross-entropy on full logits, (2) kdcache's chunked cross-entropy, (3) the
          cached KD losses forward_kl, soft_ce and forward_kl_tail (chunked, through DistillStep,
          the module kdcache train runs). Each variant runs in its own process so its peak RSS
          is its own.
students: three students trained for the same steps (a) from one cache (capture time included)
          and (b) with the teacher running online (full-logit forward KL).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.stages.models.adapters import BuiltinLM
from kdcache.stages.models.gpt import GPT, GPTConfig
from kdcache.stages.train import TrainConfig, batch_loss
from kdcache.stages.train.dataset import CacheBatches
from kdcache.stages.train.losses import build_loss, loss_chunk_rows
from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import write_cache


def make_cache(path: Path, positions: int, seq_len: int, k: int, vocab: int, seed: int = 0) -> None:
    schema = CacheSchema(k=k, vocab_size=vocab)
    rng = np.random.default_rng(seed)
    n = max(1, positions // seq_len)
    blocks = [
        synthetic_block(rng, [seq_len] * min(64, n - i), schema, first_sample_id=i)
        for i in range(0, n, 64)
    ]
    ident = CacheIdentity(
        backend="zarr", schema=schema, fingerprints={}, settings={"seq_len": seq_len}
    )
    write_cache(path, ident, blocks)


def student_step_rate(
    cache: Path, size: str, vocab: int, seq_len: int, batch_size: int, loss: str, steps: int = 8
) -> float:
    """Positions per second one optimizer step of a built-in student consumes (forward+backward+AdamW)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size(size, vocab, seq_len))
    student = BuiltinLM(size, model, vocab, seq_len, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(cache=str(cache), student=size, out="/tmp/unused", loss=loss)
    loss_fn = build_loss(loss)
    batches = iter(CacheBatches(cache, batch_size=batch_size, seed=0))
    times, n = [], 0
    for i in range(steps + 2):
        b = next(batches)
        t = time.perf_counter()
        opt.zero_grad()
        batch_loss(student, loss_fn, b, cfg).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
            n = b.num_tokens
    return n / statistics.median(times)


def bench_reader(args) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        make_cache(cache, args.positions, 1024, 64, 50257)
        ds = CacheBatches(cache, batch_size=8, seed=0)
        for _ in iter(ds):  # warm the page cache
            pass
        t, n = time.perf_counter(), 0
        for batch in iter(ds):
            n += batch.num_tokens
        rate = n / (time.perf_counter() - t)
        print(
            f"reader: {n:,} positions as torch tensors (shuffled 8-sequence blocks, k=64, one thread): {rate:,.0f} positions/s"
        )
        demo = Path(tmp) / "demo-cache"
        make_cache(demo, 65536, 128, 32, 4096)
        torch.set_num_threads(2)
        step = student_step_rate(demo, "micro", 4096, 128, 16, "forward_kl")
        print(
            f"demo student (micro, vocabulary 4,096, 16 x 128 positions, forward KL) consumes {step:,.0f} positions/s "
            f"on 2 threads: reader / student = {rate / step:.1f}x"
        )


def _step_variant(
    variant: str, vocab: int, seq_len: int, k: int, size: str, steps: int, chunk_rows: int = 0
) -> dict:
    """One process, one variant: median step time and peak RSS (chunk_rows 0: the default)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "c"
        make_cache(cache, seq_len * 2, seq_len, k, vocab)
        batch = next(iter(CacheBatches(cache, batch_size=1, seed=0)))
        model = GPT(GPTConfig.from_size(size, vocab, seq_len))
        student = BuiltinLM(size, model, vocab, seq_len, None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cfg = TrainConfig(
            cache=str(cache),
            student=size,
            out=str(Path(tmp) / "run"),
            loss="ce",
            chunk_rows=chunk_rows or None,
        )
        loss_fn = build_loss("ce" if variant in ("plain_ce", "chunked_ce") else variant)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            opt.zero_grad()
            if variant == "plain_ce":
                logits = model(batch.input_ids)  # (B, T, V) float32
                loss = F.cross_entropy(
                    logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100
                )
            else:
                loss = batch_loss(student, loss_fn, batch, cfg)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "variant": variant,
            "seconds": statistics.median(times),
            "spread": (min(times), max(times)),
            "peak_rss_mb": peak / 1024,
            "base_rss_mb": base_rss / 1024,
        }


KD_LOSSES = ("forward_kl", "soft_ce", "forward_kl_tail")


def bench_step(args) -> None:
    results = {}
    for variant in ("plain_ce", "chunked_ce", *KD_LOSSES):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "_variant",
                variant,
                str(args.vocab),
                str(args.seq_len),
                "64",
                args.size,
                str(args.steps),
                str(args.chunk_rows),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["plain_ce"]
    rows = args.chunk_rows or loss_chunk_rows(args.vocab)
    logits_mb = args.seq_len * args.vocab * 4 / 2**20
    print(
        f"step cost, student {args.size}, vocabulary {args.vocab:,}, {args.seq_len} positions, k=64, "
        f"{rows} rows per loss chunk{'' if args.chunk_rows else ' (default)'}; one float32 "
        f"(T, V) logits tensor is {logits_mb:,.0f} MB:"
    )
    for name, r in results.items():
        lo, hi = r["spread"]
        print(
            f"  {name:>15}: {r['seconds'] * 1000:7.1f} ms/step (median of {args.steps}; "
            f"{lo * 1000:.0f}-{hi * 1000:.0f}), peak RSS {r['peak_rss_mb']:7.0f} MB "
            f"(after setup {r['base_rss_mb']:.0f} MB)"
        )
    ce = results["chunked_ce"]
    for name in ("chunked_ce", *KD_LOSSES):
        r = results[name]
        grown = r["peak_rss_mb"] - r["base_rss_mb"]
        print(
            f"  {name:>15}: peak above setup {grown:,.0f} MB = {grown / logits_mb:.2f} x (T, V) logits"
        )
    for name in KD_LOSSES:
        kd = results[name]
        print(
            f"  {name} / plain CE: time {kd['seconds'] / base['seconds']:.3f}x, peak memory "
            f"{kd['peak_rss_mb'] / base['peak_rss_mb']:.3f}x; / chunked CE: time "
            f"{kd['seconds'] / ce['seconds']:.3f}x, peak memory {kd['peak_rss_mb'] / ce['peak_rss_mb']:.3f}x"
        )


def bench_students(args) -> None:
    from kdcache.pipeline.corpus import builtin_corpus
    from kdcache.pipeline.executors import run_capture
    from kdcache.stages.capture import CaptureConfig
    from kdcache.stages.models.gpt import save_checkpoint
    from kdcache.stages.models.tokenizer import (
        make_tokenizer_info,
        save_tokenizer,
        train_builtin_tokenizer,
    )

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = builtin_corpus("train", max_files=args.docs)
        (tmp / "data").mkdir()
        with open(tmp / "data" / "train.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d.text}) + "\n")
        tok = train_builtin_tokenizer([d.text for d in docs], vocab_size=4096)
        save_tokenizer(make_tokenizer_info(tok), tmp / "teacher")
        torch.manual_seed(0)
        teacher = GPT(GPTConfig.from_size(args.teacher_size, tok.get_vocab_size(), 128)).eval()
        save_checkpoint(teacher, tmp / "teacher" / "model.pt")
        t = time.perf_counter()
        summary = run_capture(
            CaptureConfig(
                teacher=str(tmp / "teacher"),
                data=str(tmp / "data"),
                out=str(tmp / "cache"),
                k=32,
                seq_len=128,
                stride=128,
                progress=False,
            )
        )
        capture_s = time.perf_counter() - t
        sizes = ("nano", "micro", "nano")
        cached_s = online_s = 0.0
        for size in sizes:
            cached_s += _train(tmp / "cache", size, tok.get_vocab_size(), None, args.steps)
            online_s += _train(tmp / "cache", size, tok.get_vocab_size(), teacher, args.steps)
        print(
            f"three students ({', '.join(sizes)}), {args.steps} steps each, teacher {args.teacher_size}, "
            f"{summary.positions:,} cached positions:"
        )
        print(
            f"  from one cache: capture {capture_s:.1f}s + training {cached_s:.1f}s = {capture_s + cached_s:.1f}s"
        )
        print(f"  teacher online (full-logit forward KL): {online_s:.1f}s")
        print(f"  online / cached = {online_s / (capture_s + cached_s):.2f}x")


def _train(cache: Path, size: str, vocab: int, teacher: GPT | None, steps: int) -> float:
    """Seconds for `steps` optimizer steps of batch 16 x 128: cached forward KL, or online KD."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size(size, vocab, 128))
    student = BuiltinLM(size, model, vocab, 128, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(cache=str(cache), student=size, out="/tmp/unused")
    loss_fn = build_loss("forward_kl")
    ds = CacheBatches(cache, batch_size=16, seed=0)
    batches = (b for epoch in range(10**6) if ds.set_position(epoch, 0) is None for b in iter(ds))
    t = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        opt.zero_grad()
        if teacher is None:
            loss = batch_loss(student, loss_fn, batch, cfg)
        else:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(batch.input_ids).float(), -1)
            s_logp = F.log_softmax(model(batch.input_ids).float(), -1)
            kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)
            loss = kl[batch.valid].mean()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_variant":
        v, vocab, seq_len, k, size, steps, rows = sys.argv[2:9]
        print(
            json.dumps(
                _step_variant(v, int(vocab), int(seq_len), int(k), size, int(steps), int(rows))
            )
        )
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reader")
    r.add_argument("--positions", type=int, default=1_000_000)
    s = sub.add_parser("step")
    s.add_argument("--vocab", type=int, default=32768)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--size", default="micro")
    s.add_argument("--steps", type=int, default=3)
    s.add_argument(
        "--chunk-rows", type=int, default=0, help="rows per loss chunk (0: kdcache's default)"
    )
    m = sub.add_parser("students")
    m.add_argument("--docs", type=int, default=40)
    m.add_argument("--steps", type=int, default=100)
    m.add_argument("--teacher-size", default="mini")
    args = ap.parse_args()
    {"reader": bench_reader, "step": bench_step, "students": bench_students}[args.what](args)


if __name__ == "__main__":
    main()

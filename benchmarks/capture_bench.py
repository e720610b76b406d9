"""Capture benchmark: is writing hidden behind the teacher, and what does extraction cost?

Same teacher, same batches (the capture's own plan), interleaved in one run, ``--rounds`` times:

  (a) bare forward: the teacher's logits (B, T, V), nothing else;
  (b) forward + extraction: float32 head + top-k + tail mass on the device, in chunks;
  (c) ``kdcache cache`` end to end: (b) + copy to host + the writer thread (sequences, zstd,
      crc32c, fsync) + the final flush and commit.

Prints tokens/s of each (median over rounds), (c)/(b) and (b)/(a), and the cache's bytes per
position. Teachers: the built-in GPT at ``--size`` (random init; speed does not depend on the
weights), ``--hf-gpt2`` (a random-init Hugging Face GPT-2, 124M parameters, vocabulary 50,257:
the GPU figure), or ``--teacher`` an existing one. Data: the built-in corpus (stdlib sources).

    python benchmarks/capture_bench.py --size mini --docs 120          # CPU, demo-sized teacher
    python benchmarks/capture_bench.py --hf-gpt2 --seq-len 1024 --docs 3000 --batch-tokens 65536
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdcache.pipeline.corpus import builtin_corpus
from kdcache.pipeline.executors import run_capture
from kdcache.stages.capture import CaptureConfig, load_teacher_and_tokenizer
from kdcache.stages.capture.plan import make_batches, plan_sequences
from kdcache.stages.capture.run import teacher_rows
from kdcache.stages.models.devices import pick_device
from kdcache.stages.models.gpt import GPT, GPTConfig, save_checkpoint
from kdcache.stages.models.tokenizer import (
    make_tokenizer_info,
    save_tokenizer,
    train_builtin_tokenizer,
)


def build_inputs(tmp: Path, args) -> tuple[str, Path]:
    docs = builtin_corpus("train", max_files=args.docs)
    data = tmp / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text}) + "\n")
    if args.teacher:
        return args.teacher, data
    teacher = tmp / "teacher"
    tok = train_builtin_tokenizer([d.text for d in docs[:200]], vocab_size=args.vocab)
    save_tokenizer(make_tokenizer_info(tok), teacher)
    torch.manual_seed(0)
    if args.hf_gpt2:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=max(1024, args.seq_len)))
        model.save_pretrained(teacher)
    else:
        save_checkpoint(
            GPT(GPTConfig.from_size(args.size, tok.get_vocab_size(), args.seq_len)),
            teacher / "model.pt",
        )
    return str(teacher), data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(teacher, batches, device) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync(device)
    t = time.perf_counter()
    for batch in batches:
        T = max(len(s.ids) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s.ids)] = torch.from_numpy(s.ids)
        with autocast:
            teacher.logits(ids.to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - t


def forward_extract(teacher, batches, device, cfg) -> float:
    sync(device)
    t = time.perf_counter()
    for batch in batches:
        teacher_rows(teacher, batch, device, cfg, False)
    sync(device)
    return time.perf_counter() - t


def head_precision_report(teacher, batches, device, cfg) -> str:
    """How far the tf32 head moves the stored targets from the float32 head (CUDA only)."""
    same_order = same_set = rows = 0
    diffs = []
    for batch in batches:
        ids32, lp32, *_ = teacher_rows(
            teacher, batch, device, replace(cfg, head_precision="float32"), False
        )
        ids19, lp19, *_ = teacher_rows(
            teacher, batch, device, replace(cfg, head_precision="tf32"), False
        )
        rows += len(ids32)
        same_order += int((ids32 == ids19).all(dim=1).sum())
        same_set += int((ids32.sort(dim=1).values == ids19.sort(dim=1).values).all(dim=1).sum())
        match = ids32 == ids19
        diffs.append((lp32.float() - lp19.float()).abs()[match])
    d = torch.cat(diffs).float()
    return (
        f"tf32 vs float32 head over {rows:,} rows: identical top-k order {same_order / rows:.4f}, "
        f"identical top-k set {same_set / rows:.4f}, |delta log-prob| mean {d.mean():.2e}, "
        f"p99 {d.quantile(0.99) if d.numel() < 2**24 else d[: 2**24].quantile(0.99):.2e}, max {d.max():.2e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teacher", help="an existing teacher (folder, .pt, or module:factory)")
    ap.add_argument("--size", default="mini", help="built-in GPT size when no --teacher")
    ap.add_argument(
        "--hf-gpt2", action="store_true", help="random-init HF GPT-2 124M, vocabulary 50,257"
    )
    ap.add_argument("--vocab", type=int, default=4096, help="built-in tokenizer vocabulary")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--docs", type=int, default=120, help="stdlib files to capture")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="zarr")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-capture-bench-"))
    try:
        teacher_spec, data = build_inputs(tmp, args)
        cfg = CaptureConfig(
            teacher=teacher_spec,
            data=str(data),
            out=str(tmp / "cache"),
            k=args.k,
            seq_len=args.seq_len,
            batch_tokens=args.batch_tokens,
            backend=args.backend,
            device=args.device,
            progress=False,
        )
        device = pick_device(cfg.device)
        teacher, tok = load_teacher_and_tokenizer(cfg, device)
        stride = cfg.seq_len // 2
        batches = [
            b
            for _, g in plan_sequences(cfg, tok, 0, 1, cfg.seq_len, stride)
            for b in make_batches(g, cfg.batch_tokens)
        ]
        positions = sum(len(s.ids) for b in batches for s in b)
        params = sum(p.numel() for p in teacher.module.parameters())
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(
            f"teacher {Path(teacher_spec).name} ({params / 1e6:.1f}M params, vocab {teacher.vocab_size:,}) on {name} "
            f"({torch.get_num_threads()} threads); {positions:,} positions in {len(batches)} batches, k={args.k}"
        )
        forward_extract(teacher, batches[:2], device, cfg)  # warm up kernels and allocator
        bare_forward(teacher, batches[:2], device)
        precision = "tf32" if device.type == "cuda" else "float32"  # what `kdcache cache` uses
        cfg = replace(cfg, head_precision=precision)
        if device.type == "cuda":
            print(head_precision_report(teacher, batches[:4], device, cfg))
        times = {"a": [], "b": [], "b32": [], "c": []}
        bpp = 0.0
        for r in range(args.rounds):
            times["a"].append(bare_forward(teacher, batches, device))
            times["b"].append(forward_extract(teacher, batches, device, cfg))
            if device.type == "cuda":
                times["b32"].append(
                    forward_extract(
                        teacher, batches, device, replace(cfg, head_precision="float32")
                    )
                )
            out = tmp / f"cache-{r}"
            t = time.perf_counter()
            summary = run_capture(replace(cfg, out=str(out)))
            total = time.perf_counter() - t
            times["c"].append(summary.seconds)
            bpp = summary.bytes / summary.positions
            print(
                f"  round {r}: (a) {positions / times['a'][-1]:,.0f}  (b) {positions / times['b'][-1]:,.0f}  "
                f"(c) {positions / summary.seconds:,.0f} tokens/s  [(c) incl. load+tokenize {positions / total:,.0f}]"
            )
            shutil.rmtree(out)
        tps = {key: positions / statistics.median(v) for key, v in times.items() if v}
        print(
            f"tokens/s (median of {args.rounds}): (a) bare forward {tps['a']:,.0f} | (b) forward + extraction "
            f"{tps['b']:,.0f} | (c) kdcache cache {tps['c']:,.0f} || (c)/(b) = {tps['c'] / tps['b']:.3f} | "
            f"(b)/(a) = {tps['b'] / tps['a']:.3f} | {bpp:.1f} bytes/position | head {precision}"
        )
        if "b32" in tps:
            print(
                f"with a true float32 head: (b) {tps['b32']:,.0f} tokens/s, (b)/(a) = {tps['b32'] / tps['a']:.3f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

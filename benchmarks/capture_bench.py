"""Capture benchmark: is writing hidden behind the teacher, and what does extraction cost?

Same teacher, same batches (the capture's own plan), interleaved in one run, ``--rounds`` times:

  (a) bare forward: the teacher's own forward with its head, logits (B, T, V), nothing else;
  (b) forward + extraction: the body, then the head + top-k + tail mass on the device (eager
      float32 chunks, or the fused Triton kernel on CUDA: --head-kernel);
  (c) ``kdcache cache`` end to end: (b) + copy to host + the writer thread (sequences, zstd,
      crc32c, fsync) + the final flush and commit.

Prints tokens/s of each (median over rounds), (c)/(b) and (b)/(a), and the cache's bytes per
position. Teachers: the built-in GPT at ``--size`` (random init; speed does not depend on the
weights), ``--hf-gpt2`` (a random-init Hugging Face GPT-2, 124M parameters, vocabulary 50,257),
``--llama 1b|8b`` (random-init Llama-3.2-1B / Llama-3.1-8B shapes, vocabulary 128,256, built on
the GPU in bf16), or ``--teacher`` an existing one. On CUDA it also times the head alone: the
fused kernel against eager ``F.linear`` + float32 top-k on the same (n, C) x (V, C). The
teacher runs in --dtype (auto: bf16 on CUDA). Data: the built-in corpus (stdlib sources).

    python benchmarks/capture_bench.py --size mini --seq-len 128 --docs 30   # CPU, demo-sized
    python benchmarks/capture_bench.py --llama 8b --seq-len 4096 --docs 400 --batch-tokens 16384
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
from kdcache.stages.capture import CaptureConfig, load_session
from kdcache.stages.capture.extract import local_topk
from kdcache.stages.capture.plan import make_batches, plan_sequences
from kdcache.stages.capture.run import teacher_rows
from kdcache.stages.models.adapters import AUTOCAST
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
    if args.llama:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = LLAMA[args.llama]
        config = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, **shape)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(teacher)
        del model
    elif args.hf_gpt2:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=max(1024, args.seq_len)))
        model.save_pretrained(teacher)
    else:
        save_checkpoint(
            GPT(GPTConfig.from_size(args.size, tok.get_vocab_size(), args.seq_len)),
            teacher / "model.pt",
        )
    return str(teacher), data


LLAMA = {  # the published shapes of Llama-3.2-1B and Llama-3.1-8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bare_forward(session, batches) -> float:
    """The teacher's own forward with its head, in its dtype, as a user would run it."""
    device = session.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=session.cfg.dtype == AUTOCAST)
    sync(device)
    t = time.perf_counter()
    for batch in batches:
        T = max(len(s.ids) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s.ids)] = torch.from_numpy(s.ids)
        with autocast:
            session.teacher.logits(ids.to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - t


def forward_extract(session, batches, cfg) -> float:
    sync(session.device)
    t = time.perf_counter()
    for batch in batches:
        teacher_rows(session, batch, cfg)
    sync(session.device)
    return time.perf_counter() - t


@torch.inference_mode()
def head_alone(session, k: int, rows: int = 8192, rounds: int = 5) -> str:
    """The head on (rows, C) hidden states of the teacher's dtype: the fused kernel against
    eager F.linear (tf32) + float32 top-k and rest, the same candidates out (CUDA only)."""
    from kdcache.stages.capture.fused_head import fused_head_topk

    head = session.head
    w = head.weight
    h = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
    w32 = w.float()

    def eager():
        torch.backends.cuda.matmul.allow_tf32 = True
        return local_topk(torch.nn.functional.linear(h.float(), w32), k)

    times = {"eager": [], "fused": []}
    for fn in (eager, lambda: fused_head_topk(h, w, None, k, tf32=True)):
        fn()  # compile, warm up
    for _ in range(rounds):
        for name, fn in (
            ("eager", eager),
            ("fused", lambda: fused_head_topk(h, w, None, k, tf32=True)),
        ):
            sync(session.device)
            t = time.perf_counter()
            fn()
            sync(session.device)
            times[name].append(time.perf_counter() - t)
    e, f = (statistics.median(times[n]) * 1e3 for n in ("eager", "fused"))
    return (
        f"head alone, {rows:,} x {w.shape[1]:,} x {w.shape[0]:,} ({w.dtype}), k={k}: eager "
        f"{e:.2f} ms, fused {f:.2f} ms (median of {rounds}): fused / eager time {f / e:.3f}"
    )


def head_precision_report(session, batches, cfg) -> str:
    """How far the tf32 head moves the stored targets from the float32 head (CUDA only)."""
    same_order = same_set = rows = 0
    diffs = []
    for batch in batches:
        ids32, lp32, *_ = teacher_rows(
            session, batch, replace(cfg, head_precision="float32", head_kernel="eager")
        )
        ids19, lp19, *_ = teacher_rows(
            session, batch, replace(cfg, head_precision="tf32", head_kernel="eager")
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
    ap.add_argument("--llama", choices=sorted(LLAMA), help="random-init Llama shape, bf16")
    ap.add_argument("--head-kernel", default="auto", help="auto | eager | triton")
    ap.add_argument("--dtype", default="auto", help="the teacher's dtype (auto: bf16 on CUDA)")
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
            head_kernel=args.head_kernel,
            dtype=args.dtype,
            progress=False,
        )
        session = load_session(cfg, 1)
        teacher, device, cfg = session.teacher, session.device, session.cfg
        batches = [
            b
            for _, g in plan_sequences(cfg, session.tok, 0, 1, cfg.seq_len, cfg.stride)
            for b in make_batches(g, cfg.batch_tokens)
        ]
        positions = sum(len(s.ids) for b in batches for s in b)
        params = sum(p.numel() for p in teacher.module.parameters())
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(
            f"teacher {Path(teacher_spec).name} ({params / 1e6:.1f}M params, vocab {teacher.vocab_size:,}, "
            f"{cfg.dtype}) on {name} ({torch.get_num_threads()} threads); {positions:,} positions "
            f"in {len(batches)} batches, k={args.k}; head kernel {cfg.head_kernel}"
        )
        forward_extract(session, batches[:2], cfg)  # warm up kernels and allocator
        bare_forward(session, batches[:2])
        precision = cfg.head_precision  # what `kdcache cache` uses (tf32 on CUDA)
        if device.type == "cuda":
            print(head_precision_report(session, batches[:4], cfg))
            if session.head is not None:
                print(head_alone(session, args.k))
        times = {"a": [], "b": [], "b32": [], "c": []}
        bpp = 0.0
        for r in range(args.rounds):
            times["a"].append(bare_forward(session, batches))
            times["b"].append(forward_extract(session, batches, cfg))
            if device.type == "cuda":
                times["b32"].append(
                    forward_extract(
                        session,
                        batches,
                        replace(cfg, head_precision="float32", head_kernel="eager"),
                    )
                )
            out = tmp / f"cache-{r}"
            t = time.perf_counter()
            summary = run_capture(replace(cfg, out=str(out), head_kernel=args.head_kernel))
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
                f"with an eager float32 head: (b) {tps['b32']:,.0f} tokens/s, (b)/(a) = {tps['b32'] / tps['a']:.3f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

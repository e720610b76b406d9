"""Quality report: which cached targets keep online distillation's gain, per byte.

Built-in teacher and corpus; students of one size (``--student``), the same steps and seeds, from:
hard labels only; online full-logit KD (teacher live: the reference); cached top-k KD for k in
{1, 8, 32, 128} with forward KL renormalized over the top-k, forward KL with the rest bucket, soft
CE under the student's full softmax, and 0.7 soft CE + 0.3 hard-label CE; sampled targets with N
in {16, 64}. Prints (and
writes WORKDIR/quality.md, quality.json, quality.png) held-out cross-entropy (mean +- std over
seeds), expected calibration error, top-1 agreement with the teacher, bytes per position, capture
time, and the share of online KD's gain each method keeps: (CE_hard - CE_m) / (CE_hard - CE_online).

    python benchmarks/quality.py --workdir quality-run [--steps 300] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.pipeline.demo import prepare
from kdcache.pipeline.executors import run_capture
from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain
from kdcache.pipeline.report import cache_cost
from kdcache.stages.capture import CaptureConfig
from kdcache.stages.models.adapters import load_model
from kdcache.stages.train import TrainConfig, build_optimizer, evaluate, load_student, run_train
from kdcache.stages.train.dataset import CacheBatches
from kdcache.storage.reader import CacheReader


def capture(work: Path, name: str, data: Path, seq_len: int, **opts) -> dict:
    out = work / "caches" / name
    run_capture(
        CaptureConfig(
            teacher=str(work / "teacher"),
            data=str(data),
            out=str(out),
            seq_len=seq_len,
            stride=seq_len,
            progress=False,
            **opts,
        )
    )
    cost = cache_cost(out)  # capture time from the part records: a rerun reports it too
    return {
        "path": out,
        "bytes_per_position": cost["bytes"] / max(cost["positions"], 1),
        "capture_seconds": cost["capture_seconds"],
    }


def online_kd(work: Path, train_cache: Path, eval_cache: Path, args, seed: int) -> dict:
    """The reference: the teacher runs at every step; full-logit forward KL, same schedule and data."""
    cfg = TrainConfig(
        cache=str(train_cache),
        student=args.student,
        out=str(work / "runs" / f"online-{seed}"),
        steps=args.steps,
        batch_size=args.batch_size,
        warmup=args.warmup,
        seed=seed,
        lr=args.lr,
    )
    teacher = load_model(str(work / "teacher"))
    cache = CacheReader(train_cache)
    student = load_student(cfg, cache.vocab_size, args.seq_len, torch.device("cpu"))
    model = student.module
    opt, sched = build_optimizer(model, cfg)  # the same optimizer and schedule as kdcache train
    ds = CacheBatches(train_cache, batch_size=cfg.batch_size, seed=seed)
    batches = (b for epoch in range(10**6) if ds.set_position(epoch, 0) is None for b in iter(ds))
    t = time.perf_counter()
    for _ in range(cfg.steps):
        batch = next(batches)
        with torch.no_grad():
            t_logp = F.log_softmax(teacher.logits(batch.input_ids).float(), -1)
        s_logp = F.log_softmax(model(batch.input_ids).float(), -1)
        loss = (
            F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)[batch.valid].mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t
    eval_ds = CacheBatches(eval_cache, batch_size=cfg.batch_size, shuffle=False)
    return {
        **evaluate(student, iter(eval_ds), torch.device("cpu"), len(eval_ds)),
        "train_seconds": seconds,
    }


def cached_kd(
    work: Path,
    name: str,
    cache: Path,
    eval_cache: Path,
    args,
    seed: int,
    loss: str,
    alpha: float | None = None,
) -> dict:
    m = run_train(
        TrainConfig(
            cache=str(cache),
            student=args.student,
            out=str(work / "runs" / f"{name}-{seed}"),
            loss=loss,
            alpha=alpha,
            steps=args.steps,
            batch_size=args.batch_size,
            warmup=args.warmup,
            lr=args.lr,
            seed=seed,
            eval_cache=str(eval_cache),
            eval_every=args.steps,
            eval_batches=10**6,
            checkpoint_every=args.steps,
            progress=False,
        )
    )
    return {**m["eval"], "train_seconds": m["train_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("quality-run"))
    ap.add_argument("--max-files", type=int, default=60)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--teacher-size", default="mini")
    ap.add_argument("--teacher-seconds", type=float, default=150)
    ap.add_argument("--student", default="nano")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = args.workdir
    prepare(work, max_files=args.max_files, vocab_size=args.vocab_size)
    train, heldout = work / "data" / "train.jsonl", work / "data" / "heldout.jsonl"
    if not (work / "teacher" / "model.pt").is_file():
        run_pretrain(
            PretrainConfig(
                data=str(train),
                tokenizer=str(work / "tokenizer"),
                out=str(work / "teacher"),
                heldout=str(heldout),
                size=args.teacher_size,
                block_size=args.seq_len,
                steps=10**6,
                max_seconds=args.teacher_seconds,
                progress=False,
            )
        )
    teacher_ce = json.loads((work / "teacher" / "metrics.json").read_text())["heldout_ce"]
    eval_cache = capture(work, "heldout-k128", heldout, args.seq_len, k=128)["path"]
    caches = {
        f"top{k}": capture(work, f"top{k}", train, args.seq_len, k=k) for k in (1, 8, 32, 128)
    }
    caches.update(
        {
            f"sampled{n}": capture(work, f"sampled{n}", train, args.seq_len, targets="sampled", k=n)
            for n in (16, 64)
        }
    )

    methods = {"hard labels": ("top128", "ce", None), "online KD (teacher live)": None}
    for k in (1, 8, 32, 128):
        methods[f"top-{k} forward KL"] = (f"top{k}", "forward_kl", None)
        methods[f"top-{k} forward KL + rest bucket"] = (f"top{k}", "forward_kl_tail", None)
        methods[f"top-{k} soft CE"] = (f"top{k}", "soft_ce", None)
        # 0.7 soft CE + 0.3 hard-label CE: the labels teach what the top-k leaves out
        methods[f"top-{k} soft CE, alpha 0.7"] = (f"top{k}", "soft_ce", 0.7)
    for n in (16, 64):
        methods[f"sampled N={n}"] = (f"sampled{n}", "soft_ce", None)
    results = {}
    for name, spec in methods.items():
        runs = []
        for seed in args.seeds:
            if spec is None:
                runs.append(online_kd(work, caches["top128"]["path"], eval_cache, args, seed))
            else:
                cache, loss, alpha = spec
                runs.append(
                    cached_kd(
                        work,
                        name.replace(" ", "_").replace("=", ""),
                        caches[cache]["path"],
                        eval_cache,
                        args,
                        seed,
                        loss,
                        alpha,
                    )
                )
            print(f"{name} seed {runs[-1] and seed}: CE {runs[-1]['ce']:.4f}", flush=True)
        results[name] = {"runs": runs, "cache": None if spec is None else spec[0]}

    def stat(name: str, key: str) -> tuple[float, float]:
        v = [r[key] for r in results[name]["runs"]]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    ce_hard, ce_online = stat("hard labels", "ce")[0], stat("online KD (teacher live)", "ce")[0]
    lines = [
        f"students: {args.student}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, seeds {args.seeds}; "
        f"teacher {args.teacher_size} (held-out CE {teacher_ce:.3f}); held-out: the teacher's top-128 on held-out files",
        "",
        "| method | held-out CE (mean ± std) | ECE | top-1 agreement | kept share of online KD's gain | bytes/position | capture time |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    for name in methods:
        ce, sd = stat(name, "ce")
        ece, top1 = stat(name, "ece")[0], stat(name, "top1_agreement")[0]
        share = (
            (ce_hard - ce) / (ce_hard - ce_online)
            if not math.isclose(ce_hard, ce_online)
            else float("nan")
        )
        cache = caches.get(results[name]["cache"]) if results[name]["cache"] else None
        bpp = (
            "—" if cache is None or name == "hard labels" else f"{cache['bytes_per_position']:.1f}"
        )
        cap = "—" if cache is None or name == "hard labels" else f"{cache['capture_seconds']:.0f} s"
        lines.append(
            f"| {name} | {ce:.4f} ± {sd:.4f} | {ece:.4f} | {top1:.3f} | {share:.2f} | {bpp} | {cap} |"
        )
        table[name] = {
            "ce_mean": ce,
            "ce_std": sd,
            "ece": ece,
            "top1_agreement": top1,
            "kept_share": share,
            "bytes_per_position": None if cache is None else cache["bytes_per_position"],
        }
    md = "\n".join(lines)
    print(md)
    (work / "quality.md").write_text(md + "\n")
    (work / "quality.json").write_text(
        json.dumps({"table": table, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, r in table.items():
            if r["bytes_per_position"] is not None and name != "hard labels":
                ax.errorbar(r["bytes_per_position"], r["ce_mean"], yerr=r["ce_std"], fmt="o")
                ax.annotate(name, (r["bytes_per_position"], r["ce_mean"]), fontsize=7)
        ax.axhline(ce_hard, linestyle="--", color="gray", label="hard labels")
        ax.axhline(ce_online, linestyle=":", color="black", label="online KD")
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per position (log)")
        ax.set_ylabel("student held-out cross-entropy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(work / "quality.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()

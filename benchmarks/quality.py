"""Quality report: which cached targets keep online distillation's gain, per byte, with intervals.

Built-in teacher (trained by steps) and corpus; students of one size (``--student``), the same
steps, and **paired seeds**: for one seed every method starts from the same student
initialization and reads the same data order (``kdcache train --seed`` fixes both; online KD
reads the same cache order), so the differences between methods are measured within a seed and
the seed-to-seed spread of the student itself cancels.

Rows: hard labels only; online full-logit KD (teacher live: the reference); cached top-k for k in
{8, 32, 128} with ``soft_ce`` (the student's full softmax against the renormalized top-k) alone
and mixed with hard labels (0.7 soft CE + 0.3 CE); sampled targets N in {8, 16, 64} (lossless
``sorted-counts`` codec); and the best top-k setting stored with a compact codec (``--codec``).

Per seed s and method m: kept_s = (CE_hard,s - CE_m,s) / (CE_hard,s - CE_online,s); the table
gives its mean over seeds and a 95% Student-t interval from those paired values, and checks that
the paired gap CE_hard - CE_online is at least 5x its standard deviation across seeds (else the
kept shares mean little: train longer). Every finished run is kept under WORKDIR/runs/ with its
result, so a rerun (more seeds, a new row) trains only what is missing. Prints and writes
WORKDIR/quality.md, quality.json, quality.png, and what the table cost on this machine.

    python benchmarks/quality.py --workdir quality-run [--steps 300] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.pipeline.demo import FULL, prepare
from kdcache.pipeline.executors import run_capture
from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain
from kdcache.pipeline.report import cache_cost
from kdcache.stages.capture import CaptureConfig
from kdcache.stages.models.adapters import load_model
from kdcache.stages.train import TrainConfig, build_optimizer, evaluate, load_student, run_train
from kdcache.stages.train.dataset import CacheBatches
from kdcache.storage.reader import CacheReader

# Student-t 0.975 quantiles by degrees of freedom (two-sided 95% intervals); normal beyond 30.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179]
T975 += [2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064]
T975 += [2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its two-sided 95% Student-t interval."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    t = T975[len(values) - 2] if len(values) - 1 <= len(T975) else 1.960
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


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


def train_config(work: Path, run: str, cache: Path, eval_cache: Path, args, seed: int, **kw):
    return TrainConfig(
        cache=str(cache),
        student=args.student,
        out=str(work / "runs" / run),
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
        **kw,
    )


def online_kd(cfg: TrainConfig, teacher_dir: Path, seq_len: int) -> dict:
    """The reference: the teacher runs at every step; full-logit forward KL, the same optimizer,
    schedule, initialization and data order as ``kdcache train`` with this config."""
    teacher = load_model(str(teacher_dir))
    cache = CacheReader(cfg.cache)
    student = load_student(cfg, cache.vocab_size, seq_len, torch.device("cpu"))
    model = student.module
    opt, sched = build_optimizer(model, cfg)
    ds = CacheBatches(cfg.cache, batch_size=cfg.batch_size, seed=cfg.seed)
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
    eval_ds = CacheBatches(cfg.eval_cache, batch_size=cfg.batch_size, shuffle=False)
    return {
        **evaluate(student, iter(eval_ds), torch.device("cpu"), len(eval_ds)),
        "train_seconds": seconds,
    }


def run_once(work: Path, method: str, spec, caches: dict, eval_cache: Path, args, seed: int):
    """One (method, seed) run, or its kept result from an earlier invocation."""
    run = method.replace(" ", "_").replace("=", "").replace(",", "").replace("/", "-")
    run = f"{run}-{args.student}-{args.steps}x{args.batch_size}-seed{seed}"  # what it trained
    done = work / "runs" / f"{run}.json"
    if done.is_file():
        return json.loads(done.read_text())
    done.parent.mkdir(parents=True, exist_ok=True)
    try:  # another invocation on the same workdir (--reverse) may be training this run
        os.close(os.open(done.with_suffix(".claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None
    try:
        result = train_once(work, run, spec, caches, eval_cache, args, seed)
    except BaseException:
        done.with_suffix(".claim").unlink()  # a failed run is free for the next invocation
        raise
    done.write_text(json.dumps(result))
    return result


def train_once(work: Path, run: str, spec, caches: dict, eval_cache: Path, args, seed: int):
    if spec is None:  # online KD: the top-128 cache only gives it the data order
        cfg = train_config(work, run, caches["top128"]["path"], eval_cache, args, seed)
        return online_kd(cfg, work / "teacher", args.seq_len)
    cache, loss, alpha = spec
    cfg = train_config(
        work, run, caches[cache]["path"], eval_cache, args, seed, loss=loss, alpha=alpha
    )
    m = run_train(cfg)
    return {**m["eval"], "train_seconds": m["train_seconds"]}


def build_teacher(work: Path, args) -> float:
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
                steps=args.teacher_steps,
                progress=False,
            )
        )
    return json.loads((work / "teacher" / "metrics.json").read_text())["heldout_ce"]


def methods_of(codec: str) -> dict:
    """Row name -> (cache name, loss, alpha), or None for online KD."""
    rows = {"hard labels": ("top128", "ce", None), "online KD (teacher live)": None}
    for k in (8, 32, 128):
        rows[f"top-{k} soft CE"] = (f"top{k}", "soft_ce", None)
        # 0.7 soft CE + 0.3 hard-label CE: the labels teach what the top-k leaves out
        rows[f"top-{k} soft CE, alpha 0.7"] = (f"top{k}", "soft_ce", 0.7)
    rows[f"top-128 soft CE, alpha 0.7, {codec}"] = (f"top128-{codec}", "soft_ce", 0.7)
    for n in (8, 16, 64):
        rows[f"sampled N={n}"] = (f"sampled{n}", "soft_ce", None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("quality-run"))
    ap.add_argument("--max-files", type=int, default=FULL.max_files)
    ap.add_argument("--vocab-size", type=int, default=FULL.vocab_size)
    ap.add_argument("--teacher-size", default=FULL.teacher_size)
    ap.add_argument("--teacher-steps", type=int, default=FULL.teacher_steps)
    ap.add_argument("--student", default="nano")
    ap.add_argument("--seq-len", type=int, default=FULL.block_size)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--codec", default="sorted-q9", help="the compact top-k codec of its row")
    ap.add_argument(
        "--reverse", action="store_true", help="train the rows last to first (a second invocation)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(2)  # the captures record it: every invocation captures alike
    t_start = time.perf_counter()
    work = args.workdir
    prepare(work, max_files=args.max_files, vocab_size=args.vocab_size)
    train, heldout = work / "data" / "train.jsonl", work / "data" / "heldout.jsonl"
    teacher_ce = build_teacher(work, args)
    eval_cache = capture(work, "heldout-k128", heldout, args.seq_len, k=128)["path"]
    caches = {f"top{k}": capture(work, f"top{k}", train, args.seq_len, k=k) for k in (8, 32, 128)}
    caches[f"top128-{args.codec}"] = capture(
        work, f"top128-{args.codec}", train, args.seq_len, k=128, codec=args.codec
    )
    for n in (8, 16, 64):
        caches[f"sampled{n}"] = capture(
            work, f"sampled{n}", train, args.seq_len, targets="sampled", k=n, codec="sorted-counts"
        )
    methods = methods_of(args.codec)
    torch.set_num_threads(args.threads)
    results = {}
    for name, spec in reversed(methods.items()) if args.reverse else methods.items():
        results[name] = []
        for seed in args.seeds:
            results[name].append(run_once(work, name, spec, caches, eval_cache, args, seed))
            if results[name][-1] is not None:
                print(f"{name} seed {seed}: CE {results[name][-1]['ce']:.4f}", flush=True)
    if any(r is None for runs in results.values() for r in runs):
        print("runs claimed by another invocation are missing: rerun when it ends for the table")
        return
    seconds = time.perf_counter() - t_start
    table, md = summarize(results, methods, caches, args, teacher_ce, seconds)
    print(md)
    (work / "quality.md").write_text(md + "\n")
    (work / "quality.json").write_text(
        json.dumps({"table": table, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2)
    )
    plot(table, work / "quality.png")


def summarize(results, methods, caches, args, teacher_ce, seconds) -> tuple[dict, str]:
    ce = {name: [r["ce"] for r in runs] for name, runs in results.items()}
    hard, online = ce["hard labels"], ce["online KD (teacher live)"]
    gaps = [h - o for h, o in zip(hard, online)]
    gap_sd = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    lines = [
        f"students: {args.student}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
        f"paired seeds {args.seeds}; teacher {args.teacher_size}, {args.teacher_steps} steps "
        f"(held-out CE {teacher_ce:.3f}); held-out: the teacher's top-128 on held-out files",
        f"paired gap CE_hard - CE_online: {statistics.mean(gaps):.4f} ± {gap_sd:.4f} (sd across "
        f"seeds), {statistics.mean(gaps) / gap_sd:.1f}x its sd (needs >= 5); the whole table "
        f"(teacher, captures and every run not kept from an earlier invocation) took "
        f"{seconds / 60:.1f} min on this machine",
        "",
        "| method | held-out CE (mean ± sd) | kept (mean, 95% CI) | top-1 agreement | ECE | bytes/position | capture time |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    for name, spec in methods.items():
        kept = [(h - c) / g for h, c, g in zip(hard, ce[name], gaps)]
        k_mean, k_lo, k_hi = interval(kept)
        cache = caches.get(spec[0]) if spec and name != "hard labels" else None
        table[name] = {
            "ce": ce[name],
            "ce_mean": statistics.mean(ce[name]),
            "ce_sd": statistics.stdev(ce[name]) if len(ce[name]) > 1 else 0.0,
            "kept": kept,
            "kept_mean": k_mean,
            "kept_ci95": [k_lo, k_hi],
            "top1_agreement": statistics.mean(r["top1_agreement"] for r in results[name]),
            "ece": statistics.mean(r["ece"] for r in results[name]),
            "bytes_per_position": None if cache is None else cache["bytes_per_position"],
            "capture_seconds": None if cache is None else cache["capture_seconds"],
        }
        r = table[name]
        bpp = "—" if cache is None else f"{cache['bytes_per_position']:.1f}"
        cap = "—" if cache is None else f"{cache['capture_seconds']:.0f} s"
        lines.append(
            f"| {name} | {r['ce_mean']:.4f} ± {r['ce_sd']:.4f} | {k_mean:.3f} [{k_lo:.3f}, {k_hi:.3f}] "
            f"| {r['top1_agreement']:.3f} | {r['ece']:.4f} | {bpp} | {cap} |"
        )
    return table, "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in table.items():
        if r["bytes_per_position"] is not None:
            lo, hi = r["kept_ci95"]
            ax.errorbar(
                r["bytes_per_position"],
                r["kept_mean"],
                yerr=[[r["kept_mean"] - lo], [hi - r["kept_mean"]]],
                fmt="o",
                capsize=3,
            )
            ax.annotate(name, (r["bytes_per_position"], r["kept_mean"]), fontsize=7)
    ax.axhline(0.0, linestyle="--", color="gray", label="hard labels")
    ax.axhline(1.0, linestyle=":", color="black", label="online KD")
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per position (log)")
    ax.set_ylabel("kept share of online KD's gain (95% CI, paired seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

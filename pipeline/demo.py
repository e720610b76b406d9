"""``kdcache prepare`` and ``kdcache demo``: the main job on built-in data, no download.

The demo runs every stage on the Python standard library's own sources:

    prepare   corpus (train / held-out split by file) + a byte-level BPE tokenizer
    teacher   the built-in GPT trained on the corpus (skipped when WORKDIR/teacher exists)
    cache     the teacher run once over the training text (and once over the held-out text)
    students  from that one cache: two sizes with KD, and the small one with hard labels only
    report    quality kept, cost to deploy (measured here) and cost to make, hard labels vs KD

Every step resumes or skips what a previous run finished, all under one work directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kdcache.storage.durable import read_json, write_json_durable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and steps of one demo mode (the full one ends in <= 10 min on 2 quiet CPU cores).

    Fixed steps and a fixed torch thread count, never a time budget: two runs give the same
    numbers to the last digit, whatever else the machine is doing (only the timings differ)."""

    max_files: int | None
    vocab_size: int
    teacher_size: str
    teacher_steps: int
    threads: int  # torch threads for every stage (and recorded by the capture)
    block_size: int
    k: int
    students: tuple[tuple[str, str, str, float | None], ...]  # (run name, size, loss, alpha)
    student_steps: int
    batch_size: int


# Two sizes with KD and the small one with hard labels only. KD: 0.7 soft CE to the cached top-k
# (student's full softmax) + 0.3 hard-label CE, the best top-k setting of benchmarks/quality.py.
STUDENTS = (
    ("kd-micro", "micro", "soft_ce", 0.7),
    ("kd-nano", "nano", "soft_ce", 0.7),
    ("hard-nano", "nano", "ce", None),
)

FULL = DemoPlan(
    max_files=150,
    vocab_size=4096,
    teacher_size="mini",
    teacher_steps=460,  # what 3.5 minutes of this machine's 2 quiet cores train
    block_size=128,
    k=64,
    threads=2,
    students=STUDENTS,
    student_steps=500,
    batch_size=16,
)
QUICK = DemoPlan(
    max_files=60,
    vocab_size=2048,
    teacher_size="micro",
    teacher_steps=100,
    block_size=64,
    k=16,
    threads=2,
    students=STUDENTS,
    student_steps=40,
    batch_size=16,
)


def prepare(workdir: Path, *, max_files: int | None = None, vocab_size: int = 4096) -> dict:
    """WORKDIR/data/{train,heldout}.jsonl + corpus.json, and WORKDIR/tokenizer (trained on train)."""
    from kdcache.pipeline.corpus import write_corpus
    from kdcache.stages.capture.sources import iter_documents
    from kdcache.stages.models.tokenizer import (
        make_tokenizer_info,
        save_tokenizer,
        train_builtin_tokenizer,
    )

    data, tok_dir = workdir / "data", workdir / "tokenizer"
    description = read_json(data / "corpus.json")
    wanted = {"max_files": max_files, "vocab_size": vocab_size}
    if (
        description is None
        or description.get("demo") != wanted
        or not (tok_dir / "tokenizer.json").is_file()
    ):
        description = write_corpus(data, max_files=max_files)
        texts = [d.text for d in iter_documents(data / "train.jsonl")]
        save_tokenizer(
            make_tokenizer_info(train_builtin_tokenizer(texts, vocab_size=vocab_size)), tok_dir
        )
        description["demo"] = wanted
        write_json_durable(data / "corpus.json", description)
    return description


def run_demo(workdir: Path, *, quick: bool = False, progress: bool = True) -> dict:
    """Every stage under workdir; ends by printing the report (kdcache.pipeline.report), also
    written to WORKDIR/report/; returns it."""
    import torch

    from kdcache.pipeline.executors import run_capture
    from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain
    from kdcache.pipeline.report import build_report
    from kdcache.stages.capture import CaptureConfig
    from kdcache.stages.train import TrainConfig, run_train

    plan = QUICK if quick else FULL
    torch.set_num_threads(plan.threads)  # every stage; the capture records it (cpu_threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    say(f"prepare: stdlib corpus and a {plan.vocab_size}-token BPE tokenizer in {workdir}")
    prepare(workdir, max_files=plan.max_files, vocab_size=plan.vocab_size)
    data = workdir / "data"
    teacher = workdir / "teacher"
    teacher_metrics = read_json(teacher / "metrics.json")
    if teacher_metrics is None or not (teacher / "model.pt").is_file():
        say(f"teacher: training the built-in GPT ({plan.teacher_size}) on the corpus")
        teacher_metrics = run_pretrain(
            PretrainConfig(
                data=str(data / "train.jsonl"),
                tokenizer=str(workdir / "tokenizer"),
                out=str(teacher),
                heldout=str(data / "heldout.jsonl"),
                size=plan.teacher_size,
                block_size=plan.block_size,
                steps=plan.teacher_steps,
                progress=progress,
            )
        )
    else:
        say(f"teacher: reusing {teacher}")
    caches = {}
    for split in ("train", "heldout"):
        say(f"cache: running the teacher once over the {split} text")
        out = workdir / ("cache" if split == "train" else "cache-heldout")
        summary = run_capture(
            CaptureConfig(
                teacher=str(teacher),
                data=str(data / f"{split}.jsonl"),
                out=str(out),
                k=plan.k,
                seq_len=plan.block_size,
                stride=plan.block_size,  # plain chunks, as the teacher was trained
                replace=True,
                progress=progress,
            )
        )
        say("  " + summary.line())
        caches[split] = out
    runs = []
    for name, size, loss, alpha in plan.students:
        mix = loss if alpha is None else f"{alpha:g} {loss} + {1 - alpha:g} hard-label CE"
        say(f"student {name}: {size} with {mix} from the cache")
        run_train(
            TrainConfig(
                cache=str(caches["train"]),
                student=size,
                out=str(workdir / "runs" / name),
                loss=loss,
                alpha=alpha,
                steps=plan.student_steps,
                batch_size=plan.batch_size,
                warmup=max(1, plan.student_steps // 10),
                eval_cache=str(caches["heldout"]),
                eval_every=max(1, plan.student_steps // 5),
                eval_batches=10_000,
                checkpoint_every=max(1, plan.student_steps // 2),
                progress=progress,
            )
        )
        runs.append(workdir / "runs" / name)
    say(f"report: quality, cost to deploy (measured here), cost to make -> {workdir / 'report'}")
    report = build_report(runs, teacher=teacher, out=workdir / "report", speed_seconds=1.0)
    print(report["markdown"])
    say(f"done in {time.perf_counter() - t_start:.0f} s")
    return report

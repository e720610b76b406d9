"""``kdcache train``: stage two. Choices and defaults come from TrainConfig and the loss
registry."""

from __future__ import annotations

import os
from pathlib import Path

import click

from kdcache.stages.train.config import TrainConfig
from kdcache.stages.train.distributed import PARALLEL
from kdcache.stages.train.losses import LOSSES


@click.command()
@click.option(
    "--cache",
    required=True,
    type=click.Path(path_type=Path),
    help="The teacher cache to train from (the teacher is never loaded).",
)
@click.option(
    "--student",
    required=True,
    help="A built-in GPT size (nano, micro, mini, small, base), a Hugging Face config folder (random init) or model folder, a built-in checkpoint, or module:factory.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory: config.json, steps.tsv, eval.tsv, metrics.json, checkpoints/, student/.",
)
@click.option(
    "--loss",
    type=click.Choice(list(LOSSES)),
    default=TrainConfig.loss,
    show_default=True,
    help="forward_kl: KL between teacher and student, both renormalized over the top-k; "
    "forward_kl_tail: KL over the top-k plus a rest bucket (the stored tail mass); soft_ce: "
    "cross-entropy to the cached targets with the student's full softmax (the only KD loss for "
    "--targets sampled caches; on top-k caches the teacher renormalized over its top-k); "
    "reverse_kl; jsd; ce: hard labels only.",
)
@click.option(
    "--alpha", type=float, default=None, help="Mix: alpha * KD + (1 - alpha) * hard-label CE."
)
@click.option(
    "--temperature",
    type=float,
    default=TrainConfig.temperature,
    show_default=True,
    help="Re-temper the cached top-k (loss scaled by T^2).",
)
@click.option("--k", type=int, default=None, help="Use only the first k' <= cached k entries.")
@click.option(
    "--beta", type=float, default=TrainConfig.beta, show_default=True, help="JSD mixing weight."
)
@click.option(
    "--steps", type=int, default=TrainConfig.steps, show_default=True, help="Optimizer steps."
)
@click.option(
    "--batch-size",
    type=int,
    default=TrainConfig.batch_size,
    show_default=True,
    help="Sequences per optimizer step (global: all ranks and accumulation steps).",
)
@click.option(
    "--grad-accum",
    type=int,
    default=TrainConfig.grad_accum,
    show_default=True,
    help="Micro-batches per optimizer step.",
)
@click.option(
    "--lr",
    type=float,
    default=TrainConfig.lr,
    show_default=True,
    help="Peak learning rate (AdamW).",
)
@click.option(
    "--min-lr",
    type=float,
    default=None,
    help="Learning rate at the end of the cosine decay (default: --lr / 10).",
)
@click.option(
    "--warmup",
    type=int,
    default=TrainConfig.warmup,
    show_default=True,
    help="Linear warmup steps, then cosine decay to --min-lr.",
)
@click.option(
    "--weight-decay",
    type=float,
    default=TrainConfig.weight_decay,
    show_default=True,
    help="AdamW weight decay (matrices only).",
)
@click.option(
    "--clip",
    type=float,
    default=TrainConfig.clip,
    show_default=True,
    help="Gradient norm clipping (0: off).",
)
@click.option(
    "--seed",
    type=int,
    default=TrainConfig.seed,
    show_default=True,
    help="Seed of the student init and the data order.",
)
@click.option(
    "--eval-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="A second cache to evaluate on (default: a held-out slice of --cache).",
)
@click.option(
    "--eval-fraction",
    type=float,
    default=TrainConfig.eval_fraction,
    show_default=True,
    help="Share of batches held out for evaluation.",
)
@click.option(
    "--eval-every",
    type=int,
    default=TrainConfig.eval_every,
    show_default=True,
    help="Steps between evaluations.",
)
@click.option(
    "--eval-batches",
    type=int,
    default=TrainConfig.eval_batches,
    show_default=True,
    help="Batches of the held-out data per evaluation.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=TrainConfig.checkpoint_every,
    show_default=True,
    help="Steps between checkpoints (a rerun resumes from the last).",
)
@click.option(
    "--chunk-rows",
    type=int,
    default=None,
    help="Rows of student logits alive at once in the loss (lower: less memory, same result); "
    "default: a 256 MiB budget divided by the student's vocabulary (e.g. 147 rows at 151,936 "
    "ids, 699 at 32,000, at most 4,096).",
)
@click.option(
    "--block-size",
    type=int,
    default=None,
    help="Context of a built-in student (default: the cache's sequence length).",
)
@click.option(
    "--tokenizer",
    default=None,
    help="The student's tokenizer, if it ships none (compared with the cache's).",
)
@click.option(
    "--tokenizer-check",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="off: train even if the student's tokenizer differs from the cache's or cannot be compared (a warning is logged).",
)
@click.option(
    "--device", default=TrainConfig.device, show_default=True, help="auto, cpu, cuda or cuda:N."
)
@click.option(
    "--replace",
    is_flag=True,
    default=TrainConfig.replace,
    help="If OUT holds a run trained with other settings, delete it and start over (a matching "
    "run is still resumed from its checkpoint); the DVC stage passes it.",
)
@click.option(
    "--parallel",
    type=click.Choice(PARALLEL),
    default=TrainConfig.parallel,
    show_default=True,
    help="The engine under torchrun: ddp (a whole student per rank, gradients all-reduced "
    "overlapping the backward pass, on the last accumulation micro-step only), fsdp (FSDP2: "
    "parameters, gradients and AdamW state sharded over the ranks per transformer block, for a "
    "student that does not fit one device; bf16 parameters on CUDA), auto (ddp if a replica "
    "with its AdamW state fits in half a GPU, else fsdp; ddp on CPU), none (one process).",
)
@click.option(
    "--activation-checkpointing",
    is_flag=True,
    default=TrainConfig.activation_checkpointing,
    help="Recompute each transformer block's activations in the backward pass instead of "
    "keeping them: much less memory for long sequences, about a third more compute.",
)
@click.option(
    "--no-progress", is_flag=True, help="No progress bar (the summary line is still printed)."
)
def train(**opts) -> None:
    """Train a student from CACHE alone: the teacher is never loaded.

    Rerun the same command to resume from the last committed checkpoint (on any number of
    ranks). Under torchrun (``torchrun --nproc_per_node 8 $(which kdcache) train ...``) every
    rank takes its share of each global batch."""
    from kdcache.stages.train import TrainConfig, run_train

    opts["tokenizer_check"] = opts["tokenizer_check"] == "on"
    opts["progress"] = not opts.pop("no_progress")
    for key in ("cache", "out", "eval_cache"):
        opts[key] = None if opts[key] is None else str(opts[key])
    m = run_train(TrainConfig(**opts))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun one line, from rank 0
    ev = m["eval"]
    held_out = (
        "no held-out evaluation (nothing was held out)"
        if ev is None
        else f"held-out CE {ev['ce']:.4f}, KL to teacher top-k {ev['kl_topk']:.4f}, "
        f"top-1 agreement {ev['top1_agreement']:.3f}"
    )
    resumed = f" (resumed at step {m['resumed_at_step']})" if m["resumed_at_step"] else ""
    click.echo(
        f"{opts['out']}: {m['steps']} steps{resumed}, {m['tokens']:,} tokens, "
        f"{m['tokens_per_second']:,.0f} tokens/s; {held_out}"
    )


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to write the student to: a Hugging Face folder (save_pretrained) for a Hugging "
    "Face student, a kdcache GPT folder for a built-in one.",
)
@click.option(
    "--step",
    type=int,
    default=None,
    help="The checkpoint's step (default: the newest committed one).",
)
def export(run: Path, out: Path, step: int | None) -> None:
    """Write the student of RUN (a kdcache train folder) from its sharded checkpoint, on one
    process, whatever number of ranks saved it."""
    from kdcache.stages.train.rundir import export_student

    folder = export_student(run, out, step)
    click.echo(f"{out}: the student of {folder}")

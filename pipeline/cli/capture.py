"""``kdcache cache``: stage one. Choices and defaults come from CaptureConfig and the
registries that implement them."""

from __future__ import annotations

from pathlib import Path

import click

from kdcache.pipeline.executors import EXECUTORS
from kdcache.stages.capture.config import (
    DEFAULT_SAMPLES,
    HEAD_KERNELS,
    HEAD_PRECISIONS,
    TARGETS_ON_OPTIONS,
    CaptureConfig,
)
from kdcache.stages.models.adapters import DTYPES
from kdcache.storage.backends import BACKENDS
from kdcache.storage.codecs import CODECS
from kdcache.storage.errors import ConfigError
from kdcache.storage.schema import LOGPROB_DTYPES, TARGET_KINDS


def _shard_index(value: str) -> int | str:
    if value == "env":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'env', got {value!r}") from None


@click.command()
@click.option(
    "--teacher",
    required=True,
    help="Teacher: a Hugging Face causal-LM folder (config.json), a built-in GPT folder (model.pt) or .pt file, or module:factory returning a torch.nn.Module (ids (B, T) -> logits (B, T, V)).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="A text file or folder of them, JSONL (text or chat messages), Parquet, or a datasets folder saved with save_to_disk.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Cache directory to write (or resume).",
)
@click.option(
    "--tokenizer",
    default=None,
    help="tokenizer.json or Hugging Face tokenizer folder; default: the teacher's own.",
)
@click.option(
    "--k", default=CaptureConfig.k, show_default=True, help="Top-k entries stored per position."
)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Tokens per sequence; default: the teacher's context, at most 2048.",
)
@click.option(
    "--stride",
    type=int,
    default=None,
    help="Step between overlapping windows of a long document; default seq-len/2; 0: long documents are an error.",
)
@click.option(
    "--pack",
    is_flag=True,
    default=CaptureConfig.pack,
    help="Join documents into full sequences, resetting attention and positions at each document boundary.",
)
@click.option(
    "--text-field",
    default=None,
    help="JSONL/Parquet field holding the text (default: text, or messages for chat).",
)
@click.option(
    "--ids-field",
    default=None,
    help="JSONL/Parquet field holding pre-tokenized ids (default: input_ids or token_ids if present).",
)
@click.option(
    "--targets-on",
    type=click.Choice(TARGETS_ON_OPTIONS),
    default=CaptureConfig.targets_on,
    show_default=True,
    help="Rows that get targets: every position, or only assistant tokens of chat data (stored only for those rows).",
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default=CaptureConfig.backend,
    show_default=True,
    help="Storage backend.",
)
@click.option(
    "--logprob-dtype",
    type=click.Choice(LOGPROB_DTYPES),
    default=CaptureConfig.logprob_dtype,
    show_default=True,
    help="Storage type of the top-k log-probs.",
)
@click.option(
    "--targets",
    type=click.Choice(TARGET_KINDS),
    default=CaptureConfig.targets,
    show_default=True,
    help="topk: the k most likely ids per position (biased toward the head); sampled: --samples "
    "draws from the teacher per position, stored as unique ids with counts (unbiased; train with "
    "--loss soft_ce).",
)
@click.option(
    "--samples",
    type=int,
    default=DEFAULT_SAMPLES,
    show_default=True,
    help="Draws per position with --targets sampled (seeded by sample id and position).",
)
@click.option(
    "--proposal-temperature",
    type=float,
    default=CaptureConfig.proposal_temperature,
    show_default=True,
    help="With --targets sampled: draw from the teacher at this temperature (> 1 reaches further "
    "into the tail per draw, < 1 stores fewer unique ids) and store normalized importance "
    "weights count * p / p_T instead of count / N.",
)
@click.option(
    "--codec",
    type=click.Choice(list(CODECS)),
    default=CaptureConfig.codec,
    show_default=True,
    help="How the targets are stored: plain; sorted-qB: ids sorted and delta-coded, "
    "probabilities quantized to B = 8 / 9 / 10 / 12 bits (bounded error, measured and recorded; "
    "sorted-q9 keeps the KL under 1e-4 at k=64); sorted-counts: sampled targets (--targets "
    "sampled) losslessly as sorted ids and whole counts. See docs/FORMAT.md.",
)
@click.option(
    "--num-shards",
    type=int,
    default=None,
    help="Split the documents into this many parts, one job each. Default: the cache's own count "
    "when resuming (a rerun of one array task keeps the array's shape), else the size of a "
    "fresh SLURM array (--array=0-15: 16) or torchrun's WORLD_SIZE with --shard-index env, else 1.",
)
@click.option(
    "--shard-index",
    default=None,
    help="This job's part (default 0), or 'env': SLURM_ARRAY_TASK_ID (the array index is the part "
    "index, so `sbatch --array=5` reruns part 5) or torchrun's RANK. Not with --executor dask, "
    "which runs every part.",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default=EXECUTORS[0],
    show_default=True,
    help="local: this process captures part --shard-index; dask: every part of --num-shards, one "
    "task per part on a Dask cluster (each worker loads the teacher once), then finalize.",
)
@click.option(
    "--scheduler",
    default=None,
    help="With --executor dask: the address of a running Dask scheduler (tcp://host:8786); "
    "default: a LocalCluster on this machine (see docs/SCALING.md).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="With --executor dask and no --scheduler: LocalCluster workers (one task at a time "
    "each); default: one per GPU, else the cores divided by --cpu-threads, at most --num-shards.",
)
@click.option(
    "--lease-seconds",
    type=float,
    default=CaptureConfig.lease_seconds,
    show_default=True,
    help="A writer's lease on its part lasts this long and is renewed while it works; a killed "
    "writer's part is free again after it (at once on the same host).",
)
@click.option(
    "--lease-wait",
    type=float,
    default=CaptureConfig.lease_wait,
    show_default=True,
    help="Wait up to this many seconds for another writer's live lease to expire before refusing "
    "(e.g. a requeued job whose previous node died).",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=CaptureConfig.batch_tokens,
    show_default=True,
    help="Padded tokens per teacher batch.",
)
@click.option(
    "--group-docs",
    type=int,
    default=CaptureConfig.group_docs,
    show_default=True,
    help="Documents per batching group, the unit that --num-shards deals out (group g goes to "
    "part g mod N): lower it when a small dataset is split into many shards.",
)
@click.option(
    "--flush-positions",
    type=int,
    default=CaptureConfig.flush_positions,
    show_default=True,
    help="Positions per durable flush: the most teacher work a crash can cost.",
)
@click.option(
    "--device", default=CaptureConfig.device, show_default=True, help="auto, cpu, cuda or cuda:N."
)
@click.option(
    "--cpu-threads",
    type=int,
    default=None,
    help="Torch threads on a CPU device; recorded in the cache, since BLAS rounds some matmuls "
    "differently with another count: every part and executor (Dask workers too) uses it, so "
    "results are bit-identical. Default: torch's (OMP_NUM_THREADS, else the cores).",
)
@click.option(
    "--head-precision",
    type=click.Choice(HEAD_PRECISIONS),
    default=CaptureConfig.head_precision,
    show_default=True,
    help="Output head matmul: float32, or tf32 tensor cores (CUDA only; several times faster, log-prob changes ~1e-3). auto: tf32 on CUDA.",
)
@click.option(
    "--head-kernel",
    type=click.Choice(HEAD_KERNELS),
    default=CaptureConfig.head_kernel,
    show_default=True,
    help="What selects the top-k from the output head: eager (torch, the head's float32 logits "
    "a chunk of positions at a time), triton (one fused CUDA kernel: head matmul, running top-k "
    "and log-sum-exp; the logits never leave the chip), auto (triton on CUDA for top-k targets "
    "with k <= 128 when Triton is installed, else eager).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default=CaptureConfig.dtype,
    show_default=True,
    help="The teacher's weights and body: auto is float32 on CPU and, on CUDA, the checkpoint's "
    "own float16/bfloat16, else float32 weights with the body under bf16 autocast (the head and "
    "its inputs stay float32); a module:factory keeps its own. The head's logits are float32 in "
    "every case. Recorded in the cache.",
)
@click.option(
    "--tensor-parallel",
    type=int,
    default=CaptureConfig.tensor_parallel,
    show_default=True,
    help="Split a Hugging Face teacher over N ranks with its own tensor-parallel plan "
    "(tp_plan='auto', needs accelerate): run under torchrun --nproc_per_node N, one such job per "
    "part. The head stays vocab-parallel: each rank's top-k merged by one all-gather, the "
    "logits never gathered; rank 0 writes.",
)
@click.option(
    "--replace",
    is_flag=True,
    default=CaptureConfig.replace,
    help="If OUT holds a cache made with other settings (teacher, data, k, ...), delete it and start over; a matching cache is still resumed.",
)
@click.option(
    "--no-progress", is_flag=True, help="No progress bar (the summary line is still printed)."
)
def cache(**opts) -> None:
    """Run the teacher once over DATA and store its top-k in the cache OUT.

    Resumable: rerun the same command after an interruption. With --num-shards N, run one job
    per --shard-index (or --shard-index env in a SLURM array), then `kdcache finalize OUT`; or
    --executor dask to run every part on a Dask cluster (docs/SCALING.md)."""
    from kdcache.pipeline.executors import run_capture
    from kdcache.stages.capture import CaptureConfig

    executor, scheduler, workers = opts.pop("executor"), opts.pop("scheduler"), opts.pop("workers")
    if executor == "local" and (scheduler is not None or workers is not None):
        raise click.UsageError("--scheduler and --workers go with --executor dask")
    if executor == "dask" and opts["shard_index"] is not None:
        raise click.UsageError(
            "--executor dask runs every part of --num-shards; drop --shard-index"
        )
    opts["shard_index"] = _shard_index(opts["shard_index"] or "0")
    samples = opts.pop("samples")
    if opts["targets"] == "sampled":
        if samples < 1:
            raise ConfigError(
                f"--samples must be >= 1, got {samples}; pass the draws per position, e.g. 16"
            )
        opts["k"] = samples  # a row holds up to N unique draws
    opts["progress"] = not opts.pop("no_progress")
    for key in ("data", "out"):
        opts[key] = str(opts[key])
    cfg = CaptureConfig(**opts)
    if executor == "dask":
        from kdcache.pipeline.executors import run_dask

        click.echo(run_dask(cfg, scheduler=scheduler, workers=workers).line())
        return
    summary = run_capture(cfg)
    if summary.writer:  # a tensor-parallel rank that only computes has nothing to report
        click.echo(summary.line())

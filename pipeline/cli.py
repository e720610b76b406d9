"""The ``kdcache`` command line: parse, validate, call one library function.

User mistakes (every KDCacheError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from kdcache.pipeline.report_render import human_bytes
from kdcache.storage.codecs import CODECS
from kdcache.storage.errors import ConfigError, KDCacheError


def _fail(message: str, code: int) -> None:
    click.echo(f"kdcache: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every error a user can cause or fix is one line on stderr, no traceback: a KDCacheError
    (exit 2, or 1 for damaged data), click's own usage errors (exit 2, with the command's --help
    named), and an OSError of the file system (a read-only or full disk: exit 2)."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as e:
            where = f"`{e.ctx.command_path} --help`" if e.ctx else "`kdcache --help`"
            _fail(f"{e.format_message()} (see {where})", e.exit_code)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except KDCacheError as e:
            _fail(str(e), e.exit_code)
        except OSError as e:
            if e.errno is None:
                raise
            where = f" ({e.filename})" if e.filename else ""
            _fail(f"{e.strerror or e}{where}; check the path, its permissions and free space", 2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdcache")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """kdcache: run the teacher once, cache its top-k logits, train many students from the cache."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )


CACHE_ARG = click.argument("cache", type=click.Path(path_type=Path))


def _codec_error(e: dict | None) -> str:
    if e is None:
        return "none (plain codec: stored as captured)"
    return (
        f"reconstruction KL mean {e['kl_mean']:.2e}, p99 {e['kl_p99']:.2e}, max {e['kl_max']:.2e} nats "
        f"over {e['rows']:,} rows"
    )


def _shard_index(value: str) -> int | str:
    if value == "env":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected an integer or 'env', got {value!r}") from None


@main.command()
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
@click.option("--k", default=64, show_default=True, help="Top-k entries stored per position.")
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
    type=click.Choice(["all", "assistant"]),
    default="all",
    show_default=True,
    help="Rows that get targets: every position, or only assistant tokens of chat data (stored only for those rows).",
)
@click.option(
    "--backend",
    type=click.Choice(["zarr", "arrow"]),
    default="zarr",
    show_default=True,
    help="Storage backend.",
)
@click.option(
    "--logprob-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage type of the top-k log-probs.",
)
@click.option(
    "--targets",
    type=click.Choice(["topk", "sampled"]),
    default="topk",
    show_default=True,
    help="topk: the k most likely ids per position (biased toward the head); sampled: --samples "
    "draws from the teacher per position, stored as unique ids with counts (unbiased; train with "
    "--loss soft_ce).",
)
@click.option(
    "--samples",
    type=int,
    default=16,
    show_default=True,
    help="Draws per position with --targets sampled (seeded by sample id and position).",
)
@click.option(
    "--proposal-temperature",
    type=float,
    default=1.0,
    show_default=True,
    help="With --targets sampled: draw from the teacher at this temperature (> 1 reaches further "
    "into the tail per draw, < 1 stores fewer unique ids) and store normalized importance "
    "weights count * p / p_T instead of count / N.",
)
@click.option(
    "--codec",
    type=click.Choice(CODECS),
    default="plain",
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
    type=click.Choice(["local", "dask"]),
    default="local",
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
    default=120.0,
    show_default=True,
    help="A writer's lease on its part lasts this long and is renewed while it works; a killed "
    "writer's part is free again after it (at once on the same host).",
)
@click.option(
    "--lease-wait",
    type=float,
    default=0.0,
    show_default=True,
    help="Wait up to this many seconds for another writer's live lease to expire before refusing "
    "(e.g. a requeued job whose previous node died).",
)
@click.option(
    "--batch-tokens",
    type=int,
    default=16384,
    show_default=True,
    help="Padded tokens per teacher batch.",
)
@click.option(
    "--group-docs",
    type=int,
    default=256,
    show_default=True,
    help="Documents per batching group, the unit that --num-shards deals out (group g goes to "
    "part g mod N): lower it when a small dataset is split into many shards.",
)
@click.option(
    "--flush-positions",
    type=int,
    default=65536,
    show_default=True,
    help="Positions per durable flush: the most teacher work a crash can cost.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
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
    type=click.Choice(["auto", "float32", "tf32"]),
    default="auto",
    show_default=True,
    help="Output head matmul: float32, or tf32 tensor cores (CUDA only; several times faster, log-prob changes ~1e-3). auto: tf32 on CUDA.",
)
@click.option(
    "--replace",
    is_flag=True,
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
    click.echo(summary.line())


@main.command()
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
    help="Run directory: config.json, steps.tsv, eval.tsv, metrics.json, checkpoint.pt, student/.",
)
@click.option(
    "--loss",
    type=click.Choice(["forward_kl", "forward_kl_tail", "soft_ce", "reverse_kl", "jsd", "ce"]),
    default="forward_kl",
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
    default=1.0,
    show_default=True,
    help="Re-temper the cached top-k (loss scaled by T^2).",
)
@click.option("--k", type=int, default=None, help="Use only the first k' <= cached k entries.")
@click.option("--beta", type=float, default=0.5, show_default=True, help="JSD mixing weight.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimizer steps.")
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Sequences per optimizer step (global: all ranks and accumulation steps).",
)
@click.option(
    "--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option(
    "--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW)."
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
    default=100,
    show_default=True,
    help="Linear warmup steps, then cosine decay to --min-lr.",
)
@click.option(
    "--weight-decay",
    type=float,
    default=0.1,
    show_default=True,
    help="AdamW weight decay (matrices only).",
)
@click.option(
    "--clip", type=float, default=1.0, show_default=True, help="Gradient norm clipping (0: off)."
)
@click.option(
    "--seed",
    type=int,
    default=0,
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
    default=0.05,
    show_default=True,
    help="Share of batches held out for evaluation.",
)
@click.option(
    "--eval-every", type=int, default=200, show_default=True, help="Steps between evaluations."
)
@click.option(
    "--eval-batches",
    type=int,
    default=50,
    show_default=True,
    help="Batches of the held-out data per evaluation.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=200,
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--replace",
    is_flag=True,
    default=False,
    help="If OUT holds a run trained with other settings, delete it and start over (a matching "
    "run is still resumed from its checkpoint); the DVC stage passes it.",
)
@click.option(
    "--no-progress", is_flag=True, help="No progress bar (the summary line is still printed)."
)
def train(**opts) -> None:
    """Train a student from CACHE alone: the teacher is never loaded.

    Rerun the same command to resume from the last checkpoint. Under torchrun, every rank takes
    its share of each global batch."""
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


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("kdcache-demo"),
    show_default=True,
    help="Where data/ (train.jsonl, heldout.jsonl) and tokenizer/ are written.",
)
@click.option(
    "--max-files",
    type=int,
    default=None,
    help="Take only this many stdlib files (spread over the library); default: all.",
)
@click.option(
    "--vocab-size",
    type=int,
    default=4096,
    show_default=True,
    help="Vocabulary of the byte-level BPE tokenizer trained on the corpus.",
)
def prepare(workdir: Path, max_files: int, vocab_size: int) -> None:
    """Built-in data: the Python standard library's sources (no download), split into train and
    held-out by file, and a tokenizer trained on the train split."""
    from kdcache.pipeline.demo import prepare as _prepare

    d = _prepare(workdir, max_files=max_files or None, vocab_size=vocab_size)
    tr, ho = d["splits"]["train"], d["splits"]["heldout"]
    click.echo(
        f"{workdir}/data: train {tr['num_files']} files ({tr['total_bytes'] / 1e6:.1f} MB), held-out {ho['num_files']} files; tokenizer {vocab_size} tokens"
    )


@main.command("teacher-train")
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="Training text (any --data source of `kdcache cache`).",
)
@click.option(
    "--tokenizer",
    required=True,
    type=click.Path(path_type=Path),
    help="tokenizer.json or a tokenizer folder.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Teacher folder to write: model.pt, tokenizer.json, metrics.json.",
)
@click.option(
    "--heldout",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out text for the reported cross-entropy.",
)
@click.option(
    "--size",
    default="micro",
    show_default=True,
    help="Built-in GPT size: nano, micro, mini, small, base.",
)
@click.option("--block-size", type=int, default=256, show_default=True, help="Context length.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per step.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option(
    "--max-seconds", type=float, default=None, help="Stop when this time budget is spent."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def teacher_train(**opts) -> None:
    """Train kdcache's built-in GPT on text with hard labels: a teacher for `kdcache cache`."""
    from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain

    opts["progress"] = not opts.pop("no_progress")
    for key in ("data", "tokenizer", "out", "heldout"):
        opts[key] = None if opts[key] is None else str(opts[key])
    m = run_pretrain(PretrainConfig(**opts))
    ho = m["heldout_ce"]
    click.echo(
        f"{opts['out']}: {m['params']:,} parameters, {m['steps']} steps in {m['train_seconds']:.0f}s"
        + (f", held-out CE {ho:.3f}" if ho is not None else "")
    )


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("kdcache-demo"),
    show_default=True,
    help="Everything goes here; a rerun reuses what is done.",
)
@click.option(
    "--quick", is_flag=True, help="A small corpus and short runs (about a minute), for tests."
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(workdir: Path, quick: bool, no_progress: bool) -> None:
    """The main job on built-in data: train a teacher on the Python standard library, cache it
    once, train two students of different sizes with KD plus the small one with hard labels only,
    and print a table of held-out cross-entropy, agreement with the teacher, size and time."""
    from kdcache.pipeline.demo import run_demo

    run_demo(workdir, quick=quick, progress=not no_progress)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--students",
    default=None,
    metavar="FILE:KEY",
    help="Report exactly the students named by KEY in the YAML FILE (DVC's params.yaml:students), "
    "each as RUNS/<name>: a student removed from the file leaves the report.",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    default=None,
    help="The teacher the cache was made with: evaluated on the runs' held-out set, measured, first row.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write report.md, report.json and the PNG plots here.",
)
@click.option(
    "--speed-seconds",
    type=float,
    default=1.0,
    show_default=True,
    help="Inference timing per setting and model; 0 skips the speed and memory measurement.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the teacher is evaluated and inference measured: auto (CUDA if present), cpu, cuda, cuda:N.",
)
def report(
    runs: tuple[Path, ...],
    students: str | None,
    teacher: Path | None,
    out: Path | None,
    speed_seconds: float,
    device: str,
) -> None:
    """The distillation trade of each of RUNS (and the teacher): held-out quality and the share of
    the teacher's kept, cost to deploy (size, memory, tokens/s, latency), cost to make (capture,
    cache bytes, training time), hard-label runs next to distilled runs of the same size."""
    from kdcache.pipeline.report import build_report, selected_runs

    result = build_report(
        selected_runs(list(runs), students),
        teacher=teacher,
        out=out,
        speed_seconds=speed_seconds,
        device=device,
    )
    click.echo(result["markdown"])


@main.command()
@CACHE_ARG
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--digest",
    is_flag=True,
    help="Print only the cache's content digest (sha256 of its identity, counts, token hashes and "
    "file checksums; not of timestamps): equal for a bit-identical recapture. DVC stages depend "
    "on it instead of the cache folder.",
)
def inspect(cache: Path, as_json: bool, digest: bool) -> None:
    """Describe CACHE: format, backend, k, vocabulary, counts, size, fingerprints, parts."""
    from kdcache.storage.reader import CacheReader

    d = CacheReader(cache).describe()
    if digest:
        if d["content_sha256"] is None:
            raise ConfigError(
                f"{cache} was finalized by an older kdcache and has no content digest; "
                f"rerun `kdcache finalize {cache}`"
            )
        click.echo(d["content_sha256"])
        return
    if as_json:
        click.echo(json.dumps(d, indent=1, sort_keys=True))
        return
    rows = [
        (
            "format",
            f"{d['format']} v{d['format_version']} ({d['backend']} backend, {d['codec']} codec)",
        ),
        (
            "targets",
            f"{d['targets']} k={d['k']} on {d['targets_on']} rows; ids {d['id_dtype']}, log-probs {d['logprob_dtype']}",
        ),
        ("vocabulary", f"{d['vocab_size']:,}"),
        ("sequences", f"{d['num_sequences']:,}"),
        ("positions", f"{d['num_positions']:,} ({d['num_target_rows']:,} with targets)"),
        (
            "size on disk",
            f"{human_bytes(d['bytes_on_disk'])} ({d['bytes_per_position']:.1f} bytes/position, "
            f"{d['bytes_per_entry']:.2f} bytes per top-k entry)",
        ),
        ("codec error", _codec_error(d["codec_error"])),
        ("parts", f"{len(d['parts'])}"),
        ("teacher", json.dumps(d["teacher"], sort_keys=True)),
        ("tokenizer", json.dumps(d["tokenizer"], sort_keys=True)),
        ("data", json.dumps(d["data"], sort_keys=True)),
        ("content sha256", str(d["content_sha256"])),
        ("created", f"{d['created']} by kdcache {d['kdcache_version']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@main.command()
@CACHE_ARG
@click.option(
    "--files-only", is_flag=True, help="Only compare file checksums; do not decode every chunk."
)
def verify(cache: Path, files_only: bool) -> None:
    """Recompute every checksum of CACHE and check its structure; print each problem (part, file,
    what is wrong). Exit 0 if intact, 1 if damaged, 2 if CACHE is not a cache kdcache reads."""
    from kdcache.storage.verify import verify_cache

    problems = verify_cache(cache, decode=not files_only)
    if problems:
        for p in problems[:200]:
            click.echo(p, err=True)
        if len(problems) > 200:
            click.echo(f"... and {len(problems) - 200} more", err=True)
        click.echo(
            f"kdcache: error: {cache}: damaged: {len(problems)} problem(s) found; recapture the damaged "
            "parts (kdcache cache ... --shard-index I), then `kdcache finalize`",
            err=True,
        )
        sys.exit(1)  # a verdict on the data, not a usage error (2)
    click.echo(f"{cache}: OK")


@main.command()
@CACHE_ARG
def finalize(cache: Path) -> None:
    """Build CACHE's manifest from its committed parts (after many capture jobs).

    Lists the parts still missing if any: not started, interrupted (rerun them) or in progress."""
    from kdcache.storage.manifest import finalize as _finalize

    m = _finalize(cache)
    click.echo(
        f"{cache}: finalized {len(m['parts'])} parts, {m['totals']['positions']:,} positions"
    )


@main.command()
@CACHE_ARG
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(["zarr", "arrow"]),
    required=True,
    help="Backend of the new cache.",
)
@click.option(
    "--codec",
    type=click.Choice(CODECS),
    default=None,
    help="Re-encode the top-k with this codec (default: keep the source's); see docs/FORMAT.md.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="If OUT holds a cache made with other settings, delete it first.",
)
def convert(cache: Path, out: Path, backend: str, codec: str | None, replace: bool) -> None:
    """Rewrite CACHE into OUT with another backend or codec (same codec: bit-identical contents)."""
    from kdcache.storage.convert import convert_cache

    m = convert_cache(cache, out, backend, codec=codec, replace_out=replace)
    click.echo(
        f"{out}: {m['totals']['positions']:,} positions, {human_bytes(m['bytes_on_disk'])} ({backend})"
    )


@main.command()
@CACHE_ARG
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write entropy.png, topk_mass.png and top_ids.png here (needs kdcache[plot]).",
)
@click.option("--top", type=int, default=10, show_default=True, help="How many top ids to list.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Threads (1: synchronous); memory holds about one chunk per worker.  [default: min(4, CPUs)]",
)
def stats(cache: Path, as_json: bool, plot_dir: Path | None, top: int, workers: int | None) -> None:
    """Teacher statistics over CACHE, out of core (dask): top-k mass captured, entropy
    distribution, most frequent ids."""
    from kdcache.storage.stats import cache_stats, plot_stats

    if plot_dir is not None:  # fail before the pass over the cache, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'kdcache[plot]'") from None
    s = cache_stats(cache, top_ids=top, workers=workers)
    if plot_dir is not None:
        s["plots"] = [str(p) for p in plot_stats(s, plot_dir)]
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    mq, eq = s["topk_mass_quantiles"], s["entropy_quantiles_nats"]
    click.echo(f"target rows        {s['target_rows']:,} (k={s['k']}, {s['codec']} codec)")
    click.echo(
        f"size               {s['bytes_per_position']:.1f} bytes/position, {s['entries_per_row']:.1f} stored entries/row, "
        f"{s['bytes_per_entry']:.2f} bytes/entry"
    )
    click.echo(f"codec error        {_codec_error(s['codec_error'])}")
    click.echo(
        f"top-k mass         mean {s['topk_mass_mean']:.4f}; p05 {mq['p05']:.3f}, p25 {mq['p25']:.3f}, "
        f"median {mq['p50']:.3f}, p75 {mq['p75']:.3f}, p95 {mq['p95']:.3f}"
    )
    click.echo(
        f"entropy (nats)     mean {s['entropy_mean_nats']:.3f}; p05 {eq['p05']:.2f}, p25 {eq['p25']:.2f}, "
        f"median {eq['p50']:.2f}, p75 {eq['p75']:.2f}, p95 {eq['p95']:.2f}, p99 {eq['p99']:.2f}"
    )
    for key, label in (("top1_most_frequent", "top-1"), ("topk_most_frequent", "top-k")):
        distinct = s[key.replace("most_frequent", "distinct_ids")]
        click.echo(
            f"most frequent {label} ids ({distinct:,} distinct): "
            + ", ".join(f"{t['id']} ({t['count']:,})" for t in s[key])
        )
    for p in s.get("plots", []):
        click.echo(f"wrote {p}")


if __name__ == "__main__":
    main()

"""The built-in path: ``kdcache prepare``, ``teacher-train``, ``demo`` and the ``report``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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


@click.command("teacher-train")
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


@click.command()
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


@click.command()
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

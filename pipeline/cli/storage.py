"""The storage commands: ``kdcache inspect``, ``verify``, ``stats``, ``finalize``, ``convert``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kdcache.pipeline.cli.common import CACHE_ARG, codec_error_line
from kdcache.pipeline.report_render import human_bytes
from kdcache.storage.backends import BACKENDS
from kdcache.storage.codecs import CODECS
from kdcache.storage.errors import ConfigError


@click.command()
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
        ("codec error", codec_error_line(d["codec_error"])),
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


@click.command()
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


@click.command()
@CACHE_ARG
def finalize(cache: Path) -> None:
    """Build CACHE's manifest from its committed parts (after many capture jobs).

    Lists the parts still missing if any: not started, interrupted (rerun them) or in progress."""
    from kdcache.storage.manifest import finalize as _finalize

    m = _finalize(cache)
    click.echo(
        f"{cache}: finalized {len(m['parts'])} parts, {m['totals']['positions']:,} positions"
    )


@click.command()
@CACHE_ARG
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    required=True,
    help="Backend of the new cache.",
)
@click.option(
    "--codec",
    type=click.Choice(list(CODECS)),
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


@click.command()
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
    click.echo(f"codec error        {codec_error_line(s['codec_error'])}")
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

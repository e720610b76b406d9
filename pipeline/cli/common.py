"""What several commands share: the CACHE argument and how a codec's error reads."""

from __future__ import annotations

from pathlib import Path

import click

CACHE_ARG = click.argument("cache", type=click.Path(path_type=Path))


def codec_error_line(e: dict | None) -> str:
    if e is None:
        return "none (plain codec: stored as captured)"
    return (
        f"reconstruction KL mean {e['kl_mean']:.2e}, p99 {e['kl_p99']:.2e}, max {e['kl_max']:.2e} nats "
        f"over {e['rows']:,} rows"
    )

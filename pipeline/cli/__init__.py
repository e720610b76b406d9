"""The ``kdcache`` command line: parse, validate, call one library function.

Each room's commands live in their own module, loaded when the command runs (so ``kdcache
inspect`` never imports torch):

    capture.py   kdcache cache                      (stage one)
    train.py     kdcache train, export              (stage two)
    storage.py   inspect, verify, stats, finalize, convert
    demo.py      prepare, teacher-train, demo, report

User mistakes (every KDCacheError) print one line on stderr and exit with code 2 (1 for
damaged data).
"""

from __future__ import annotations

import logging
import sys
from importlib import import_module

import click

from kdcache.storage.errors import KDCacheError

COMMANDS = {  # name -> module of kdcache.pipeline.cli defining it (as the function of that name)
    "cache": "capture",
    "train": "train",
    "export": "train",
    "prepare": "demo",
    "teacher-train": "demo",
    "demo": "demo",
    "report": "demo",
    "inspect": "storage",
    "verify": "storage",
    "finalize": "storage",
    "convert": "storage",
    "stats": "storage",
}


def _fail(message: str, code: int) -> None:
    click.echo(f"kdcache: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Subcommands load on first use (``COMMANDS``). Every error a user can cause or fix is one
    line on stderr, no traceback: a KDCacheError (exit 2, or 1 for damaged data), click's own
    usage errors (exit 2, with the command's --help named), and an OSError of the file system
    (a read-only or full disk: exit 2)."""

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

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = import_module(f"kdcache.pipeline.cli.{COMMANDS[name]}")
        return getattr(module, name.replace("-", "_"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdcache")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """kdcache: run the teacher once, cache its top-k logits, train many students from the cache."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    main()

"""``python -m kdcache.pipeline.cli``: the ``kdcache`` command (e.g. under torchrun)."""

from kdcache.pipeline.cli import main

main()

"""The backend interface: how one part's blocks are stored and loaded.

A backend stores and loads the named arrays of the logical schema (kdcache.storage.schema) for
one part directory. It knows nothing of teachers, manifests or resume policy: the part writer
(kdcache.storage.writer) decides when to append and records the backend's state after each
durable append. Codecs that transform arrays sit above the backends and serve both. Each backend
module defines ``BACKEND``; kdcache.storage.backends collects them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from kdcache.storage.checksums import PartFiles
from kdcache.storage.errors import ConfigError
from kdcache.storage.schema import Block, CacheSchema


class BackendWriter(ABC):
    """Appends blocks to one part. ``append`` is durable (data fsync'd) when it returns.

    ``state`` is None for a new part; otherwise it is what ``state()`` returned after the last
    durable append, and the writer continues from there, discarding anything written later.
    """

    name: ClassVar[str]

    def __init__(self, part_dir: Path, schema: CacheSchema, options: dict) -> None:
        self.part_dir = Path(part_dir)
        self.schema = schema
        self.options = options

    @abstractmethod
    def append(self, block: Block) -> None: ...

    @abstractmethod
    def state(self) -> dict:
        """JSON-able description of what is durably stored (the resume point)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; everything appended is already durable."""


class BackendReader(ABC):
    """Reads sequences [start, stop) of one committed part as a Block.

    Every file it reads goes through ``self.files`` (the part's recorded file table): a recorded
    file that is missing, resized or replaced is refused, never read as other data."""

    name: ClassVar[str]

    def __init__(self, part_dir: Path, schema: CacheSchema, record: dict) -> None:
        self.part_dir = Path(part_dir)
        self.schema = schema
        self.record = record
        self.num_sequences = int(record["counts"]["sequences"])
        self.files = PartFiles(self.part_dir, record["files"])

    @abstractmethod
    def read(self, start: int, stop: int) -> Block: ...

    def layout_problems(self, where: str) -> list[str]:
        """What of the stored layout disagrees with part.json's counts and the schema (shapes,
        dtypes), one line each starting with ``where``; ``kdcache verify`` runs it after the
        checksums. Default: nothing beyond what opening the reader checks."""
        return []

    @abstractmethod
    def topk_arrays(self, chunk_entries: int) -> tuple:
        """The stored (topk_ids (R, k), topk_logprobs (R, k), log_tail (R,)) as dask arrays with
        the same row chunks, about ``chunk_entries`` top-k entries per chunk: what ``kdcache
        stats`` reduces out of core (the codec decodes each chunk there)."""


class Backend:
    """A registered backend: its writer and reader classes and default options."""

    def __init__(
        self, name: str, writer: type[BackendWriter], reader: type[BackendReader], defaults: dict
    ):
        self.name, self.writer, self.reader, self.defaults = name, writer, reader, defaults

    def options(self, overrides: dict | None = None) -> dict:
        opts = dict(self.defaults)
        for key, value in (overrides or {}).items():
            if key not in opts:
                raise ConfigError(
                    f"backend {self.name!r} has no option {key!r}; known options: {sorted(opts)}"
                )
            opts[key] = value
        return opts

"""One bounded queue between the caller and one background thread, in either direction:

    for batch in prefetch(reader_batches, depth=4): ...      # the thread reads ahead
    behind = WriteBehind(writer.add, depth=4)                 # the thread writes behind
    behind.put(result); ...; behind.finish()

Reading, decompression and writing overlap the compute (numpy, zstd and file I/O release the
GIL). At most ``depth`` items wait, so memory stays bounded; an exception on the thread is
raised in the caller at its next put / next item, and the thread never blocks on a caller that
stopped (it drains the queue).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()


class _Channel:
    def __init__(self, depth: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def put(self, item: Any) -> None:
        """Put, waiting while the queue is full; raise the thread's error once it has one."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def drain(self) -> None:
        """Take items until the end marker, so a producer never blocks on a dead consumer."""
        while True:
            try:
                if self.q.get(timeout=1) is _END:
                    return
            except queue.Empty:
                continue


def prefetch(source: Iterable, depth: int = 4, name: str = "kdcache-prefetch") -> Iterator:
    """Iterate ``source`` on a daemon thread, ``depth`` items ahead."""
    channel = _Channel(depth)

    def fill() -> None:
        try:
            for item in source:
                channel.q.put(item)
        except BaseException as e:  # re-raised in the consumer
            channel.error = e
        channel.q.put(_END)

    threading.Thread(target=fill, daemon=True, name=name).start()
    while (item := channel.q.get()) is not _END:
        yield item
    if channel.error is not None:
        raise channel.error


class WriteBehind:
    """``consume(item)`` for every ``put`` item, in order, on a daemon thread."""

    def __init__(
        self, consume: Callable[[Any], object], depth: int = 4, name: str = "kdcache-writer"
    ) -> None:
        self._channel = _Channel(depth)
        self._consume = consume
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        channel = self._channel
        try:
            while (item := channel.q.get()) is not _END:
                self._consume(item)
        except BaseException as e:  # surfaced in the caller by put() / finish()
            channel.error = e
            channel.drain()

    def put(self, item: Any) -> None:
        self._channel.put(item)

    def finish(self) -> None:
        """Wait until every item is consumed; raise the thread's error if it had one."""
        self._channel.put(_END)
        self._thread.join()
        if self._channel.error is not None:
            raise self._channel.error

    def abandon(self) -> None:
        """Stop after the items already queued (the caller failed); errors are dropped."""
        if self._thread.is_alive():
            try:
                self._channel.q.put(_END, timeout=5)
            except queue.Full:
                pass

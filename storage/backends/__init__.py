"""The storage backends, by the name a cache records (``backend`` in its manifest):
``zarr`` (kdcache.storage.backends.zarr) and ``arrow`` (kdcache.storage.backends.arrow), each
behind the interface of kdcache.storage.backends.base. A new backend is a module defining
``BACKEND`` and one line here."""

from __future__ import annotations

from kdcache.storage.backends import arrow, zarr
from kdcache.storage.backends.base import Backend, BackendReader, BackendWriter
from kdcache.storage.errors import ConfigError

BACKENDS: dict[str, Backend] = {b.name: b for b in (zarr.BACKEND, arrow.BACKEND)}
DEFAULT_BACKEND = "zarr"


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "BackendReader",
    "BackendWriter",
    "get_backend",
]

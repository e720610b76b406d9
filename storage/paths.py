"""Checks on the folders a command writes, made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path


def is_within(inner: str | Path, outer: str | Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (links resolved; neither need exist)."""
    a, b = Path(inner).resolve(), Path(outer).resolve()
    return a == b or b in a.parents


def output_problem(path: str | Path, option: str) -> str | None:
    """Why the folder ``path`` (to create, or to write in) cannot be written, or None.

    Checked up front, so a read-only file system or a file in the way is one line before a
    teacher loads, not an OSError after it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{option} {path} is a file; expected a folder to write in: choose another {option}"
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{option} {path}: {probe} is a file, so the folder cannot be made; choose another {option}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (
            f"{option} {path}: {probe} is not writable (a read-only file system, or no "
            f"permission); choose another {option}"
        )
    return None

"""The built-in corpus: the Python standard library's own ``.py`` source files.

Always on disk, needs no download, and depends on the Python version only: the files are found
through ``sysconfig.get_paths()["stdlib"]``, leaving out third-party packages (``site-packages``,
``dist-packages``), the test suites, ``__pycache__`` and the build-specific files
(``config-*/``, ``_sysconfigdata_*.py``).

Everything is deterministic, with no random state:
- files are taken in sorted relative POSIX path order;
- caps (``max_files``, ``max_bytes``) take files in a *spread* order over that sorted list
  (0, N/2, N/4, 3N/4, ...), so a small sample spans the whole library; a larger ``max_files``
  gives a superset of a smaller one, and ``max_bytes`` skips a file that does not fit what is
  left of the budget and goes on, so the budget is nearly filled;
- the train / held-out split is by file: ``sha256(path) mod 100 < heldout_percent`` is held out,
  so a file's split never depends on the caps or on which other files exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdcache.storage.durable import write_durable
from kdcache.storage.errors import ConfigError

Split = Literal["train", "heldout", "all"]
SPLITS = ("train", "heldout", "all")

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class CorpusDocument:
    source: str  # path relative to the stdlib folder, POSIX separators, e.g. "json/decoder.py"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: str) -> bool:
    *dirs, name = rel.split("/")
    return (
        any(d in _EXCLUDED_DIRS or d.startswith("config-") for d in dirs)
        or name.startswith(("test_", "_sysconfigdata_"))
        or not name.endswith(".py")
    )


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative POSIX paths of the candidate ``.py`` files under the stdlib folder."""
    root = stdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune early
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not _excluded(rel):
                found.append(rel)
    return sorted(found)


def _spread_order(n: int) -> list[int]:
    """A permutation of range(n) whose every prefix is spread evenly over the range.

    Bit-reversed counting (van der Corput) over M = 2^bits >= n slots, scaled to n:
    0, n/2, n/4, 3n/4, n/8, ... (duplicates from the scaling dropped).
    """
    bits = max(1, (n - 1).bit_length())
    order: dict[int, None] = {}  # ordered set
    for k in range(1 << bits):
        slot = int(format(k, f"0{bits}b")[::-1], 2)
        order.setdefault(slot * n >> bits, None)
    return list(order)


def is_heldout(source: str, heldout_percent: int) -> bool:
    """Stable split by file: depends on the relative path only."""
    return int(hashlib.sha256(source.encode("utf-8")).hexdigest(), 16) % 100 < heldout_percent


def heldout_sources(sources: list[str], heldout_percent: int) -> set[str]:
    """The held-out files of a sample: ``is_heldout``, or (a small sample where that picks none)
    the one file whose path hashes lowest, so both splits are non-empty from 2 files up."""
    held = {s for s in sources if is_heldout(s, heldout_percent)}
    if not held and heldout_percent > 0 and len(sources) >= 2:
        held = {
            min(sources, key=lambda s: int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16) % 100)
        }
    return held


def _validate(split: str, max_files: Any, max_bytes: Any, heldout_percent: Any) -> None:
    problems = []
    if split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name, value in (("max_files", max_files), ("max_bytes", max_bytes)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value <= 0
        ):
            problems.append(f"{name} must be a positive integer or None, got {value!r}")
    if not isinstance(heldout_percent, int) or not 0 <= heldout_percent < 100:
        problems.append(f"heldout_percent must be an integer in [0, 100), got {heldout_percent!r}")
    if problems:
        raise ConfigError("invalid built-in corpus settings: " + "; ".join(problems))


def _select(max_files: int | None, max_bytes: int | None, root: Path) -> list[tuple[str, bytes]]:
    """(path, raw bytes) of the capped sample, sorted by path; skips files that are not UTF-8."""
    files = stdlib_files(root)
    taken: list[tuple[str, bytes]] = []
    total = 0
    for i in _spread_order(len(files)) if files else []:
        if max_files is not None and len(taken) >= max_files:
            break
        path = root / files[i]
        if max_bytes is not None and total + path.stat().st_size > max_bytes:
            continue  # too big for what is left of the budget; a smaller file may still fit
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        taken.append((files[i], data))
        total += len(data)
    return sorted(taken)


def builtin_corpus(
    split: Split = "all",
    *,
    max_files: int | None = None,
    max_bytes: int | None = None,
    heldout_percent: int = 5,
) -> list[CorpusDocument]:
    """The stdlib documents of ``split``, sorted by path.

    The caps bound the whole sample (train + held-out together); the split is taken inside it.
    """
    _validate(split, max_files, max_bytes, heldout_percent)
    sample = _select(max_files, max_bytes, stdlib_root())
    held = heldout_sources([source for source, _ in sample], heldout_percent)
    return [
        CorpusDocument(source=source, text=data.decode("utf-8"))
        for source, data in sample
        if split == "all" or (split == "heldout") == (source in held)
    ]


def corpus_fingerprint(
    split: Split = "all",
    *,
    max_files: int | None = None,
    max_bytes: int | None = None,
    heldout_percent: int = 5,
    documents: list[CorpusDocument] | None = None,
) -> dict[str, Any]:
    """What was taken, and a sha256 over (path, content sha256) of each document in order.

    Pass ``documents`` (from ``builtin_corpus`` with the same settings) to avoid reading again.
    """
    if documents is None:
        documents = builtin_corpus(
            split, max_files=max_files, max_bytes=max_bytes, heldout_percent=heldout_percent
        )
    digest = hashlib.sha256()
    total_bytes = 0
    for doc in documents:
        data = doc.text.encode("utf-8")
        total_bytes += len(data)
        content = hashlib.sha256(data).hexdigest()
        digest.update(f"{doc.source}\0{content}\n".encode())
    return {
        "name": "python-stdlib",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": str(stdlib_root()),
        "split": split,
        "max_files": max_files,
        "max_bytes": max_bytes,
        "heldout_percent": heldout_percent,
        "num_files": len(documents),
        "total_bytes": total_bytes,
        "sha256": digest.hexdigest(),
    }


def _write_jsonl(file: Path, documents: list[CorpusDocument]) -> None:
    # ensure_ascii (the default) keeps every line free of raw U+2028-style separators
    lines = (json.dumps({"text": doc.text, "source": doc.source}) + "\n" for doc in documents)
    write_durable(file, "".join(lines).encode("utf-8"))


def write_corpus(
    folder: str | os.PathLike,
    *,
    max_files: int | None = None,
    max_bytes: int | None = None,
    heldout_percent: int = 5,
) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (``{"text", "source"}`` per line) and
    ``corpus.json`` (the fingerprint of each split, written last). Returns that description."""
    _validate("all", max_files, max_bytes, heldout_percent)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(max_files=max_files, max_bytes=max_bytes, heldout_percent=heldout_percent)
    everything = builtin_corpus("all", **settings)
    description: dict[str, Any] = {"format": "kdcache-corpus", "version": 1, "splits": {}}
    held = heldout_sources([d.source for d in everything], heldout_percent)
    for split in ("train", "heldout"):
        docs = [d for d in everything if (split == "heldout") == (d.source in held)]
        _write_jsonl(folder / f"{split}.jsonl", docs)
        description["splits"][split] = {
            "file": f"{split}.jsonl",
            **corpus_fingerprint(split, **settings, documents=docs),
        }
    write_durable(folder / "corpus.json", (json.dumps(description, indent=2) + "\n").encode())
    return description

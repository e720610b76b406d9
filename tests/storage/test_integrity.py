"""kdcache verify: every problem named (part, file, what), and a flipped byte anywhere is caught."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.checksums import data_files
from kdcache.storage.errors import KDCacheError
from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.reader import CacheReader
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.verify import verify_cache
from kdcache.storage.writer import write_cache

SMALL = {"zarr": {"shard_rows": 64, "chunk_rows": 16}, "arrow": {"batch_positions": 50}}
TRIALS_PER_BACKEND = 60


def make_cache(root: Path, backend: str, codec: str = "plain") -> Path:
    schema = CacheSchema(k=4, vocab_size=500, codec=codec)
    ident = CacheIdentity(
        backend=backend, schema=schema, fingerprints={"teacher": {"name": "t"}}, settings={}
    )
    block = synthetic_block(np.random.default_rng(1), [30, 7, 50, 1, 40], schema)
    write_cache(root, ident, [block], backend_options=SMALL[backend])
    return root


def kdcache(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["kdcache", *map(str, args)], capture_output=True, text=True)


def read_all(root: Path):
    cache = CacheReader(root)
    return cache.block(0, cache.num_sequences)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_flipped_byte_in_any_file_is_caught_by_verify_and_by_reading(tmp_path, backend):
    """Seeded trials: every data file at least twice (its first and last byte... and random
    positions); after each flip verify names the file, and reading the whole cache raises a
    KDCacheError (or, for a flip that leaves the decoded contents unchanged, still raises)."""
    clean = make_cache(tmp_path / "clean", backend)
    expected = read_all(clean)
    part = clean / "parts/part-00000"
    files = [f.relative_to(clean) for f in data_files(part)]
    rng = np.random.default_rng(7)
    trials = [(f, 0) for f in files] + [(f, -1) for f in files]
    while len(trials) < TRIALS_PER_BACKEND:
        f = files[rng.integers(len(files))]
        trials.append((f, int(rng.integers((clean / f).stat().st_size))))
    escaped = []
    for i, (rel, pos) in enumerate(trials):
        work = tmp_path / f"t{i}"
        shutil.copytree(clean, work)
        data = bytearray((work / rel).read_bytes())
        data[pos] ^= 1 << int(rng.integers(8))
        (work / rel).write_bytes(bytes(data))
        problems = verify_cache(work)
        if not any(str(rel.relative_to("parts/part-00000")) in p for p in problems):
            escaped.append(f"verify missed {rel}@{pos}: {problems}")
        try:
            got = read_all(work)
        except KDCacheError:
            pass
        else:
            escaped.append(f"read {rel}@{pos} without an error (same data: {got.equals(expected)})")
        shutil.rmtree(work)
    assert len(trials) >= 20
    assert not escaped, "\n".join(escaped)


def _edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for key, value in changes.items():
        *head, last = key.split(".")
        d = obj
        for h in head:
            d = d[h]
        d[last] = value
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "backend, damage, expected",
    [
        ("zarr", "delete:topk_ids/c/1/0", "parts/part-00000/topk_ids/c/1/0: missing file"),
        ("arrow", "delete:block-00000.arrow", "block-00000.arrow: missing file"),
        ("zarr", "flip:log_tail/c/0", "parts/part-00000/log_tail/c/0: checksum mismatch"),
        ("arrow", "truncate:block-00000.arrow", "block-00000.arrow: wrong size"),
        ("zarr", "extra:stray.bin", "parts/part-00000/stray.bin: file not recorded in part.json"),
        ("zarr", "part:counts.rows=7", "part.json: does not match manifest.json (counts"),
        ("arrow", "part:schema.k=5", "part.json: does not match manifest.json (schema.k"),
        ("zarr", "manifest:totals.positions=3", "manifest.json: totals"),
        ("zarr", "rmpart", "parts/part-00000: missing part (listed in manifest.json)"),
        ("arrow", "rmrecord", "parts/part-00000/part.json: missing; the part is not committed"),
        ("zarr", "shape:log_tail", "parts/part-00000/log_tail: wrong shape (127,)"),
        ("zarr", "tokens", "tokens_sha256 of the decoded input ids differs"),
    ],
)
def test_verify_names_each_problem(tmp_path, backend, damage, expected):
    root = make_cache(tmp_path / "c", backend)
    part = root / "parts/part-00000"
    kind, _, arg = damage.partition(":")
    if kind == "delete":
        (part / arg).unlink()
    elif kind == "flip":
        data = bytearray((part / arg).read_bytes())
        data[len(data) // 2] ^= 0x10
        (part / arg).write_bytes(bytes(data))
    elif kind == "truncate":
        (part / arg).write_bytes((part / arg).read_bytes()[:-9])
    elif kind == "extra":
        (part / arg).write_bytes(b"x")
    elif kind in ("part", "manifest"):
        key, value = arg.split("=")
        _edit_json(
            part / "part.json" if kind == "part" else root / "manifest.json", **{key: int(value)}
        )
    elif kind == "rmpart":
        shutil.rmtree(part)
    elif kind == "rmrecord":
        (part / "part.json").unlink()
    elif kind == "shape":
        # A consistent but wrong array: shape in zarr.json and the files table agree.
        from kdcache.storage.checksums import file_table

        meta = json.loads((part / arg / "zarr.json").read_text())
        meta["shape"] = [127]
        (part / arg / "zarr.json").write_text(json.dumps(meta))
        record = json.loads((part / "part.json").read_text())
        record["files"] = file_table(part)
        record["bytes"] = sum(f["bytes"] for f in record["files"].values())
        (part / "part.json").write_text(json.dumps(record))
        _edit_json(
            root / "manifest.json",
            **{
                "parts": [
                    {
                        **json.loads((root / "manifest.json").read_text())["parts"][0],
                        "bytes": record["bytes"],
                    }
                ],
                "bytes_on_disk": record["bytes"],
            },
        )
    elif kind == "tokens":
        record = json.loads((part / "part.json").read_text())
        _edit_json(part / "part.json", tokens_sha256="0" * 64)
        m = json.loads((root / "manifest.json").read_text())
        m["parts"][0]["tokens_sha256"] = "0" * 64
        (root / "manifest.json").write_text(json.dumps(m))
    problems = verify_cache(root)
    assert any(expected in p for p in problems), problems
    r = kdcache("verify", root)
    assert r.returncode == 1, r.stderr
    assert expected in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdcache: error: ") and "damaged" in last and "Traceback" not in r.stderr


def test_verify_exit_codes(tmp_path):
    root = make_cache(tmp_path / "c", "zarr", codec="sorted-q8")
    ok = kdcache("verify", root)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{root}: OK")
    assert kdcache("verify", root, "--files-only").returncode == 0
    not_a_cache = kdcache("verify", tmp_path)  # a usage error, not a verdict on data
    assert not_a_cache.returncode == 2 and "not a kdcache cache" in not_a_cache.stderr
    (root / "manifest.json").write_text("{")
    damaged = kdcache("verify", root)
    assert damaged.returncode == 1 and "manifest.json: damaged (not valid JSON)" in damaged.stderr

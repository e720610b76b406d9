"""The storage commands of the CLI, run as a user runs them (a subprocess of the installed script)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import PartWriter, write_cache


def kdcache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kdcache", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    schema = CacheSchema(k=8, vocab_size=1000)
    ident = CacheIdentity(
        backend="zarr", schema=schema, fingerprints={"teacher": {"name": "t"}}, settings={"k": 8}
    )
    write_cache(
        tmp_path / "c", ident, [synthetic_block(np.random.default_rng(0), [20, 5, 40], schema)]
    )
    return tmp_path / "c"


def test_inspect_json_has_the_contract_keys(cache):
    r = kdcache("inspect", cache, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in (
        "format",
        "format_version",
        "backend",
        "k",
        "vocab_size",
        "num_sequences",
        "num_positions",
        "bytes_on_disk",
        "bytes_per_position",
        "teacher",
        "tokenizer",
        "data",
        "parts",
    ):
        assert key in d, key
    assert (d["format"], d["format_version"], d["k"], d["num_positions"]) == ("kdcache", 1, 8, 65)
    assert d["bytes_per_position"] == pytest.approx(d["bytes_on_disk"] / 65)
    table = kdcache("inspect", cache)
    assert table.returncode == 0 and "65 (65 with targets)" in table.stdout


def test_convert_round_trip_and_verify(cache, tmp_path):
    assert kdcache("convert", cache, tmp_path / "a", "--backend", "arrow").returncode == 0
    assert kdcache("convert", tmp_path / "a", tmp_path / "z", "--backend", "zarr").returncode == 0
    from kdcache.storage.reader import CacheReader

    assert CacheReader(tmp_path / "z")[0:3].equals(CacheReader(cache)[0:3])
    assert kdcache("verify", tmp_path / "a").stdout.strip().endswith("OK")
    s = kdcache("stats", cache, "--json")
    assert s.returncode == 0 and json.loads(s.stdout)["target_rows"] == 65


@pytest.mark.parametrize(
    "setup, command, message",
    [
        ("empty", "inspect", "not a kdcache cache"),
        ("missing", "inspect", "no such directory"),
        ("newer", "inspect", "cache format version 2"),
        ("unfinalized", "inspect", "run `kdcache finalize"),
        ("missing_part", "inspect", "listed in the manifest but missing"),
        ("flipped", "verify", "problem(s) found"),
        ("incomplete", "finalize", "1 of 2 parts not committed yet: part-00001 (not started)"),
    ],
)
def test_errors_are_one_line_exit_2(cache, tmp_path, setup, command, message):
    target = cache
    if setup == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    elif setup == "missing":
        target = tmp_path / "nope"
    elif setup == "newer":
        m = json.loads((cache / "manifest.json").read_text())
        m["format_version"] = 2
        (cache / "manifest.json").write_text(json.dumps(m))
    elif setup == "unfinalized":
        (cache / "manifest.json").unlink()
    elif setup == "missing_part":
        import shutil

        shutil.rmtree(cache / "parts/part-00000")
    elif setup == "flipped":
        f = max(
            (p for p in (cache / "parts").rglob("*") if p.is_file() and p.suffix != ".json"),
            key=lambda p: p.stat().st_size,
        )
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 1
        f.write_bytes(bytes(b))
    elif setup == "incomplete":
        target = tmp_path / "two"
        schema = CacheSchema(k=2, vocab_size=10)
        ident = CacheIdentity(
            backend="arrow", schema=schema, fingerprints={}, settings={}, num_shards=2
        )
        w = PartWriter.open(target, ident, shard_index=0)
        w.add_block(synthetic_block(np.random.default_rng(0), [3], schema))
        w.commit()
    r = kdcache(command, target)
    assert r.returncode == (1 if command == "verify" else 2)  # verify: 1 = the data is damaged
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdcache: error: ") and message in last, r.stderr
    assert "Traceback" not in r.stderr


def test_convert_refuses_to_overwrite_another_cache(cache, tmp_path):
    other = tmp_path / "other"
    schema = CacheSchema(k=2, vocab_size=10)
    write_cache(
        other,
        CacheIdentity(backend="arrow", schema=schema, fingerprints={}, settings={}),
        [synthetic_block(np.random.default_rng(0), [3], schema)],
    )
    r = kdcache("convert", cache, other, "--backend", "arrow")
    assert r.returncode == 2 and "holds a cache made with other settings" in r.stderr
    assert kdcache("convert", cache, other, "--backend", "arrow", "--replace").returncode == 0

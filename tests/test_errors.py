"""Bad inputs at the command line: one line on stderr, exit code 2, the message docs/ERRORS.md
promises. And docs/ERRORS.md names only tests that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import write_cache

ROOT = Path(__file__).resolve().parents[1]

# (id, argv, the message's stable part). Every one fails before a model is loaded.
CASES = [
    # -- stage one: kdcache cache
    (
        "cache-no-teacher",
        "cache --teacher nope --data d.jsonl --out o",
        "model 'nope' not found: no such file or folder",
    ),
    (
        "cache-no-data",
        "cache --teacher nope --data gone.txt --out o",
        "--data gone.txt: no such file or folder",
    ),
    (
        "cache-k-zero",
        "cache --teacher nope --data d.jsonl --out o --k 0",
        "--k must be an integer >= 1, got 0",
    ),
    (
        "cache-samples-zero",
        "cache --teacher nope --data d.jsonl --out o --targets sampled --samples 0",
        "--samples must be >= 1, got 0",
    ),
    (
        "cache-seq-len",
        "cache --teacher nope --data d.jsonl --out o --seq-len 1",
        "--seq-len must be >= 2, got 1",
    ),
    (
        "cache-stride",
        "cache --teacher nope --data d.jsonl --out o --seq-len 4 --stride 5",
        "--stride 5 exceeds --seq-len 4",
    ),
    (
        "cache-proposal-temperature",
        "cache --teacher nope --data d.jsonl --out o --proposal-temperature 2",
        "--proposal-temperature 2.0 applies to --targets sampled only",
    ),
    (
        "cache-shard-index",
        "cache --teacher nope --data d.jsonl --out o --num-shards 2 --shard-index 5",
        "--shard-index must lie in [0, 2), got 5",
    ),
    # -- stage two: kdcache train
    (
        "train-no-cache",
        "train --cache gone --student nano --out r",
        "--cache gone: no such directory",
    ),
    ("train-no-student", "train --cache c --student nope --out r", "model 'nope' not found"),
    (
        "train-k-above-cache",
        "train --cache c --student nano --out r --k 9",
        "--k 9 exceeds the cache's k=4",
    ),
    (
        "train-steps",
        "train --cache c --student nano --out r --steps 0",
        "--steps must be >= 1, got 0",
    ),
    (
        "train-alpha",
        "train --cache c --student nano --out r --alpha 2",
        "--alpha must lie in [0, 1], got 2.0",
    ),
    (
        "train-temperature",
        "train --cache c --student nano --out r --temperature 0",
        "--temperature must be > 0, got 0.0",
    ),
    (
        "train-eval-fraction",
        "train --cache c --student nano --out r --eval-fraction 1.5",
        "--eval-fraction must lie in [0, 1), got 1.5",
    ),
    (
        "train-out-is-a-file",
        "train --cache c --student nano --out d.jsonl",
        "--out d.jsonl is a file; expected a folder to write in",
    ),
    (
        "train-out-inside-cache",
        "train --cache c --student nano --out c/run",
        "--out c/run lies inside --cache c",
    ),
    (
        "train-steps-not-an-integer",
        "train --cache c --student nano --out r --steps 1.5",
        "Invalid value for '--steps': '1.5' is not a valid integer",
    ),
    (
        "train-parallel",
        "train --cache c --student nano --out r --parallel zero3",
        "Invalid value for '--parallel': 'zero3' is not one of 'auto', 'none', 'ddp', 'fsdp'",
    ),
    (
        "export-no-checkpoint",
        "export c --out e",
        "expected a committed checkpoint in c/checkpoints, found none",
    ),
    ("unknown-option", "train --cache c --stepz 3", "No such option '--stepz'"),
    # -- storage commands
    (
        "inspect-not-a-cache",
        "inspect c/parts",
        "not a kdcache cache (no manifest.json and no committed part)",
    ),
    ("inspect-missing", "inspect gone", "gone: no such directory"),
    ("stats-not-a-cache", "stats c/parts", "not a kdcache cache"),
    ("verify-not-a-cache", "verify c/parts", "not a kdcache cache"),
    (
        "convert-onto-itself",
        "convert c c --backend arrow --replace",
        "expected an output outside the source cache",
    ),
    (
        "convert-into-the-source",
        "convert c c/parts/x --backend arrow",
        "expected an output outside the source cache",
    ),
    ("finalize-nothing", "finalize d.jsonl", "no committed part found"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("errors")
    (d / "d.jsonl").write_text('{"text": "hello"}\n')
    schema = CacheSchema(k=4, vocab_size=300)
    ident = CacheIdentity(backend="zarr", schema=schema, fingerprints={}, settings={})
    write_cache(d / "c", ident, [synthetic_block(np.random.default_rng(0), [20, 30], schema)])
    return d


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(workdir, argv, message):
    r = subprocess.run(
        ["kdcache", *argv.split()], capture_output=True, text=True, cwd=workdir, timeout=300
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("kdcache: error: ") and message in lines[0], lines[0]


def test_errors_md_names_tests_that_exist():
    """Every `tests/...py::test_name[id]` in docs/ERRORS.md is a test function in that file
    (and, for this file's table, a case id); and the table has at least 15 rows."""
    text = (ROOT / "docs/ERRORS.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`", text)
    assert len(refs) >= 15
    ids = {c[0] for c in CASES}
    for path, name, case in refs:
        source = (ROOT / path).read_text()
        assert re.search(rf"^\s*def {name}\(", source, re.M), f"{path}::{name} not found"
        if path == "tests/test_errors.py" and case:
            assert case in ids, f"{path}::{name}[{case}]: no such case"


def test_out_on_a_read_only_file_system_is_one_line_before_any_work(workdir):
    """`--out` on a read-only mount (a tmpfs mounted read-only in a private mount namespace):
    one line naming the folder, before a teacher or student loads (the teacher named here does
    not exist: loading it would be another error)."""
    ro = workdir / "ro"
    ro.mkdir(exist_ok=True)
    for argv in (
        f"cache --teacher nothere:make --data d.jsonl --out {ro}/c",
        f"train --cache c --student nothere:make --out {ro}/run",
    ):
        script = f"mount -t tmpfs -o ro tmpfs {ro} && exec kdcache {argv}"
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=workdir
        )
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{ro} is not writable (a read-only file system" in lines[0], lines[0]

"""The examples in examples/ run as documented and their loss goes down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from kdcache.storage.manifest import CacheIdentity
from kdcache.storage.schema import CacheSchema
from kdcache.storage.synthetic import synthetic_block
from kdcache.storage.writer import write_cache

ROOT = Path(__file__).resolve().parents[1]


def test_own_loop_example_trains(tmp_path):
    schema = CacheSchema(k=8, vocab_size=300)
    block = synthetic_block(np.random.default_rng(0), [32] * 64, schema)
    write_cache(
        tmp_path / "c",
        CacheIdentity(backend="arrow", schema=schema, fingerprints={}, settings={"seq_len": 32}),
        [block],
    )
    r = subprocess.run(
        [sys.executable, ROOT / "examples/own_loop.py", tmp_path / "c", "--steps", "30"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", r.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]

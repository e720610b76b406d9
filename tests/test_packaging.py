"""The wheel holds every module of the three top-level folders, under kdcache.*."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("kdcache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "kdcache/" + p.relative_to(ROOT).as_posix()
        for top in ("storage", "stages", "pipeline")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert expected, "no modules found"
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.startswith(("storage/", "stages/", "pipeline/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kdcache = kdcache.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

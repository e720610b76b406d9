"""The wheel holds every module of the three top-level folders under kdcache.*, and the facade
as kdcache/__init__.py; every import path README and examples/ use works."""

from __future__ import annotations

import re
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
    expected.add("kdcache/__init__.py")  # facade/__init__.py: the package itself
    assert expected, "no modules found"
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    tops = ("storage/", "stages/", "pipeline/", "facade/", "tests/")
    assert not any(n.startswith(tops) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kdcache = kdcache.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def documented_imports() -> list[str]:
    """Every ``from kdcache... import ...`` and ``import kdcache...`` line of README.md's and
    docs/'s Python blocks and of examples/*.py."""
    texts = [(ROOT / "README.md").read_text()] + [
        p.read_text() for p in (ROOT / "docs").glob("*.md")
    ]
    lines = [
        line.strip()
        for text in texts
        for block in text.split("```python")[1:]
        for line in block.split("```")[0].splitlines()
    ]
    lines += [
        line.strip()
        for p in (ROOT / "examples").glob("*.py")
        for line in p.read_text().splitlines()
    ]
    return sorted({x for x in lines if re.match(r"(from kdcache[\w.]* import |import kdcache)", x)})


def test_every_documented_import_works():
    imports = documented_imports()
    assert any(x.startswith("from kdcache import") for x in imports), imports
    for line in imports:
        exec(line, {})  # raises ImportError / AttributeError if a documented path broke


def test_the_facade_and_the_old_paths_name_the_same_objects():
    import kdcache
    from kdcache.stages.dataset import CacheBatches  # the paths of earlier READMEs
    from kdcache.stages.losses import build_loss, chunked_loss
    from kdcache.storage.reader import CacheReader

    assert kdcache.CacheBatches is CacheBatches and kdcache.CacheReader is CacheReader
    assert kdcache.build_loss is build_loss and kdcache.chunked_loss is chunked_loss
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None, name

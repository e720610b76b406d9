"""The architecture, checked: import rules (lint-imports with pyproject's contracts: layers,
stage two never imports stage one, no circles), no import of another module's private names,
and short functions on the capture and storage paths."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"facade": "", "storage": "storage", "stages": "stages", "pipeline": "pipeline"}


def source_files() -> list[Path]:
    return sorted(p for top in FOLDERS for p in (ROOT / top).rglob("*.py"))


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]] if rel.parts[0] != "facade" else ["__init__.py"]
    name = ".".join(p for p in ["kdcache", *parts] if p).removesuffix(".py")
    return name.removesuffix(".__init__")


def test_import_contracts_hold(tmp_path):
    """lint-imports on the installed layout (kdcache/ = facade/, kdcache/storage = storage/...):
    the folders are mapped at install time, so the layout is rebuilt here for the analysis."""
    pkg = tmp_path / "kdcache"
    shutil.copy(ROOT / "facade" / "__init__.py", pkg.parent / "__init__.tmp")
    pkg.mkdir()
    (pkg.parent / "__init__.tmp").rename(pkg / "__init__.py")
    for top in ("storage", "stages", "pipeline"):
        shutil.copytree(ROOT / top, pkg / top, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    script = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [str(script), "pyproject.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "4 kept, 0 broken" in r.stdout, r.stdout


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdcache"):
                found += [
                    f"{module_of(path)}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not found, found


# The capture and storage paths: every function at most MAX_LINES long, except these.
MAX_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {}
CHECKED = ("kdcache.storage", "kdcache.stages.capture", "kdcache.pipeline.executors")


def function_lengths() -> dict[str, int]:
    out = {}
    for path in source_files():
        module = module_of(path)
        if not module.startswith(CHECKED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out[f"{module}.{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_capture_and_storage_functions_are_short():
    lengths = function_lengths()
    assert len(lengths) > 100
    long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in LONG_FUNCTIONS}
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    stale = set(LONG_FUNCTIONS) - {n for n, k in lengths.items() if k > MAX_LINES}
    assert not stale, f"listed as long but no longer: {stale}"


@pytest.mark.parametrize("path", ["README.md"])
def test_development_section_maps_every_folder(path):
    text = (ROOT / path).read_text().split("## Development", 1)[1]
    for folder in (
        "storage/",
        "storage/backends/",
        "stages/capture/",
        "stages/train/",
        "stages/models/",
        "pipeline/",
        "pipeline/executors/",
        "pipeline/cli/",
        "facade/",
        "tests/",
        "benchmarks/",
    ):
        assert f"`{folder}`" in text, folder

"""The project's dvc.yaml, run for real by DVC in a temporary git repository with tiny params."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "workdir": "w",
    "prepare": {"max_files": 8, "vocab_size": 400},
    "teacher": {"size": "nano", "block_size": 32, "steps": 15, "batch_size": 8},
    "cache": {
        "teacher": "w/teacher",
        "data": "w/data/train.jsonl",
        "heldout": "w/data/heldout.jsonl",
        "k": 8,
        "seq_len": 32,
        "stride": 32,
        "backend": "zarr",
    },
    "students": {
        name: {
            "size": "nano",
            "loss": loss,
            "steps": 4,
            "batch_size": 4,
            "lr": 0.001,
            "warmup": 1,
            "eval_every": 2,
        }
        for name, loss in (("kd-a", "forward_kl_tail"), ("hard-a", "ce"))
    },
}


def _dvc(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    r = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout + r.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_pipeline_reruns_exactly_what_changed(tmp_path):
    pytest.importorskip("dvc", reason="install the dvc extra: pip install 'kdcache[dvc]'")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(params) == set(TINY), "params.yaml and the test's tiny params name the same sections"
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")

    first = _dvc(repo, "repro")
    expected = {
        "prepare",
        "teacher",
        "cache",
        "cache-heldout",
        "student@kd-a",
        "student@hard-a",
        "report",
    }
    assert ran(first) == expected, first
    report_md = (repo / "w/report/report.md").read_text()
    assert report_md.count("| kd-a |") == 3  # quality, cost to deploy, cost to make
    assert (repo / "w/report/heldout_loss.png").stat().st_size > 0
    assert (repo / "w/runs/kd-a/metrics.json").is_file() and (
        repo / "w/cache/manifest.json"
    ).is_file()

    assert ran(_dvc(repo, "repro")) == set()  # nothing changed: nothing runs

    TINY["students"]["kd-a"]["steps"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert ran(_dvc(repo, "repro")) == {"student@kd-a", "report"}

    TINY["cache"]["k"] = 4  # the cache is replaced (not refused) and everything after it reruns
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert ran(_dvc(repo, "repro")) == {
        "cache",
        "cache-heldout",
        "student@kd-a",
        "student@hard-a",
        "report",
    }
    import json

    assert json.loads((repo / "w/cache/manifest.json").read_text())["schema"]["k"] == 4

"""The project's dvc.yaml, run for real by DVC in a temporary git repository with tiny params."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
            "checkpoint_every": 2,
        }
        for name, loss in (("kd-a", "forward_kl_tail"), ("hard-a", "ce"))
    },
}


def _env() -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }


def _dvc(repo: Path, *args: str, stdout_only: bool = False) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return r.stdout if stdout_only else r.stdout + r.stderr


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _params(repo: Path) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))


def _metric_rows(exp_show: list) -> list[dict]:
    """The metrics of every row (workspace, commits, experiments) of `dvc exp show --json`."""
    rows = []

    def walk(entry: dict) -> None:
        data = entry.get("data") or {}
        rows.append(
            {"rev": entry.get("rev"), "name": entry.get("name"), **(data.get("metrics") or {})}
        )
        for exp in entry.get("experiments") or []:
            for run in exp.get("revs") or []:
                walk(run)

    for entry in exp_show:
        walk(entry)
    return rows


@pytest.mark.slow
def test_dvc_pipeline_reruns_exactly_what_changed(tmp_path):
    pytest.importorskip("dvc", reason="install the dvc extra: pip install 'kdcache[dvc]'")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(params) == set(TINY), "params.yaml and the test's tiny params name the same sections"
    assert set(params["students"]["kd-micro"]) == set(TINY["students"]["kd-a"])
    _params(repo)
    (repo / ".gitignore").write_text("/w/\n")  # as the project's .gitignore ignores its workdir
    _git(repo, "init", "-q")
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
    # Metrics files hold numbers users compare: no config, no prose.
    for metrics in ("w/teacher/metrics.json", "w/report/metrics.json", "w/runs/kd-a/metrics.json"):
        flat = json.loads((repo / metrics).read_text())
        assert all(isinstance(v, int | float | dict | None) for v in flat.values()), metrics

    assert ran(_dvc(repo, "repro")) == set()  # nothing changed: nothing runs
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "baseline")

    # Versioned metrics and plots: experiments and diffs against a revision see real values.
    _dvc(repo, "exp", "run", "-S", "students.kd-a.steps=6")
    rows = _metric_rows(json.loads(_dvc(repo, "exp", "show", "--json", stdout_only=True)))
    steps = [
        r["w/runs/kd-a/metrics.json"]["data"]["steps"]
        for r in rows
        if "w/runs/kd-a/metrics.json" in r
    ]
    assert sorted(steps) == [4, 6, 6], rows  # baseline, the experiment, the workspace
    assert "w/runs/kd-a/metrics.json" in _dvc(repo, "metrics", "diff", "HEAD")
    assert "steps.tsv" in _dvc(repo, "plots", "diff", "HEAD", "--json")
    _git(repo, "checkout", "-q", "--", "params.yaml")  # back to the baseline
    _dvc(repo, "checkout", "-q")

    TINY["students"]["kd-a"]["steps"] = 5
    _params(repo)
    assert ran(_dvc(repo, "repro")) == {"student@kd-a", "report"}

    # An interrupted student stage resumes from its checkpoint (DVC keeps it: persist).
    TINY["students"]["kd-a"].update(steps=400, checkpoint_every=20)
    _params(repo)
    ckpts = repo / "w/runs/kd-a/checkpoints"
    shutil.rmtree(ckpts, ignore_errors=True)
    victim = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "student@kd-a"],
        cwd=repo,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while (
        not any(ckpts.glob("step-*/COMMITTED"))
        and time.monotonic() < deadline
        and victim.poll() is None
    ):
        time.sleep(0.05)
    assert victim.poll() is None, "the student stage ended before it could be interrupted"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    again = _dvc(repo, "repro", "student@kd-a")
    assert re.search(r"400 steps \(resumed at step [1-9]\d*\)", again), again
    steps_log = (repo / "w/runs/kd-a/steps.tsv").read_text().splitlines()[1:]
    assert [int(x.split("\t")[0]) for x in steps_log] == list(range(1, 401))  # whole, in order

    TINY["cache"]["k"] = 4  # the cache is replaced (not refused) and everything after it reruns
    _params(repo)
    assert ran(_dvc(repo, "repro")) == {
        "cache",
        "cache-heldout",
        "student@kd-a",
        "student@hard-a",
        "report",
    }
    assert json.loads((repo / "w/cache/manifest.json").read_text())["schema"]["k"] == 4

    # A recapture that comes out bit-identical retrains nothing (timestamps differ).
    shutil.rmtree(repo / "w/cache")
    assert ran(_dvc(repo, "repro")) == {"cache"}

    # A student removed from params.yaml leaves the report.
    del TINY["students"]["hard-a"]
    _params(repo)
    assert ran(_dvc(repo, "repro")) == {"report"}
    report_md = (repo / "w/report/report.md").read_text()
    assert "hard-a" not in report_md and "| kd-a |" in report_md

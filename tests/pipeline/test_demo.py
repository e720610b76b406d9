"""README's main job, at its quick size: `kdcache demo --quick` runs every stage through the real
CLI and ends with the distillation report."""

import json
import subprocess

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_ends_with_the_report(tmp_path):
    work = tmp_path / "demo"
    r = subprocess.run(
        ["kdcache", "demo", "--quick", "--workdir", str(work), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "## Quality on held-out data" in r.stdout and "## Cost to deploy" in r.stdout
    report = json.loads((work / "report" / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "kd-micro", "kd-nano", "hard-nano"]
    assert report["models"]["kd-nano"]["loss"] == "0.7*soft_ce+0.3*ce"  # the demo's KD setting
    assert report["models"]["kd-nano"]["hard_reference"] == "hard-nano"
    for name in ("quality_vs_size.png", "quality_vs_speed.png", "heldout_loss.png"):
        assert (work / "report" / name).stat().st_size > 0
    # the cache the students learned from verifies clean
    v = subprocess.run(["kdcache", "verify", str(work / "cache")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

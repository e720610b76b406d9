"""``kdcache report``: the runs side by side (Markdown table, report.json for scripts and DVC)."""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.storage.errors import ConfigError
from kdcache.storage.manifest import read_json


def load_run(run: Path) -> dict:
    metrics = read_json(Path(run) / "metrics.json")
    if metrics is None:
        raise ConfigError(
            f"run {run} has no metrics.json (not finished, or not a kdcache train run); finish it or leave it out"
        )
    ev = metrics.get("eval") or {}
    return {
        "run": Path(run).name,
        "student": metrics["student"],
        "loss": metrics["loss"],
        "params": metrics["params"],
        "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"],
        "heldout_ce": ev.get("ce"),
        "kl_topk": ev.get("kl_topk"),
        "top1_agreement": ev.get("top1_agreement"),
    }


def build_report(runs: list[Path], *, teacher: Path | None = None, out: Path | None = None) -> dict:
    rows = [load_run(r) for r in runs]
    report: dict = {"runs": rows}
    if teacher is not None:
        tm = read_json(Path(teacher) / "metrics.json")
        if tm is None:
            raise ConfigError(
                f"teacher {teacher} has no metrics.json; pass the folder written by `kdcache teacher-train`"
            )
        report["teacher"] = {
            "params": tm["params"],
            "heldout_ce": tm.get("heldout_ce"),
            "train_seconds": tm["train_seconds"],
        }
    report["markdown"] = markdown(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(report["markdown"] + "\n")
        (out / "report.json").write_text(
            json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2) + "\n"
        )
    return report


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    lines = [
        "| run | student | loss | held-out CE | KL to teacher top-k | top-1 agreement | parameters | steps | training time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "teacher" in report:
        t = report["teacher"]
        lines.append(
            f"| teacher | | | {_f(t['heldout_ce'], '.4f')} | | | {t['params']:,} | | {t['train_seconds']:.0f} s |"
        )
    for r in report["runs"]:
        lines.append(
            f"| {r['run']} | {r['student']} | {r['loss']} | {_f(r['heldout_ce'], '.4f')} | {_f(r['kl_topk'], '.4f')} | "
            f"{_f(r['top1_agreement'], '.3f')} | {r['params']:,} | {r['steps']} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)

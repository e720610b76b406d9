"""``kdcache report`` on tiny real runs: a teacher trained on a few stdlib files, its cache, two
distilled students of two sizes and a hard-label student the size of the small one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.pipeline.cli import main
from kdcache.pipeline.report import MissingMetricsError, build_report
from kdcache.pipeline.report_render import PLOTS
from kdcache.storage.manifest import committed_records

RUNS = (
    ("kd-micro", "micro", "forward_kl_tail"),
    ("kd-nano", "nano", "forward_kl_tail"),
    ("hard-nano", "nano", "ce"),
)
QUALITY = [
    "model",
    "loss",
    "parameters",
    "held-out CE",
    "perplexity",
    "top-1 agreement",
    "ECE",
    "kept",
    "CE gain over hard labels",
]
DEPLOY = [
    "model",
    "parameters",
    "bytes on disk",
    "peak memory",
    "tokens/s, batch 1",
    "latency per token, batch 1",
    "tokens/s, batch 16",
]
MAKE = ["model", "steps", "training tokens", "training time", "teacher capture", "cache bytes"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """WORK/teacher, WORK/cache, WORK/cache-heldout, WORK/runs/{kd-micro,kd-nano,hard-nano}."""
    from kdcache.pipeline.demo import prepare
    from kdcache.pipeline.executors import run_capture
    from kdcache.pipeline.pretrain import PretrainConfig, run_pretrain
    from kdcache.stages.capture import CaptureConfig
    from kdcache.stages.train import TrainConfig, run_train

    w = tmp_path_factory.mktemp("report")
    prepare(w, max_files=4, vocab_size=300)
    run_pretrain(
        PretrainConfig(
            data=str(w / "data/train.jsonl"),
            tokenizer=str(w / "tokenizer"),
            out=str(w / "teacher"),
            heldout=str(w / "data/heldout.jsonl"),
            size="nano",
            block_size=32,
            steps=60,  # enough to beat the unigram baseline, so that "kept" is defined
            warmup=5,
            device="cpu",
            progress=False,
        )
    )
    for split, name in (("train", "cache"), ("heldout", "cache-heldout")):
        run_capture(
            CaptureConfig(
                teacher=str(w / "teacher"),
                data=str(w / f"data/{split}.jsonl"),
                out=str(w / name),
                k=8,
                seq_len=32,
                stride=32,
                device="cpu",
                progress=False,
            )
        )
    for name, size, loss in RUNS:
        run_train(
            TrainConfig(
                cache=str(w / "cache"),
                eval_cache=str(w / "cache-heldout"),
                student=size,
                loss=loss,
                out=str(w / "runs" / name),
                steps=4,
                batch_size=4,
                warmup=1,
                eval_every=2,
                eval_batches=5,
                checkpoint_every=4,
                device="cpu",
                progress=False,
            )
        )
    return w


@pytest.fixture(scope="module")
def report(work) -> dict:
    runs = [work / "runs" / name for name, _, _ in RUNS]
    return build_report(runs, teacher=work / "teacher", out=work / "report", speed_seconds=0.05)


def _header(markdown: str, first_cell: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _rows(markdown: str, header: list[str]) -> dict[str, dict[str, str]]:
    """The rows of the table whose header is ``header``, by model name."""
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(header) + " |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_every_column_and_row_present(report):
    md = report["markdown"]
    names = ["teacher"] + [n for n, _, _ in RUNS]
    for header in (QUALITY, DEPLOY, MAKE):
        assert "| " + " | ".join(header) + " |" in md
        rows = _rows(md, header)
        assert set(names) <= set(rows)
        for name in names:
            assert all(rows[name][c] for c in header[:4]), (name, rows[name])
    # the measured deploy columns hold numbers for every model
    for name, row in _rows(md, DEPLOY).items():
        assert "n/a" not in row.values(), (name, row)
    assert list(report["models"]) == ["teacher", "kd-micro", "kd-nano", "hard-nano"]
    assert "kept = (CE_unigram - CE) / (CE_unigram - CE_teacher)" in md


def test_numbers_match_each_runs_metrics(report, work):
    models, b = report["models"], report["baselines"]
    teacher_ce = models["teacher"]["heldout_ce"]
    assert teacher_ce < b["unigram_ce"] < b["uniform_ce"] + 1e-9
    assert models["teacher"]["kept"] == pytest.approx(1.0)
    md = _rows(report["markdown"], QUALITY)
    for name, _, loss in RUNS:
        m = json.loads((work / "runs" / name / "metrics.json").read_text())
        r = models[name]
        for key, ours in (
            ("ce", "heldout_ce"),
            ("ece", "ece"),
            ("top1_agreement", "top1_agreement"),
            ("perplexity", "perplexity"),
        ):
            assert r[ours] == m["eval"][key], (name, key)
        for key in ("params", "steps", "tokens", "train_seconds"):
            assert r[key] == m[key], (name, key)
        config = json.loads((work / "runs" / name / "config.json").read_text())["config"]
        assert r["loss"] == config["loss"] == loss and r["student"] == config["student"]
        assert md[name]["held-out CE"] == f"{m['eval']['ce']:.4f}"
        assert md[name]["parameters"] == f"{m['params']:,}"
        kept = (b["unigram_ce"] - m["eval"]["ce"]) / (b["unigram_ce"] - teacher_ce)
        assert r["kept"] == pytest.approx(kept)
        assert r["role"] == ("hard labels" if loss == "ce" else "distilled")
        # the curve ends at the final evaluation
        assert report["history"][name][-1] == {
            "step": 4,
            "ce": pytest.approx(m["eval"]["ce"], abs=1e-6),
        }
        assert r["bytes_on_disk"] == (work / "runs" / name / "student" / "model.pt").stat().st_size
        assert r["tokens_per_s_batch1"] > 0 and r["tokens_per_s_batched"] > 0
        assert r["latency_ms_per_token"] == pytest.approx(1000 / r["tokens_per_s_batch1"])
        if r["peak_memory_bytes"] is not None:  # Linux: weights + activations
            assert r["peak_memory_bytes"] >= 4 * m["params"]
    # what distillation added: the hard-label student of the same size is the reference
    assert models["kd-nano"]["hard_reference"] == "hard-nano"
    assert models["kd-nano"]["ce_gain_over_hard"] == pytest.approx(
        models["hard-nano"]["heldout_ce"] - models["kd-nano"]["heldout_ce"]
    )
    assert models["kd-micro"]["hard_reference"] is None  # no hard-label micro run
    # cost to make: the capture from the cache's part records, only for distilled students
    loops = [r["capture"]["loop_seconds"] for r in committed_records(work / "cache").values()]
    manifest = json.loads((work / "cache" / "manifest.json").read_text())
    assert models["kd-nano"]["capture_seconds"] == pytest.approx(sum(loops)) and sum(loops) > 0
    assert models["kd-nano"]["cache_bytes"] == manifest["bytes_on_disk"]
    assert models["hard-nano"]["capture_seconds"] is None
    teacher_metrics = json.loads((work / "teacher" / "metrics.json").read_text())
    assert models["teacher"]["train_seconds"] == teacher_metrics["train_seconds"]
    assert models["teacher"]["params"] == teacher_metrics["params"]
    # report.json holds the same figures
    saved = json.loads((work / "report" / "report.json").read_text())
    assert saved["models"]["kd-nano"]["heldout_ce"] == models["kd-nano"]["heldout_ce"]
    assert math.isfinite(saved["baselines"]["unigram_ce"])
    assert (work / "report" / "report.md").read_text().strip() == report["markdown"]


def test_plots_written_and_decode(report, work):
    import matplotlib.image

    assert report["plots"] == list(PLOTS)
    for name in PLOTS:
        path = work / "report" / name
        assert path.stat().st_size > 1000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas


def test_cli_report_and_missing_metrics(work, tmp_path):
    runs = [str(work / "runs" / name) for name, _, _ in RUNS]
    out = tmp_path / "rep"
    r = CliRunner().invoke(
        main,
        [
            "report",
            *runs,
            "--teacher",
            str(work / "teacher"),
            "--out",
            str(out),
            "--speed-seconds",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "| kd-nano | forward_kl_tail |" in r.output
    saved = json.loads((out / "report.json").read_text())
    assert saved["inference"] is None and saved["models"]["kd-nano"]["bytes_on_disk"] > 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted([PLOTS[0], PLOTS[2]])

    unfinished = tmp_path / "unfinished-run"
    unfinished.mkdir()
    r = CliRunner().invoke(main, ["report", runs[0], str(unfinished)])
    assert r.exit_code == 2
    assert "unfinished-run" in r.output and "metrics.json" in r.output
    assert "Traceback" not in r.output
    with pytest.raises(MissingMetricsError, match="unfinished-run"):
        build_report([Path(runs[0]), unfinished], speed_seconds=0)

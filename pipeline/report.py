"""``kdcache report``: the distillation trade of every run, side by side with standard training.

For the teacher and each student run (a folder written by ``kdcache train``):

    quality        held-out CE, perplexity, top-1 agreement with the teacher, ECE, and *kept*:
                   the share of the teacher's gain over a unigram model that the student keeps,
                   (CE_unigram - CE) / (CE_unigram - CE_teacher)
    cost to deploy parameters, bytes on disk, peak memory, tokens/s at batch 1 and batched,
                   latency per token (measured here, see kdcache.pipeline.measure)
    cost to make   teacher capture time and cache bytes (from the cache's part records),
                   student training time, steps and tokens (from metrics.json)

Students' quality is read from their metrics.json; the teacher is evaluated here on the same
held-out batches (the first run's evaluation set), and the unigram baseline is fitted on the
training cache's tokens (add-one smoothing). Hard-label runs (``--loss ce``) sit next to the
distilled runs of the same student size, so the table shows what distillation added.

Writes OUT/report.md, OUT/report.json (every figure), OUT/metrics.json (the numbers runs are
compared by: DVC's metrics) and three PNG plots.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from kdcache.pipeline.report_render import KEPT, markdown, write_plots
from kdcache.stages.train import rundir
from kdcache.storage.durable import read_json
from kdcache.storage.errors import ConfigError

log = logging.getLogger(__name__)

UNIGRAM_MAX_POSITIONS = 10_000_000  # tokens of the training cache read for the unigram baseline


class MissingMetricsError(ConfigError):
    """A run (or the teacher) given to the report has no metrics.json."""


# -- inputs ----------------------------------------------------------------------------------
def load_run(run: Path) -> dict:
    """metrics.json, config.json and eval.tsv of one ``kdcache train`` run."""
    run = Path(run)
    metrics = read_json(run / rundir.METRICS)
    if metrics is None:
        raise MissingMetricsError(
            f"run {run} has no metrics.json (not a finished `kdcache train` run); finish it or leave it out"
        )
    saved = read_json(run / rundir.CONFIG) or {}
    history = []
    if (run / rundir.EVAL).is_file():
        with open(run / rundir.EVAL) as f:
            history = [
                {"step": int(r["step"]), "ce": float(r["eval_ce"])}
                for r in csv.DictReader(f, delimiter="\t")
            ]
    return {
        "path": run,
        "metrics": metrics,
        "config": saved.get("config") or {},
        "history": history,
    }


def _eval_set(cfg: dict):
    """The held-out batches ``kdcache train`` evaluated this run on, and how many it took."""
    from dataclasses import fields

    from kdcache.stages.train import TrainConfig, heldout_batches

    known = {f.name for f in fields(TrainConfig)}
    return heldout_batches(TrainConfig(**{k: v for k, v in cfg.items() if k in known})), int(
        cfg["eval_batches"]
    )


def _eval_identity(cfg: dict) -> tuple:
    keys = ("eval_cache", "eval_batches", "batch_size", "grad_accum", "seed")
    held_slice = () if cfg.get("eval_cache") else (cfg.get("cache"), cfg.get("eval_fraction"))
    return tuple(cfg.get(k) for k in keys) + held_slice


def _check_caches(runs: list[dict]) -> None:
    for r in runs:
        cfg = r["config"]
        for key in ("cache", "eval_cache"):
            if cfg.get(key) and not Path(cfg[key]).exists():
                raise ConfigError(
                    f"run {r['path']} was trained with --{key.replace('_', '-')} {cfg[key]}, which is not there; "
                    "run the report from the directory you trained in, with the caches in place"
                )
        if not cfg:
            raise ConfigError(
                f"run {r['path']} has no config.json; pass folders written by `kdcache train`"
            )


def unigram_ce(train_cache: str, batches, max_batches: int, vocab: int) -> float:
    """Held-out CE of token frequencies counted over the training cache (add-one smoothing)."""
    from kdcache.storage.reader import CacheReader
    from kdcache.storage.schema import IGNORE_INDEX

    counts = np.ones(vocab, np.float64)
    seen = 0
    for block in CacheReader(train_cache).iter_blocks(256):
        counts += np.bincount(block.input_ids.astype(np.int64), minlength=vocab)[:vocab]
        seen += block.num_positions
        if seen >= UNIGRAM_MAX_POSITIONS:
            break
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        labels = batch.labels[batch.valid & batch.target_mask]
        labels = labels[labels != IGNORE_INDEX].numpy()
        total -= float(logp[labels].sum())
        n += len(labels)
    return total / max(n, 1)


def cache_cost(path: str) -> dict:
    """Bytes and positions of a cache, and the teacher's capture time summed over its parts."""
    from kdcache.storage.manifest import committed_records
    from kdcache.storage.reader import CacheReader

    d = CacheReader(path).describe()
    loops = [
        (rec.get("capture") or {}).get("loop_seconds")
        for rec in committed_records(Path(path)).values()
    ]
    return {
        "path": str(path),
        "bytes": d["bytes_on_disk"],
        "positions": d["num_positions"],
        "k": d["k"],
        "capture_seconds": sum(loops) if loops and None not in loops else None,
    }


def _folder_bytes(paths: list[Path]) -> int:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files)


# -- the report ------------------------------------------------------------------------------
def build_report(
    runs: list[Path],
    *,
    teacher: Path | None = None,
    out: Path | None = None,
    speed_seconds: float = 1.0,
    device: str = "auto",
) -> dict:
    """Every figure of the report (also OUT/report.json); ``report["markdown"]`` is the text.

    speed_seconds: time per inference setting and model (0: no inference measurement)."""
    from kdcache.pipeline.measure import SpeedSettings, measure_inference
    from kdcache.stages.models.adapters import load_model
    from kdcache.stages.models.devices import pick_device
    from kdcache.stages.train import evaluate, loss_label
    from kdcache.storage.reader import CacheReader

    if not runs:
        raise ConfigError("no run given; pass the folders written by `kdcache train`")
    loaded = [load_run(r) for r in runs]  # every missing metrics.json before any model loads
    teacher_metrics = None
    if teacher is not None:
        # None for a teacher not trained by `kdcache teacher-train` (its training time: n/a)
        teacher_metrics = read_json(Path(teacher) / "metrics.json")
    _check_caches(loaded)
    dev = pick_device(device)
    names = _names([r["path"] for r in loaded])
    cfg0 = loaded[0]["config"]
    notes = []
    if len({_eval_identity(r["config"]) for r in loaded}) > 1:
        notes.append(
            f"the runs were evaluated on different held-out sets; the teacher and the unigram "
            f"baseline use {names[0]}'s"
        )
    eval_ds, eval_batches = _eval_set(cfg0)
    vocab = CacheReader(cfg0["cache"]).vocab_size
    uni = unigram_ce(cfg0["cache"], iter(eval_ds), eval_batches, vocab)
    settings = SpeedSettings(
        seconds=speed_seconds,
        seq_len=CacheReader(cfg0.get("eval_cache") or cfg0["cache"])
        .manifest["settings"]
        .get("seq_len")
        or 128,
    )

    def speed(spec: Path, model=None) -> tuple[dict, int | None]:
        if model is None:
            try:
                model = load_model(str(spec), dev)
            except ConfigError as e:
                notes.append(f"{spec}: not measured ({e})")
                return {}, None
        files = model.weight_files or [Path(spec)]
        m = measure_inference(model, settings, dev) if speed_seconds > 0 else {}
        return m, _folder_bytes(files)

    rows: dict[str, dict] = {}
    teacher_ce = None
    if teacher is not None:
        tm = teacher_metrics or {}
        model = load_model(str(teacher), dev)
        ev = evaluate(model, iter(eval_ds), dev, max_batches=eval_batches)
        teacher_ce = ev["ce"]
        params = sum(p.numel() for p in model.module.parameters())
        inference, nbytes = speed(Path(teacher), model)  # memory: the rise over its weights
        del model
        rows["teacher"] = {
            "role": "teacher",
            "student": str(teacher),
            "loss": "ce (pretraining)" if tm else None,
            "params": params,
            "heldout_ce": ev["ce"],
            "perplexity": ev["perplexity"],
            "top1_agreement": ev["top1_agreement"],
            "ece": ev["ece"],
            "kl_topk": ev["kl_topk"],
            "eval_tokens": ev["tokens"],
            "bytes_on_disk": nbytes,
            **inference,
            "steps": tm.get("steps"),
            "tokens": tm.get("tokens"),
            "train_seconds": tm.get("train_seconds"),
        }
    caches = {}
    for name, r in zip(names, loaded, strict=True):
        m, ev = r["metrics"], r["metrics"].get("eval") or {}
        cache = r["config"]["cache"]
        if cache not in caches:
            caches[cache] = cache_cost(cache)
        loss = loss_label(r["config"])
        hard = loss == "ce"
        inference, nbytes = speed(r["path"] / rundir.STUDENT)
        rows[name] = {
            "role": "hard labels" if hard else "distilled",
            "student": r["config"]["student"],
            "loss": loss,
            "params": m["params"],
            "heldout_ce": ev.get("ce"),
            "perplexity": ev.get("perplexity"),
            "top1_agreement": ev.get("top1_agreement"),
            "ece": ev.get("ece"),
            "kl_topk": ev.get("kl_topk"),
            "eval_tokens": ev.get("tokens"),
            "bytes_on_disk": nbytes,
            **inference,
            "steps": m["steps"],
            "tokens": m["tokens"],
            "train_seconds": m["train_seconds"],
            # a hard-label student needs no teacher: the capture is a cost of distillation only
            "cache": None if hard else cache,
            "capture_seconds": None if hard else caches[cache]["capture_seconds"],
            "cache_bytes": None if hard else caches[cache]["bytes"],
        }
    if teacher_ce is not None and teacher_ce >= uni:
        notes.append(
            f"the teacher (CE {teacher_ce:.4f}) is no better than the unigram baseline "
            f"(CE {uni:.4f}): kept is undefined; train the teacher longer"
        )
    for row in rows.values():
        ce = row["heldout_ce"]
        defined = ce is not None and teacher_ce is not None and teacher_ce < uni
        row["kept"] = (uni - ce) / (uni - teacher_ce) if defined else None
    _pair_with_hard_labels(rows)
    report = {
        "definitions": {
            "kept": KEPT,
            "heldout": "CE, perplexity, ECE and top-1 agreement on the runs' held-out batches",
        },
        "eval_set": {
            "cache": cfg0.get("eval_cache") or f"{cfg0['cache']} (held-out slice)",
            "batches": eval_batches,
            "tokens": rows.get("teacher", {}).get("eval_tokens"),
        },
        "baselines": {"unigram_ce": uni, "uniform_ce": math.log(vocab), "vocab_size": vocab},
        "inference": settings.describe(dev) if speed_seconds > 0 else None,
        "caches": caches,
        "models": _ordered(rows),
        "history": {n: r["history"] for n, r in zip(names, loaded, strict=True)},
        "notes": notes,
        "plots": [],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report["plots"] = write_plots(report, out)
    report["markdown"] = markdown(report)
    if out is not None:
        (out / "report.md").write_text(report["markdown"] + "\n")
        (out / "report.json").write_text(
            json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2) + "\n"
        )
        (out / METRICS).write_text(json.dumps(metrics_of(report), indent=2) + "\n")
    return report


METRICS = "metrics.json"  # OUT/: the numbers of report.json runs are compared by (DVC metrics)
METRIC_FIELDS = (
    "heldout_ce",
    "perplexity",
    "top1_agreement",
    "ece",
    "kept",
    "params",
    "bytes_on_disk",
    "tokens_per_s_batch1",
    "tokens_per_s_batched",
    "train_seconds",
)


def metrics_of(report: dict) -> dict:
    """Per model, the numbers a comparison of runs looks at (``dvc metrics show``, ``dvc exp
    show``): no prose, no settings; report.json keeps everything."""
    return {
        name: {k: row[k] for k in METRIC_FIELDS if isinstance(row.get(k), int | float)}
        for name, row in report["models"].items()
    } | {"unigram_ce": report["baselines"]["unigram_ce"]}


def selected_runs(folders: list[Path], students: str | None) -> list[Path]:
    """The run folders to report: ``folders`` as given, or (``students`` = ``FILE:KEY``, e.g.
    DVC's ``params.yaml:students``) the subfolders of each folder named by KEY's entries, in
    their order: a student removed from the params file leaves the report, though its old run
    folder stays on disk."""
    if students is None:
        return folders
    import yaml

    file, _, key = students.rpartition(":")
    if not file or not key:
        raise ConfigError(
            f"--students expects FILE:KEY (e.g. params.yaml:students), got {students!r}"
        )
    try:
        entries = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--students {students}: cannot read {file} ({e})") from None
    for part in key.split("."):
        entries = entries.get(part) if isinstance(entries, dict) else None
    if not isinstance(entries, dict | list) or not entries:
        raise ConfigError(
            f"--students {students}: expected a mapping or list of student names at {key!r} "
            f"in {file}, found {type(entries).__name__}"
        )
    return [folder / str(name) for folder in folders for name in entries]


def _names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) < len(names):  # runs/a/x and runs/b/x: the paths tell them apart
        names = [str(p) for p in paths]
    if "teacher" in names:
        names = [str(p) if n == "teacher" else n for n, p in zip(names, paths, strict=True)]
    return names


def _pair_with_hard_labels(rows: dict[str, dict]) -> None:
    """ce_gain_over_hard = CE(hard-label run of the same student size) - CE(this run)."""
    for row in rows.values():
        row["hard_reference"], row["ce_gain_over_hard"] = None, None
        if row["role"] != "distilled":
            continue
        same = [
            (n, r)
            for n, r in rows.items()
            if r["role"] == "hard labels"
            and (r["student"], r["params"]) == (row["student"], row["params"])
        ]
        same.sort(key=lambda nr: nr[1]["steps"] != row["steps"])  # the same steps first
        if same and None not in (same[0][1]["heldout_ce"], row["heldout_ce"]):
            row["hard_reference"] = same[0][0]
            row["ce_gain_over_hard"] = same[0][1]["heldout_ce"] - row["heldout_ce"]


def _ordered(rows: dict[str, dict]) -> dict[str, dict]:
    """The teacher, then by size (largest first), each size's distilled runs before its hard ones."""
    order = sorted(
        rows,
        key=lambda n: (
            rows[n]["role"] != "teacher",
            -(rows[n]["params"] or 0),
            rows[n]["student"],
            rows[n]["role"] == "hard labels",
        ),
    )
    return {n: rows[n] for n in order}

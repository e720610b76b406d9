"""Rendering ``kdcache report``: the Markdown tables and the PNG plots of a report dict (built by
kdcache.pipeline.report.build_report; its keys are the contract)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

PLOTS = ("quality_vs_size.png", "quality_vs_speed.png", "heldout_loss.png")
KEPT = (
    "kept = (CE_unigram - CE) / (CE_unigram - CE_teacher): the share of the teacher's gain over a "
    "unigram model (fitted on the training cache, add-one smoothing) that the model keeps; "
    "1 = the teacher's quality, 0 = no better than token frequencies"
)


def _f(x, fmt: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, fmt) + suffix


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _bytes(n) -> str:
    return "n/a" if n is None else human_bytes(n)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cells) + " |" for cells in lines
    ]


def markdown(report: dict) -> str:
    models, b = report["models"], report["baselines"]
    out = [
        "## Quality on held-out data",
        "",
        f"Held-out set: {report['eval_set']['cache']}. {KEPT}. "
        f"Unigram CE {b['unigram_ce']:.4f}, uniform CE ln({b['vocab_size']}) = {b['uniform_ce']:.4f}. "
        "Gain over hard labels: CE of the hard-label student of the same size minus this run's.",
        "",
    ]
    q = [
        [
            n,
            r["loss"] or "",
            f"{r['params']:,}",
            _f(r["heldout_ce"], ".4f"),
            _f(r["perplexity"], ".1f"),
            _f(r["top1_agreement"], ".3f"),
            _f(r["ece"], ".4f"),
            _f(r["kept"], ".3f"),
            _f(r["ce_gain_over_hard"], "+.4f") if r["role"] == "distilled" else "",
        ]
        for n, r in models.items()
    ]
    q.append(
        [
            "unigram",
            "token frequencies",
            "",
            f"{b['unigram_ce']:.4f}",
            f"{math.exp(b['unigram_ce']):.1f}",
            "",
            "",
            "0.000",
            "",
        ]
    )
    out += _table(
        [
            "model",
            "loss",
            "parameters",
            "held-out CE",
            "perplexity",
            "top-1 agreement",
            "ECE",
            "kept",
            "CE gain over hard labels",
        ],
        q,
    )
    inf = report["inference"]
    out += ["", "## Cost to deploy", ""]
    if inf:
        out += [
            f"Measured on this machine ({inf['device']}, {inf['threads']} torch thread{'s' if inf['threads'] > 1 else ''}). Batch 1: {inf['batch1']}. "
            f"Batched: {inf['batched']}. Peak memory: {inf['memory']}.",
            "",
        ]
    d = [
        [
            n,
            f"{r['params']:,}",
            _bytes(r["bytes_on_disk"]),
            _bytes(r.get("peak_memory_bytes")),
            _f(r.get("tokens_per_s_batch1"), ",.0f"),
            _f(r.get("latency_ms_per_token"), ".2f", " ms"),
            _f(r.get("tokens_per_s_batched"), ",.0f"),
        ]
        for n, r in models.items()
    ]
    batch = inf["batch"] if inf else "N"
    out += _table(
        [
            "model",
            "parameters",
            "bytes on disk",
            "peak memory",
            "tokens/s, batch 1",
            "latency per token, batch 1",
            f"tokens/s, batch {batch}",
        ],
        d,
    )
    out += [
        "",
        "## Cost to make",
        "",
        "Teacher capture: the teacher run once over the training data (summed over the cache's parts); "
        "one capture serves every distilled student. Hard-label students need none.",
        "",
    ]
    c = [
        [
            n,
            _f(r["steps"], ","),
            _f(r["tokens"], ","),
            _f(r["train_seconds"], ".1f", " s"),
            _f(r.get("capture_seconds"), ".1f", " s"),
            _bytes(r.get("cache_bytes")),
        ]
        for n, r in models.items()
    ]
    out += _table(
        ["model", "steps", "training tokens", "training time", "teacher capture", "cache bytes"], c
    )
    for cache in report["caches"].values():
        out.append(
            f"\ncache {cache['path']}: {cache['positions']:,} positions, k={cache['k']}, {_bytes(cache['bytes'])}"
        )
    out += [f"\nNote: {n}" for n in report["notes"]]
    if report["plots"]:
        out += [""] + [f"![{p.removesuffix('.png')}]({p})" for p in report["plots"]]
    return "\n".join(out)


def write_plots(report: dict, out: Path) -> list[str]:
    """quality_vs_size.png, quality_vs_speed.png (when measured), heldout_loss.png."""
    try:
        import matplotlib
    except ImportError:
        msg = "plots skipped: they need matplotlib, pip install 'kdcache[plot]'"
        log.warning(msg)
        report["notes"].append(msg)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, uni = report["models"], report["baselines"]["unigram_ce"]
    style = {
        "teacher": ("*", "black"),
        "distilled": ("o", "tab:blue"),
        "hard labels": ("s", "tab:orange"),
    }
    written = []

    def scatter(x_key: str, xlabel: str, name: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for role, (marker, color) in style.items():
            pts = [
                (r[x_key], r["heldout_ce"], n)
                for n, r in models.items()
                if r["role"] == role and r.get(x_key) and r["heldout_ce"] is not None
            ]
            if pts:
                ax.scatter(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker=marker,
                    s=70,
                    color=color,
                    label=role,
                )
            for x, y, n in pts:
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axhline(uni, color="gray", linestyle="--", label="unigram")
        xs = [r[x_key] for r in models.values() if r.get(x_key)]
        if xs and max(xs) > 10 * min(xs):  # log only over more than a decade (readable ticks)
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    scatter("params", "parameters", PLOTS[0], "Quality against size")
    if report["inference"]:
        scatter(
            "tokens_per_s_batched",
            f"inference tokens/s, batch {report['inference']['batch']} ({report['inference']['device']})",
            PLOTS[1],
            "Quality against inference speed",
        )
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n, hist in report["history"].items():
        if hist:
            dashed = models[n]["role"] == "hard labels"
            ax.plot(
                [h["step"] for h in hist],
                [h["ce"] for h in hist],
                "--" if dashed else "-",
                marker="o",
                label=n,
            )
    if "teacher" in models:
        ax.axhline(models["teacher"]["heldout_ce"], color="black", linestyle=":", label="teacher")
    ax.axhline(uni, color="gray", linestyle="--", label="unigram")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("Held-out loss against steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)
    written.append(PLOTS[2])
    return written

"""Plot held-out cross-entropy against steps for every run of a demo (or DVC) work directory.

python benchmarks/plot_curves.py kdcache-demo --out docs/demo-heldout-ce.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in sorted((args.workdir / "runs").iterdir()):
        rows = list(csv.DictReader(open(run / "eval.tsv"), delimiter="\t"))
        if not rows:
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        style = "--" if metrics["loss"] == "ce" else "-"
        ax.plot(
            [int(r["step"]) for r in rows],
            [float(r["eval_ce"]) for r in rows],
            style,
            marker="o",
            label=f"{run.name} ({metrics['params'] / 1e6:.2f}M params, {metrics['loss']})",
        )
    results = args.workdir / "results.json"
    if results.exists():
        teacher = json.loads(results.read_text())["rows"][0]
        ax.axhline(
            teacher["ce"],
            color="gray",
            linestyle=":",
            label=f"teacher ({teacher['params'] / 1e6:.2f}M params)",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("Students trained from one teacher cache vs hard labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""PNG plots of a run: throughput per contender, and the latency distribution per rate.

matplotlib with the Agg backend (no display needed); written by ``python -m bench``, or again
from a run's raw numbers with ``python -m bench.plots bench/out/results-....json DIR``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.report import LABELS, Row


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput(rows: list[Row], lines: int, path: Path, title: str) -> Path:
    """Two panels: lines/s (median, whiskers min-max) and CPU-s per million lines."""
    plt = _pyplot()
    chosen = [r for r in rows if r.lines == lines or r.contender == "small-batches"]
    chosen.sort(key=lambda r: r.lines_per_s)
    names = [LABELS.get(r.contender, r.contender).replace("`", "") for r in chosen]
    colours = [
        "tab:blue" if r.contender in ("service", "small-batches") else "tab:gray" for r in chosen
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.55 * len(chosen) + 1.8), sharey=True)
    medians = [r.lines_per_s / 1000 for r in chosen]
    errors = [
        [(r.lines_per_s - r.worst_lines_per_s) / 1000 for r in chosen],
        [(r.best_lines_per_s - r.lines_per_s) / 1000 for r in chosen],
    ]
    left.barh(names, medians, xerr=errors, color=colours, capsize=3)
    for y, (value, row) in enumerate(zip(medians, chosen, strict=True)):
        left.text(row.best_lines_per_s / 1000, y, f"  {value:,.1f}k", va="center", fontsize=8)
    left.set_xlabel("thousand lines/s (median of runs; whiskers: min-max)")
    cpu = [r.cpu_per_m for r in chosen]
    right.barh(names, cpu, color=colours)
    for y, value in enumerate(cpu):
        right.text(value, y, f" {value:.2f}", va="center", ha="left", fontsize=8)
    right.set_xlabel("contender CPU s per million lines (lower is better)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency(points: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Empirical CDF of webhook-202-to-last-ack latency, one curve per rate, log time axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for p in sorted(points, key=lambda x: x["rate"]):
        n = len(p["latencies_s"])  # unfinished batches (inf) keep the curve below 1
        values = sorted(max(v, 1e-3) for v in p["latencies_s"] if math.isfinite(v))
        ax.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=f"{p['rate']:g} batches/s: p50 {p['p50_s']:.2f} s, p99 {p['p99_s']:.2f} s"
            + ("" if p["drained"] else f", {p['unfinished']} unfinished"),
        )
    ax.axvline(0.3, color="tab:red", linestyle="--", linewidth=1, label="target p99 ≤ 0.3 s")
    ax.axhline(0.99, color="black", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
    ax.set_xlabel("seconds from the webhook's 202 to the batch's last record acknowledged")
    ax.set_ylabel("fraction of batches")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Redraw the plots of one ``results-*.json`` into a directory."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.plots", description=main.__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    data = json.loads(args.results.read_text())
    rows = [Row(**row) for row in data["rows"]]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = int(data["args"]["lines"])
    if any(r.lines == lines for r in rows):
        print(throughput(rows, lines, args.out / "throughput.png", args.title))
    if data.get("latency"):
        print(latency(data["latency"], args.out / "latency.png", args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

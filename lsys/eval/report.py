"""Needle results on disk: samples.jsonl (one row per prompt), summary.json/.csv (accuracy per cell), heatmap.png."""

import csv
import json
from dataclasses import asdict
from pathlib import Path

from lsys.eval.needle import NeedleGrid, SampleResult

# Red (missed) to green (found), the usual needle-in-a-haystack colours; fixed so plots compare.
COLORMAP = "RdYlGn"


def mean_answer_loss(results: list[SampleResult]) -> float | None:
    """The mean answer loss of teacher-forced results (None under generate scoring)."""
    losses = [r.answer_loss for r in results if r.answer_loss is not None]
    return sum(losses) / len(losses) if losses else None


def summarize(results: list[SampleResult], grid: NeedleGrid, *, model_name: str, step: int) -> dict:
    """The grid's settings, accuracy and answer loss of each (length, depth) cell in grid order, and their means."""
    cells = []
    for length in grid.lengths:
        for depth in grid.depths:
            cell = [r for r in results if r.length == length and r.depth == depth]
            correct = sum(r.correct for r in cell)
            cells.append(
                dict(length=length, depth=depth, samples=len(cell), correct=correct, accuracy=correct / len(cell),
                     answer_loss=mean_answer_loss(cell))
            )
    return {
        "model": model_name,
        "step": step,
        "variant": grid.variant,
        "scoring": grid.scoring,
        "haystack": grid.haystack,
        "seed": grid.seed,
        "samples": grid.samples,
        "lengths": list(grid.lengths),
        "depths": list(grid.depths),
        "mean_accuracy": sum(r.correct for r in results) / len(results),
        "mean_answer_loss": mean_answer_loss(results),
        "cells": cells,
    }


def write_report(results: list[SampleResult], summary: dict, out_dir: Path) -> None:
    """Write samples.jsonl, summary.json, summary.csv and heatmap.png into `out_dir` (made if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w") as file:
        for result in results:
            file.write(json.dumps(asdict(result)) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out_dir / "summary.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["length", "depth", "samples", "correct", "accuracy", "answer_loss"])
        writer.writeheader()
        writer.writerows(summary["cells"])
    draw_heatmap(summary, out_dir / "heatmap.png")


def accuracy_table(summary: dict) -> list[list[float]]:
    """Accuracy as rows of depths by columns of lengths, in grid order."""
    by_cell = {(cell["length"], cell["depth"]): cell["accuracy"] for cell in summary["cells"]}
    return [[by_cell[length, depth] for length in summary["lengths"]] for depth in summary["depths"]]


def draw_heatmap(summary: dict, path: Path) -> None:
    """A PNG of accuracy: needle depth down, context length across, each cell's value written in it."""
    # Imported here: matplotlib takes most of a second to import, and every training process imports this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = accuracy_table(summary)
    lengths, depths = summary["lengths"], summary["depths"]
    # A Figure with its own Agg canvas: no pyplot, so no global backend and no display is ever needed.
    size = (max(4.0, 1.6 + 0.9 * len(lengths)), max(3.0, 1.4 + 0.45 * len(depths)))  # inches: room for every cell
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(table, cmap=COLORMAP, vmin=0.0, vmax=1.0, aspect="auto")
    for row, values in enumerate(table):
        for column, accuracy in enumerate(values):
            colour = "white" if not 0.2 <= accuracy <= 0.8 else "black"  # the colormap's ends are dark
            axes.text(column, row, f"{accuracy:.2f}", ha="center", va="center", fontsize=8, color=colour)
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth (%)")
    axes.set_title(
        f"{summary['model']} step {summary['step']}: {summary['variant']}, {summary['scoring']}\n"
        f"mean accuracy {summary['mean_accuracy']:.2f} ({summary['samples']} per cell)",
        fontsize=9,
    )
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.savefig(path, dpi=120)

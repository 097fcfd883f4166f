"""Plot training runs from their metrics.jsonl: loss (validation loss as markers) and tokens/s against
step, one line per run, labelled by its folder name (its path where two names are the same). A step whose loss was
not finite (logged as null) is a gap in its line.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out plot.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from megassm.errors import exit_on_user_error  # noqa: E402
from megassm.metrics import read_metrics  # noqa: E402

MARKED_POINTS = 50  # a series of at most this many points shows each as a dot (a single one draws no line)


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that log key; null (a value that was not finite) as NaN, which breaks the line."""
    points = [(r["step"], math.nan if r[key] is None else r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or the path given where another run's folder has the same name."""
    names = [run_dir.resolve().name for run_dir in run_dirs]
    return [name if names.count(name) == 1 else str(run_dir) for name, run_dir in zip(names, run_dirs)]


def plot(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    """Two panels, loss and tokens/s against step; runs are (label, records)."""
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for label, records in runs:
        marker = "." if len(records) <= MARKED_POINTS else None
        (line,) = loss_ax.plot(*series(records, "loss"), marker=marker, label=label)
        loss_ax.plot(*series(records, "val_loss"), "o", color=line.get_color(), label=f"{label} (val)")
        speed_ax.plot(*series(records, "tokens_per_s"), marker=marker, color=line.get_color(), label=label)
    loss_ax.set_ylabel("loss")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    speed_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = list(zip(labels(args.run_dirs), map(read_metrics, args.run_dirs)))
    except ValueError as e:
        exit_on_user_error(__file__, str(e))
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

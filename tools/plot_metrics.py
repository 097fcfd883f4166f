"""Plot training runs from their metrics.jsonl: loss (validation loss as markers) and tokens/s against
step, one line per run, labelled by its folder name.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --out plot.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from megassm.errors import exit_on_user_error  # noqa: E402
from megassm.metrics import read_metrics  # noqa: E402

PROGRAM = Path(__file__).name  # as argparse names the tool in its errors


def series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that hold a value for key."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    """Two panels, loss and tokens/s against step; runs are (label, records)."""
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for label, records in runs:
        (line,) = loss_ax.plot(*series(records, "loss"), label=label)
        loss_ax.plot(*series(records, "val_loss"), "o", color=line.get_color(), label=f"{label} (val)")
        speed_ax.plot(*series(records, "tokens_per_s"), color=line.get_color(), label=label)
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
        runs = [(run_dir.resolve().name, read_metrics(run_dir)) for run_dir in args.run_dirs]
    except ValueError as e:
        exit_on_user_error(PROGRAM, str(e))
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

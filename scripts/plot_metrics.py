"""Plot the training curves of one or more runs from their `metrics.jsonl`.

    python scripts/plot_metrics.py outputs/demo outputs/demo-lora --out curves.png

Three panels: loss, reward accuracy and reward margin (chosen minus rejected reward), against
the optimizer step. Each run has one color, named in the legend by its folder; training values
are solid lines, evaluation values (the `eval/` lines) dashed with markers on the panel of the
same quantity. Needs matplotlib: `pip install -e ".[plot]"`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefixdpo.train.run_dir import check_output_file, output_error

# (panel title, training key, evaluation key); a key a run never logged is left out.
PANELS = (
    ("loss", "loss", "eval/loss"),
    ("reward accuracy", "rewards/accuracies", "eval/rewards/accuracies"),
    ("reward margin", "rewards/margins", "eval/rewards/margins"),
)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (or of the file itself, if given one). A line
    that does not read as a record (cut short when a run was killed) is skipped."""
    path = run_dir if run_dir.is_file() else run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: not found; pass run folders (train.output_dir) that hold "
                         "a metrics.jsonl")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order."""
    points = sorted((r["step"], float(r[key])) for r in records
                    if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool))
    return [s for s, _ in points], [v for _, v in points]


def run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names; the whole path where two runs share a name."""
    names = [(d.parent.name if d.is_file() else d.name) or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def plot_runs(run_dirs: list[Path]):
    """A matplotlib Figure of the runs' curves (see the module docstring). Each line's label
    is "<run>" for training values and "<run> (eval)" for evaluation ones."""
    from matplotlib.figure import Figure

    runs = [(name, read_metrics(d)) for name, d in zip(run_names(run_dirs), run_dirs)]
    empty = [str(d) for d, (_, records) in zip(run_dirs, runs) if not records]
    if len(empty) == len(runs):
        raise ValueError(f"nothing to plot: no logged step in the metrics.jsonl of "
                         f"{', '.join(empty)} (has the run logged its first step?)")
    for folder in empty:
        print(f"note: {folder}: no logged step in its metrics.jsonl; it is left out",
              file=sys.stderr)
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, train_key, eval_key) in zip(axes, PANELS):
        for (name, records), color in zip(runs, colors):
            steps, values = series(records, train_key)
            if steps:
                ax.plot(steps, values, color=color, label=name)
            steps, values = series(records, eval_key)
            if steps:
                ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=3,
                        label=f"{name} (eval)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (train.output_dir)")
    parser.add_argument("--out", type=Path, default=Path("metrics.png"),
                        help="image to write (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("error: plotting needs matplotlib: pip install 'prefixdpo[plot]'",
              file=sys.stderr)
        return 1
    try:
        formats = Figure().canvas.get_supported_filetypes()
        suffix = args.out.suffix.lower().removeprefix(".")
        if suffix and suffix not in formats:  # no suffix: matplotlib writes png
            raise ValueError(f"--out {args.out}: matplotlib cannot write .{suffix} images; "
                             f"name a file ending in one of: .{', .'.join(sorted(formats))}")
        check_output_file(args.out, "--out")
        figure = plot_runs(args.runs)
        try:
            figure.savefig(args.out, dpi=120)
        except OSError as e:
            raise output_error("--out", args.out, e) from None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/plot_metrics.py: two runs' metrics.jsonl overlaid; the lines hold the files' values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + ['{"step": 9, "loss": 0.']  # a torn last line
    (folder / "metrics.jsonl").write_text("\n".join(lines))
    return folder


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path / "baseline", [
        {"step": 1, "loss": 0.693, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "lr": 1e-4},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.5, "rewards/margins": 0.1, "lr": 1e-4},
        {"step": 2, "eval/loss": 0.68, "eval/rewards/accuracies": 0.25,
         "eval/rewards/margins": 0.02},
        {"step": 3, "loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.3, "lr": 1e-4},
    ])
    b = write_run(tmp_path / "lora", [
        {"step": 1, "loss": 0.693, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
        {"step": 4, "loss": 0.4, "rewards/accuracies": 1.0, "rewards/margins": 0.9},
    ])
    return a, b


def test_lines_hold_the_files_values(runs):
    pytest.importorskip("matplotlib")
    from plot_metrics import plot_runs

    figure = plot_runs(list(runs))
    lines = {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in figure.axes for line in ax.get_lines()}
    assert lines == {
        ("loss", "baseline"): ([1, 2, 3], [0.693, 0.6, 0.5]),
        ("loss", "baseline (eval)"): ([2], [0.68]),
        ("loss", "lora"): ([1, 4], [0.693, 0.4]),
        ("reward accuracy", "baseline"): ([1, 2, 3], [0.0, 0.5, 0.75]),
        ("reward accuracy", "baseline (eval)"): ([2], [0.25]),
        ("reward accuracy", "lora"): ([1, 4], [0.0, 1.0]),
        ("reward margin", "baseline"): ([1, 2, 3], [0.0, 0.1, 0.3]),
        ("reward margin", "baseline (eval)"): ([2], [0.02]),
        ("reward margin", "lora"): ([1, 4], [0.0, 0.9]),
    }
    # One color per run on every panel; the legend names the run folders.
    for ax in figure.axes:
        colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert colors.get("baseline (eval)", colors["baseline"]) == colors["baseline"]
        assert colors["baseline"] != colors["lora"]
        assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"baseline", "lora"}


def test_command_writes_a_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "curves.png"
    result = subprocess.run([sys.executable, "scripts/plot_metrics.py", *map(str, runs),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/plot_metrics.py", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "x.png")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metrics.jsonl" in result.stderr


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/plot_metrics.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["unknown format", "a folder", "under a file"])
def test_output_path_errors_name_the_flag_and_the_fix(runs, tmp_path, case):
    """Before: matplotlib's traceback for `--out c.xyz`, a bare `[Errno 21] Is a directory`."""
    pytest.importorskip("matplotlib")
    (tmp_path / "afile").write_text("")
    out, expected = {
        "unknown format": (tmp_path / "c.xyz", "error: --out {out}: matplotlib cannot write "
                                               ".xyz images; name a file ending in one of: "),
        "a folder": (tmp_path, "error: --out {out}: cannot write it (it is a folder); give "
                               "--out a file name, not a folder"),
        "under a file": (tmp_path / "afile" / "c.png", "error: --out {out}: cannot write it (a "
                         "file of that name is in the way of the folder); remove that file, or "
                         "give --out another location"),
    }[case]
    result = plot(str(runs[0]), "--out", str(out))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.startswith(expected.format(out=out)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_an_empty_metrics_file_is_said(runs, tmp_path):
    """Before: exit 0 and an empty figure, without a word."""
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    result = plot(str(empty), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1 and not (tmp_path / "x.png").exists()
    assert result.stderr == (f"error: nothing to plot: no logged step in the metrics.jsonl of "
                             f"{empty} (has the run logged its first step?)\n")
    result = plot(str(runs[0]), str(empty), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 0 and (tmp_path / "x.png").is_file()
    assert result.stderr == f"note: {empty}: no logged step in its metrics.jsonl; it is left out\n"

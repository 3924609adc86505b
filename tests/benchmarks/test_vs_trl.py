"""The benchmark against TRL's DPOTrainer: its tiny mode end to end (the numbers it checks, not
the times), how it explains token differences, and what it says when TRL is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["interleaved", "one-at-a-time"])
def test_tiny_run_agrees_with_trl(tmp_path, mode):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[bench]'")
    out = tmp_path / "vs_trl.json"
    # One thread per process: nothing here is timed, and it keeps the run short.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    flags = ["--one-at-a-time"] if mode == "one-at-a-time" else []
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out), *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    layouts = ["prefixdpo shared+packed", "prefixdpo paired"]
    # Policy == reference at step 1: every contender's first loss is ln 2.
    assert set(checks["step1_loss"]) == {"TRL", *layouts}
    for name, loss in checks["step1_loss"].items():
        assert abs(loss - math.log(2)) < 1e-5, name
    # With a byte-level tokenizer TRL's tokens and ours agree, and so do the log-probs.
    assert checks["token_agreement_share"] > 0
    for name in layouts:
        logps = checks["logps"][name]
        for kind in ("same_tokens", "own_tokens_where_agree", "reference_where_agree"):
            assert logps[kind]["pairs"] > 0, (name, kind)
            assert logps[kind]["max_rel_diff"] < 1e-4, (name, kind)
    # Every contender ran the same steps on the same pairs.
    contenders = report["contenders"]
    assert list(contenders) == ["TRL", *layouts]
    settings = report["settings"]
    steps = settings["repeats"] * settings["steps"]
    for name, c in contenders.items():
        assert c["steps"] == steps and c["pairs"] == steps * settings["pairs_per_step"], name
        assert c["s_per_step"] > 0 and c["peak_memory_gib"] > 0, name
        assert 0 <= c["padding_fraction"] < 1, name
    # The paired layout holds what TRL holds (the same tokens), the shared one fewer.
    assert contenders["prefixdpo paired"]["tokens"] == contenders["TRL"]["tokens"]
    assert contenders["prefixdpo shared+packed"]["tokens"] < contenders["TRL"]["tokens"]
    assert contenders["TRL"]["settings"]["max_length"] is None
    assert contenders["TRL"]["settings"]["precompute_ref_log_probs"] is True
    assert "token ids (prompt, chosen, rejected) identical" in run.stdout
    if mode == "one-at-a-time":  # each contender set up, run and stopped before the next
        marks = [run.stdout.index(f"setting up {name} ") for name in [*layouts, "TRL"]]
        last_rounds = [run.stdout.rindex(f": {name}: ") for name in [*layouts, "TRL"]]
        assert marks == sorted(marks) and all(
            last < next_setup for last, next_setup in zip(last_rounds, marks[1:]))


def test_token_differences_name_the_reason(vs_trl):
    diff = vs_trl.token_differences
    bos, eos = 1, 2
    assert diff(([1, 5, 6], [7, 2]), ([1, 5, 6], [7, 2]), bos, eos) == []
    assert diff(([5, 6], [7, 2]), ([1, 5, 6], [7, 2]), bos, eos) == ["BOS only in ours"]
    assert diff(([1, 5, 6], [7]), ([1, 5, 6], [7, 2]), bos, eos) == ["EOS only in ours"]
    # Tokens merged across the boundary: ours is then the completion encoded alone, which
    # with SentencePiece starts with an extra "▁" (id 9 here).
    assert diff(([1, 5, 6], [7, 2]), ([1, 5, 6], [9, 7, 2]), bos, eos) == [
        "completion starts differently (tokens merged across the boundary: ours is then the "
        "completion encoded alone)"]
    assert diff(([1, 5], [6, 7, 2]), ([1, 5, 6], [7, 2]), bos, eos) == [
        "same tokens, split differently into prompt and completion"]
    assert diff(([1, 5], [8, 7, 2]), ([1, 5, 6], [7, 2]), bos, eos) == [
        "prompt end differs (TRL's prompt is the common prefix of the prompt alone and "
        "prompt + completion)"]
    assert diff(([1, 4, 6], [7, 2]), ([1, 5, 6], [7, 2]), bos, eos) == ["prompt tokens differ"]


def test_without_trl_it_says_how_to_install(vs_trl, monkeypatch, capsys):
    monkeypatch.setattr(vs_trl, "missing_packages", lambda: ["trl"])
    with pytest.raises(SystemExit) as exit_info:
        vs_trl.main(["--tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[bench]"' in err

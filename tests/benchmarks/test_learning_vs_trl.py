"""The learning comparison with TRL's DPOTrainer, in its tiny mode: both trainers start from
policy = reference (held-out loss ln 2), evaluate the same held-out pairs, train the configured
steps, and the report holds the figures the table prints."""

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
SCRIPT = ROOT / "benchmarks" / "learning_vs_trl.py"
CONFIG = ROOT / "configs" / "smollm2-135m-hh-rlhf.toml"


@pytest.mark.slow
def test_tiny_run_learns_in_both(tmp_path):
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[bench]'")
    out = tmp_path / "learning.json"
    # One thread per process: nothing here is timed, and it keeps the run short.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--config", str(CONFIG), "--tiny",
                          "--out", str(tmp_path / "work"), "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed_checks"] == []
    results = report["results"]
    assert list(results) == ["prefixdpo", "TRL"]
    ours, trl = results["prefixdpo"], results["TRL"]
    for name, r in results.items():
        # Policy == reference before the first step: the loss is ln 2, no pair is won.
        assert abs(r["before"]["loss"] - math.log(2)) < 1e-4, name
        assert r["before"]["accuracy"] == 0.0, name
        assert math.isfinite(r["after"]["loss"]) and 0.0 <= r["after"]["accuracy"] <= 1.0, name
        assert r["train_pairs"] > 0 and r["train_s"] > 0 and r["wall_s"] > r["train_s"], name
        assert r["pairs_per_s"] == pytest.approx(r["train_pairs"] / r["train_s"]), name
    # The same held-out pairs in both evaluations (3 of the 12 pairs), before and after.
    assert ours["eval_pairs"] == trl["eval_pairs"] == trl["eval_pairs_before"] == 3
    assert trl["rows_given"] == trl["rows_kept"] == {"train": 9, "eval": 3}
    # TRL: 2 steps of ceil(9 / 2) = 5 pairs (the second holds the epoch's last 4).
    assert trl["settings"]["per_device_train_batch_size"] == 5
    assert trl["settings"]["max_steps"] == 2 and trl["train_pairs"] == 9
    assert trl["settings"]["precompute_ref_log_probs"] is True
    assert trl["settings"]["model_dtype"] == "torch.float32"
    ratio = report["pairs_per_s_ratio_ours_over_trl"]
    assert ratio == pytest.approx(ours["pairs_per_s"] / trl["pairs_per_s"])
    assert "pairs/s ours / TRL" in run.stdout and "eval acc before" in run.stdout


def test_without_trl_it_says_how_to_install(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("learning_vs_trl_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "missing_packages", lambda: ["trl"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--config", str(CONFIG), "--tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == 'learning_vs_trl.py needs trl: pip install -e ".[bench]"'

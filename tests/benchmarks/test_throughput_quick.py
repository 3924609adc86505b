"""The throughput benchmark: its quick CPU mode end to end (no timing is asserted), and what its
comparison rests on: the synthetic length profiles (the token-budget batching is the loader's,
tested in tests/data/test_loader.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefixdpo.data.layout import is_shared

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_compares_the_same_pairs(tmp_path):
    out = tmp_path / "throughput.json"
    # One thread: nothing here is timed, and it keeps the run short on a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    layouts = report["layouts"]
    assert list(layouts) == ["paired", "paired+packed", "shared", "shared+packed"]
    assert not report["failures"]
    data = report["data"]
    for name, r in layouts.items():
        assert r["pairs"] == data["num_pairs"] > 0, name
        assert r["steps"] > 0 and r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0, name
        assert 0.0 <= r["padding_fraction"] < 1.0, name
        assert r["graphs_compiled_after_warmup"] == 0, name  # nothing is compiled on CPU
        expected = data["shared_tokens"] if is_shared(name) else data["paired_tokens"]
        assert r["tokens"] == expected, name
        assert r["row_tokens"] >= r["tokens"], name
    assert layouts["shared"]["tokens"] < layouts["paired"]["tokens"]
    assert data["token_ratio_ceiling"] == pytest.approx(
        layouts["paired"]["tokens"] / layouts["shared"]["tokens"])
    assert layouts["paired"]["speedup_vs_paired"] == 1.0
    assert layouts["paired+packed"]["speedup_vs_paired+packed"] == 1.0
    assert "pairs/s" in run.stdout and "token-ratio ceiling" in run.stdout
    # Two interleaved rounds: every layout timed twice; the ratios from each round.
    assert report["rounds"] == 2 and report["gemm_flops"] > 0
    for r in layouts.values():
        assert len(r["round_seconds"]) == 2 and 0 < r["gemm_share"]
    ratio = report["ratios"]["shared_packed_vs_paired_packed"]
    assert len(ratio["rounds"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]


def test_ratios_are_taken_within_each_round(throughput):
    """The layouts process the same pairs, so a round's pairs/s ratio is the inverse ratio of
    its seconds; the summary gives the median and the range over the rounds."""
    from types import SimpleNamespace

    def run(*seconds: float) -> SimpleNamespace:
        return SimpleNamespace(passes=[{"seconds": s} for s in seconds])

    runs = {"paired": run(9.0, 10.0, 12.0), "paired+packed": run(5.0, 6.0, 4.0),
            "shared+packed": run(4.0, 4.0, 4.0)}
    ratios = throughput.round_ratios(runs)
    assert set(ratios) == {"shared_packed_vs_paired_packed", "shared_packed_vs_paired"}
    packed = ratios["shared_packed_vs_paired_packed"]
    assert packed["rounds"] == [1.25, 1.5, 1.0]
    assert (packed["median"], packed["min"], packed["max"]) == (1.25, 1.0, 1.5)
    assert packed["spread"] == pytest.approx(0.25)  # 1.25 / 1.0 - 1
    report = {"data": {"num_pairs": 8, "token_ratio_ceiling": 1.8}, "ratios": ratios,
              "layouts": {"paired": {"flops": 9.0}, "shared+packed": {"flops": 6.0,
                                                                       "gemm_share": 0.25}}}
    row = throughput.summarize({"tldr": report})["tldr"]
    assert row["shared_packed_vs_paired_packed"] == 1.25 and row["shared_vs_paired"] is None
    assert row["shared_packed_vs_paired_packed_range"] == [1.0, 1.5]
    assert row["flops_ratio"] == 1.5 and row["gemm_share"] == 0.25
    table = throughput.format_summary({"tldr": row}).splitlines()
    assert "FLOPs" in table[0] and "of GEMM" in table[0]
    assert "1.25 (1.00-1.50)" in table[1] and "25.0%" in table[1]


@pytest.mark.parametrize("profile", ["capybara", "hh-rlhf", "metamath-dpo", "tldr",
                                     "tulu-helpsteer", "ultrafeedback"])
def test_synthetic_profiles_match_their_medians(throughput, profile):
    median, ratio = throughput.PROFILES[profile]
    examples = throughput.synthetic_examples(profile, 2001, 1000, 0.5, seed=0)
    stats = throughput.data_statistics(examples)
    assert abs(stats["median_prompt_plus_chosen"] - median) <= 1.0
    assert stats["prompt_completion_ratio"] == pytest.approx(ratio, rel=0.1)
    again = throughput.synthetic_examples(profile, 2001, 1000, 0.5, seed=0)
    assert all(np.array_equal(a.groups[0].prompt, b.groups[0].prompt)
               for a, b in zip(examples, again))

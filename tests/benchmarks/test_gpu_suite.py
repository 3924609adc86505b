"""The GPU suite, rehearsed on the CPU: `gpu_suite.py --dry-run` runs the preflight and every
part at toy sizes and writes the markdown block, the JSON of every figure and the logs, with
the sections and figures the GPU run will fill; `--plan` prints caps that fit the budget; its
runner stops a command at its time limit and goes on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
LAYOUTS = ["shared+packed", "paired+packed", "paired", "shared"]  # most important first
PROFILES = ["capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback"]
PARTS = ["tests", "throughput-hh", "throughput-profiles", "loss", "knobs"]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert "done: tests ok" in run.stdout
    return out, json.loads((out / "gpu-suite.json").read_text()), \
        (out / "gpu-suite.md").read_text()


@pytest.mark.slow
def test_every_part_runs_and_is_written_up(dry_run):
    out, report, markdown = dry_run
    env = report["environment"]
    assert env["commit"] and env["date"] and report["preflight"]["torch"]
    assert markdown.startswith(f"## {env['date'][:10]}: CPU")
    assert report["suite"]["dry_run"] and report["suite"]["seconds"] > 0
    assert list(report["parts"]) == PARTS
    # The preflight, before any model: what is installed, and the bf16 probe's outcome (no
    # CUDA here: not probed), in the JSON and the markdown.
    preflight = report["preflight"]
    assert preflight["command"]["status"] == "ok" and preflight["torch"]
    assert preflight["pytest"] is True and preflight["bf16_matmuls"] is None
    assert preflight["flash"] is False and "CUDA" in preflight["flash_reason"]
    assert "Preflight: ok" in markdown and "bfloat16 matmuls not probed (no CUDA)" in markdown
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
        assert part["commands"], name
        for command in part["commands"]:
            assert command["status"] == "ok" and command["seconds"] > 0, command
            assert (out / command["log"]).is_file()
            assert f"`{command['command']}`" in markdown  # every command, as run
    for heading in ("### GPU tests", "### Throughput: HH-RLHF pairs",
                    "### Throughput: synthetic profiles", "### Loss and log-prob kernel",
                    "### Speed knobs", "### Commands"):
        assert heading in markdown, heading


@pytest.mark.slow
def test_gpu_tests_are_collected_and_skip_without_cuda(dry_run):
    _, report, markdown = dry_run
    results = report["parts"]["tests"]["results"]
    tests = {t["id"]: t for t in results["tests"]}
    # Every GPU test file has tests selected by `-m gpu` (none lacks the marker).
    files = {i.split("::")[0] for i in tests}
    for path in sorted((ROOT / "tests" / "gpu").glob("test_*.py")):
        assert str(path.relative_to(ROOT)) in files, path.name
    for test_id in ("tests/gpu/test_fsdp_cuda.py::"
                    "test_sharded_mixed_precision_compiled_flex_matches_plain_bfloat16",
                    "tests/gpu/test_host_syncs_cuda.py::"
                    "test_forward_and_backward_do_not_synchronize",
                    "tests/gpu/test_reference_eval_cuda.py::"
                    "test_evaluate_on_cuda_matches_cpu_float32",
                    "tests/gpu/test_train_run_cuda.py::test_resume_and_export_on_cuda",
                    "tests/kernels/test_log_probs.py::test_cuda_bfloat16_matches_reference"):
        assert test_id in tests, test_id
        assert f"`{test_id}`" in markdown
    assert results["counts"] == {"skipped": len(tests)}
    assert all(t["message"].startswith("needs a CUDA device") for t in tests.values())
    assert f"{len(tests)} skipped" in results["summary"]


@pytest.mark.slow
def test_throughput_figures(dry_run):
    _, report, markdown = dry_run
    hh = report["parts"]["throughput-hh"]["results"]
    assert list(hh["layouts"]) == LAYOUTS and not hh["failures"]
    assert hh["data"]["source"].endswith("hh-rlhf-helpful-base-test-1000.jsonl.gz")
    for layout, figures in hh["layouts"].items():
        assert figures["pairs"] == hh["data"]["num_pairs"] > 0, layout
        assert figures["pairs_per_s"] > 0 and figures["tokens_per_s"] > 0, layout
        assert figures["speedup_vs_paired"] > 0 and figures["speedup_vs_paired+packed"] > 0
        assert f"| {layout} | {figures['steps']} | {figures['pairs']} |" in markdown
    assert "token-ratio ceiling" in markdown

    profiles = report["parts"]["throughput-profiles"]["results"]
    assert list(profiles["datasets"]) == PROFILES
    for name in PROFILES:
        layouts = profiles["datasets"][name]["layouts"]
        assert list(layouts) == ["shared+packed", "paired+packed"], name
        row = profiles["summary"][name]
        assert row["token_ratio_ceiling"] > 1.0, name
        assert row["shared_packed_vs_paired_packed"] == pytest.approx(
            layouts["shared+packed"]["pairs_per_s"] / layouts["paired+packed"]["pairs_per_s"])
        assert row["paper_packed"] > 1.0, name
        assert f"| {name} | {profiles['datasets'][name]['data']['num_pairs']} |" in markdown


@pytest.mark.slow
def test_loss_and_knob_figures(dry_run):
    _, report, markdown = dry_run
    loss = report["parts"]["loss"]["results"]
    assert loss["sizes"] == "tiny"
    assert [(r["part"], r["variant"]) for r in loss["rows"]] == [
        (1, "rafailov"), (1, "trl"), (1, "nemo"), (1, "ours"),
        (2, "materialized"), (2, "kernel"), (2, "materialized"), (2, "kernel")]
    assert all(r["median_ms"] > 0 for r in loss["rows"])
    assert max(loss["part1"]["oracle_relative_error"].values()) < 1e-4
    assert len(loss["part2"]["comparisons"]) == 2
    assert "| 2 | kernel |" in markdown

    knobs = report["parts"]["knobs"]["results"]
    baseline = knobs["baseline"]
    assert baseline["pairs_per_s"] == \
        report["parts"]["throughput-hh"]["results"]["layouts"]["shared+packed"]["pairs_per_s"]
    runs = {(r["knob"], r["setting"]): r for r in knobs["runs"]}
    checkpointing = runs[("activation checkpointing", "on")]
    assert checkpointing["status"] == "ok" and checkpointing["pairs_per_s"] > 0
    assert checkpointing["vs_baseline"] == pytest.approx(
        checkpointing["pairs_per_s"] / baseline["pairs_per_s"])
    # The others do nothing on a CPU, or cannot run here: skipped, each with its reason.
    assert set(runs) == {("activation checkpointing", "on"), ("FlexAttention backend", "flash"),
                         ("FlexAttention block size", "64")}
    assert runs[("FlexAttention block size", "64")]["status"] == "skipped"
    assert runs[("FlexAttention block size", "64")]["note"] == "no effect on a CPU (dry run)"
    flash = runs[("FlexAttention backend", "flash")]
    assert flash["status"] == "unsupported" and "needs a CUDA GPU" in flash["note"]
    for key in runs:
        assert f"| {key[0]} | {key[1]} |" in markdown


def test_the_plan_fits_the_budget(tmp_path):
    """`--plan`: one `part NAME cap SECONDS` line per part in run order, then the total, which
    the budget holds; the knobs part holds whole knob runs only."""
    run = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines()
             if line.startswith(("part ", "total "))]
    parts = [line.split() for line in lines[:-1]]
    assert [p[1] for p in parts] == PARTS and all(p[2] == "cap" for p in parts)
    total, budget = (float(x) for x in lines[-1].split()[1::2])
    assert lines[-1].split()[::2] == ["total", "budget"]
    assert total == sum(float(p[3]) for p in parts) <= budget
    knobs = dict((p[1], float(p[3])) for p in parts)["knobs"]
    assert knobs > 0 and knobs % 60 == 0
    assert not (tmp_path / "logs" / "02-gpu-tests.log").exists()  # nothing else ran


def test_knobs_beyond_the_budget_are_dropped(suite):
    """The knobs the preflight keeps, in priority order, as many as the budget holds whole."""
    plan, parts = suite.GPU_PLAN, list(suite.PARTS)
    others = sum(plan.part_cap(name, 0) for name in parts if name != "knobs")
    everything = {"flash": True}
    assert len(suite.kept_knobs(everything, plan, parts, others + 3 * 60)) == 3
    kept = suite.kept_knobs(everything, plan, parts, others + 2 * 60 + 59)
    assert [k.setting for k in kept] == ["on", "flash"]
    assert [k.setting for k in suite.kept_knobs({}, plan, parts, others + 3 * 60)] == \
        ["on", "64"]
    lines = suite.plan_lines(plan, parts, 2, plan.budget)
    assert lines[-1] == f"total {others + 120:.0f} budget {plan.budget:.0f}"


def test_a_command_past_its_limit_is_stopped_and_the_next_runs(suite, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "MIN_COMMAND_S", 0.5)
    (tmp_path / "logs").mkdir()
    runner = suite.Runner(tmp_path, time.monotonic() + 120, suite.child_environment())
    # A command whose own child would outlive it: the whole process group is stopped.
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print('child', child.pid, flush=True); time.sleep(120)")
    start = time.monotonic()
    slow = runner.run("slow one", [sys.executable, "-c", hang], 3)
    assert slow["status"] == "timeout" and time.monotonic() - start < 30
    log = (tmp_path / slow["log"]).read_text()
    child = int(log.strip().splitlines()[-1].split()[-1])  # its last line: "child PID"
    deadline = time.monotonic() + 10  # the signal reached it; its exit may take a moment
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
    failing = runner.run("failing", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert (failing["status"], failing["returncode"]) == ("failed", 3)
    fine = runner.run("fine", [sys.executable, "-c", "print('fine')"], 60)
    assert fine["status"] == "ok" and "fine" in (tmp_path / fine["log"]).read_text()
    whole = runner.run("whole", [sys.executable, "-c", "print('whole')"], 60, minimum=600)
    assert whole["status"] == "skipped" and whole["note"].startswith("out of time")
    runner.deadline = time.monotonic()
    late = runner.run("late", [sys.executable, "-c", "print('late')"], 60)
    assert late["status"] == "skipped" and late["note"].startswith("out of time")
    assert len({slow["log"], failing["log"], fine["log"], whole["log"], late["log"]}) == 5


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_pytest_outcomes_from_the_log_of_a_killed_run(suite, tmp_path):
    """Without pytest's XML (killed at its limit), outcomes come from its -v lines."""
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/gpu/test_a.py::test_one PASSED                                  [ 33%]\n"
        "tests/gpu/test_a.py::test_two[x] FAILED                               [ 66%]\n"
        "tests/gpu/test_b.py::test_three SKIPPED (needs a CUDA device)         [100%]\n"
        "=================== 1 failed, 1 passed, 1 skipped in 12.34s ===================\n")
    tests = suite.parse_pytest_log(log)
    assert [(t["id"], t["outcome"]) for t in tests] == [
        ("tests/gpu/test_a.py::test_one", "passed"),
        ("tests/gpu/test_a.py::test_two[x]", "failed"),
        ("tests/gpu/test_b.py::test_three", "skipped")]
    assert tests[2]["message"] == "needs a CUDA device"
    assert suite.pytest_summary(log) == "1 failed, 1 passed, 1 skipped in 12.34s"


def test_gpu_test_files_are_spread_over_processes(suite):
    groups = suite.gpu_test_groups(3)
    files = [f for group in groups for f in group]
    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob(
        "test_*.py")) + ["tests/kernels"]
    assert sorted(files) == sorted(expected) and len(files) == len(set(files))
    assert len(groups) == 3
    assert suite.gpu_test_groups(1) == [["tests/gpu", "tests/kernels"]]

"""Everything to run on a machine with one CUDA GPU, as one command within a time budget.

    PYTHONPATH=. timeout 570 python3 benchmarks/gpu_suite.py --out gpu-suite [--commit HASH]
    python benchmarks/gpu_suite.py --plan --out gpu-suite   # the parts and their caps
    python benchmarks/gpu_suite.py --dry-run --out /tmp/rehearsal   # every part, toy sizes, CPU

First a preflight, before any model is built: the versions, the GPU, what is installed
(pytest, transformers, FlashAttention-4's `flash_attn.cute`), whether the log-prob kernel's
bfloat16 matmuls work here (its probe: where they fail, every half-precision call copies the
whole `[V, D]` head weight to float32), and which knobs can run. Then the parts, most
important first, each within its cap (`Plan`), the knobs only where their whole cap is left:
1. `tests`: the GPU tests (`pytest -m gpu` on tests/gpu and tests/kernels), in pytest
   processes side by side so that their compilations share the CPU cores; per-test outcome
   and time from pytest's JUnit XML (from its -v lines if it was stopped).
2. `throughput-hh`: `benchmarks/throughput.py`, Llama 3.2 1B (random init) on HH-RLHF pairs
   shipped in `assets/`, shared+packed first, then paired+packed, paired and shared, one
   model and one compile cache for all (its JSON is rewritten after every layout).
3. `throughput-profiles`: the same model on the six synthetic length profiles, the two packed
   layouts, rows of the same length as part 2's (so its compiled kernels are reused).
4. `loss`: `benchmarks/dpo_loss.py --device cuda --quick`.
5. `knobs`: one more part-2 run in shared+packed per knob (activation checkpointing, a
   FlexAttention block of 64 with tiles that fit it, the FLASH backend where the preflight
   finds it), against part 2's shared+packed figures.

Every command runs in its own process group and is killed at its limit; a part that fails or
runs out of time is recorded and the next one runs. `--parts` runs a subset (the knobs then
measure their own baseline); `--commit` names the commit where the folder has no git metadata.
Written under `--out`, and rewritten after every command: `gpu-suite.md` (a block for
BENCHMARKS.md), `gpu-suite.json` (every figure), `logs/` (every command's output, pytest's XML)
and `json/` (the benchmarks' own reports).

`--dry-run` rehearses it on the CPU at toy sizes (1-layer models written to `--out`, a few
pairs, `dpo_loss.py --tiny`, one pytest process in which the GPU tests skip: the CPU suite
rehearses their bodies itself), so tests/benchmarks/test_gpu_suite.py keeps it in working
order. The suite imports nothing from the project: it launches commands and reads what they
write, so it reports a broken part instead of breaking.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HH_DATA = "assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz"
TOKENIZER = "assets/tokenizers/mistral-7b-v0.1"
HH_LAYOUTS = ("shared+packed", "paired+packed", "paired", "shared")
PROFILE_LAYOUTS = ("shared+packed", "paired+packed")
PROFILES = ("capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback")
MIN_COMMAND_S = 15.0  # a command given less than this is skipped as out of time
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time caps (seconds) of every part; a knob runs only with `knob_cap` left."""

    device: str
    model: str                       # throughput.py --model (HH-RLHF pairs, knobs)
    profile_model: str               # throughput.py --model for the synthetic profiles
    hh_pairs: int                    # HH-RLHF pairs in part 2 (and the knob runs)
    packing_length: str              # rows of parts 2, 3 and the knobs
    profile_paired_tokens: int       # tokens per synthetic profile, in the paired layout
    loss_size: str                   # dpo_loss.py --quick or --tiny
    test_processes: int              # pytest processes side by side
    throughput_extra: tuple[str, ...]
    caps: dict[str, float]           # part name -> seconds (knobs: per knob run)
    budget: float                    # default --budget

    def part_cap(self, name: str, knobs: int) -> float:
        return self.caps[name] * (knobs if name == "knobs" else 1)


GPU_PLAN = Plan(device="cuda", model="llama-3.2-1b", profile_model="llama-3.2-1b",
                hh_pairs=512, packing_length="8192", profile_paired_tokens=120_000,
                loss_size="--quick", test_processes=3,
                throughput_extra=("--rounds", "1", "--warmup-steps", "1"),
                caps={"tests": 140, "throughput-hh": 130, "throughput-profiles": 90,
                      "loss": 40, "knobs": 60},
                budget=540)
# Toy sizes on the CPU: every command and every parser, in about a minute on 2 cores.
DRY_RUN_PLAN = Plan(device="cpu", model="", profile_model="", hh_pairs=4,
                    packing_length="auto", profile_paired_tokens=2500, loss_size="--tiny",
                    test_processes=1, throughput_extra=("--rounds", "1", "--warmup-steps", "1"),
                    caps={"tests": 90, "throughput-hh": 90, "throughput-profiles": 90,
                          "loss": 60, "knobs": 60},
                    budget=600)
DRY_RUN_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                 "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "tie_word_embeddings": True, "max_position_embeddings": 8192,
                 "bos_token_id": 1, "eos_token_id": 2}
# Synthetic token ids need no tokenizer's vocabulary: a small head keeps the dry run short.
DRY_RUN_PROFILE_MODEL = {**DRY_RUN_MODEL, "vocab_size": 1024}


@dataclasses.dataclass(frozen=True)
class Knob:
    """One speed knob: `flags` added to the baseline command; `requires`: the preflight key
    that must be true (None: always runs); `cuda_only`: skipped in the dry run."""

    label: str
    setting: str
    flags: tuple[str, ...]
    requires: str | None = None
    cuda_only: bool = True


KNOBS = (  # in priority order: those the budget cannot hold are dropped from the end
    Knob("activation checkpointing", "on", ("--activation-checkpointing",), cuda_only=False),
    Knob("FlexAttention backend", "flash", ("--flex-backend", "flash"), requires="flash"),
    Knob("FlexAttention block size", "64", ("--block-size", "64")),
)
# Not in the suite: `--compile-mode max-autotune-no-cudagraphs` autotunes for longer than a
# knob's cap; run it by hand (BENCHMARKS.md). The triton backend is the baseline itself.


# ---- running commands ---------------------------------------------------------------------


class Runner:
    """Runs commands, one after another or side by side, against a deadline, each logged to
    its own file."""

    def __init__(self, out: Path, deadline: float, env: dict[str, str],
                 out_shown: str | None = None):
        self.out, self.deadline, self.env = out, deadline, env
        self.out_shown = out_shown or str(out)  # how commands show the output folder
        self.start = time.monotonic()
        self.count = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, message: str) -> None:
        seconds = int(time.monotonic() - self.start)
        print(f"[{datetime.datetime.now():%H:%M:%S} +{seconds // 60}:{seconds % 60:02d}] "
              f"{message}", flush=True)

    def run(self, name: str, argv: list[str], cap: float, minimum: float | None = None
            ) -> dict[str, Any]:
        """Run `argv` from the repository root for at most `cap` seconds (and never past the
        suite's deadline); skip it when that leaves under `minimum` (default MIN_COMMAND_S).
        Returns its record."""
        return self.run_together([(name, argv)], cap, minimum)[0]

    def run_together(self, commands: list[tuple[str, list[str]]], cap: float,
                     minimum: float | None = None) -> list[dict[str, Any]]:
        """Run (name, argv) commands side by side, under one time limit as in `run`."""
        minimum = MIN_COMMAND_S if minimum is None else minimum
        limit = min(cap, self.left())
        records, running = [], []
        for name, argv in commands:
            self.count += 1
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            log = self.out / "logs" / f"{self.count:02d}-{slug}.log"
            records.append({"name": name, "status": "skipped", "returncode": None,
                            "command": display(argv).replace(str(self.out), self.out_shown),
                            "log": str(log.relative_to(self.out)), "seconds": 0.0,
                            "cpu_s": None, "limit_s": None, "note": ""})
        if limit < minimum:
            for record in records:
                record["note"] = f"out of time ({max(limit, 0):.0f} s left)"
                self.say(f"{record['name']}: skipped, {record['note']}")
            return records
        started, cpu_before = time.monotonic(), children_cpu_seconds()
        for record, (_, argv) in zip(records, commands):
            record["limit_s"] = round(limit)
            self.say(f"{record['name']}: started (limit {limit:.0f} s)\n    {record['command']}")
            output = open(self.out / record["log"], "w")
            output.write(f"$ {record['command']}\n")
            output.flush()
            running.append((output, subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)))
        for record, (output, process) in zip(records, running):
            try:
                record["returncode"] = process.wait(
                    timeout=max(started + limit - time.monotonic(), 0.1))
                record["status"] = "ok" if record["returncode"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                stop_group(process)
                record["status"], record["returncode"] = "timeout", process.returncode
                record["note"] = f"killed after {limit:.0f} s"
            output.close()
            record["seconds"] = round(time.monotonic() - started, 1)
            self.say(f"{record['name']}: {status_text(record)} (log {record['log']})")
            if record["status"] != "ok":
                tail = (self.out / record["log"]).read_text(errors="replace")
                print("\n".join(f"    | {line[:200]}" for line in
                                tail.strip().splitlines()[-6:]), flush=True)
        if len(records) == 1:  # the CPU time of commands run side by side is not separable
            records[0]["cpu_s"] = round(children_cpu_seconds() - cpu_before, 1)
        return records


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group (workers, torchrun's children), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def display(argv: list[str]) -> str:
    """The command as one would type it from the repository root."""
    return " ".join(shlex.quote("python" if arg == sys.executable else arg) for arg in argv)


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the preflight ------------------------------------------------------------------------


def preflight_report() -> dict[str, Any]:
    """What this machine has, found without building any model: run in a child process (the
    suite itself imports neither torch nor the project)."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    report: dict[str, Any] = {"pytest": installed("pytest"),
                              "transformers": installed("transformers"),
                              "flash_attn_cute": installed("flash_attn")
                              and installed("flash_attn.cute")}
    import torch

    cuda = torch.cuda.is_available()
    report.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=cuda,
                  gpu=torch.cuda.get_device_name(0) if cuda else None,
                  capability=list(torch.cuda.get_device_capability(0)) if cuda else None)
    try:
        from prefixdpo.kernels.log_probs import half_matmuls_work
        from prefixdpo.model.attention import flex_kernel_options
    except ImportError as e:
        report["prefixdpo_error"] = (f"the project is not importable ({e}): install it with "
                                     "pip install --no-deps --no-build-isolation -e .")
        return report

    report["bf16_matmuls"] = half_matmuls_work(torch.device("cuda")) if cuda else None
    try:
        flex_kernel_options("flash")
        report["flash"], report["flash_reason"] = True, ""
    except ValueError as e:
        report["flash"], report["flash_reason"] = False, str(e)
    return report


def part_preflight(ctx: Context) -> dict[str, Any]:
    path = ctx.out / "json" / "preflight.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--preflight", str(path)]
    record = ctx.runner.run("preflight", argv, 60, minimum=1)
    found = read_json(path) or {}
    ctx.report["preflight"] = {**found, "command": record}
    return found


# ---- the parts ----------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What the parts share: the plan, where things go, and what earlier parts found."""

    plan: Plan
    out: Path
    runner: Runner
    models: dict[str, str]               # throughput.py --model: "hh" and "profiles"
    report: dict[str, Any]
    knobs: list[Knob]                    # the knobs the preflight keeps

    def json_path(self, name: str) -> Path:
        return self.out / "json" / f"{name}.json"

    def publish(self, name: str, part: dict[str, Any]) -> None:
        """Record a part's results so far and rewrite the outputs."""
        self.report["parts"][name] = part
        write_outputs(self.out, self.report)


def gpu_test_groups(processes: int) -> list[list[str]]:
    """The GPU test files split into `processes` groups of about equal expected time (heavier
    files first into the lightest group), each run by its own pytest process: on a GPU the
    compilations of the groups then proceed in parallel on the CPU cores."""
    if processes <= 1:
        return [["tests/gpu", "tests/kernels"]]
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "gpu").glob("test_*.py"))
    files.append("tests/kernels")
    groups: list[list[str]] = [[] for _ in range(processes)]
    loads = [0.0] * processes
    for path in sorted(files, key=lambda f: -GPU_TEST_WEIGHTS.get(Path(f).name, 1.0)):
        lightest = loads.index(min(loads))
        groups[lightest].append(path)
        loads[lightest] += GPU_TEST_WEIGHTS.get(Path(path).name, 1.0)
    return [group for group in groups if group]


# Relative expected time of the GPU test files (compilations, launched runs); others count 1.
GPU_TEST_WEIGHTS = {"test_flex_cuda.py": 3.0, "test_train_run_cuda.py": 3.0,
                    "test_fsdp_cuda.py": 2.0, "test_reference_eval_cuda.py": 2.0}


def part_tests(ctx: Context) -> dict[str, Any]:
    if ctx.report["preflight"].get("pytest") is False:
        return {"status": "skipped: pytest is not installed", "commands": [], "results": None}
    commands, xmls = [], []
    groups = gpu_test_groups(ctx.plan.test_processes)
    for index, paths in enumerate(groups):
        xml = ctx.out / "logs" / f"pytest-{index + 1}.xml"
        xml.unlink(missing_ok=True)
        xmls.append(xml)
        name = "GPU tests" if len(groups) == 1 else f"GPU tests {index + 1}/{len(groups)}"
        commands.append((name, [sys.executable, "-m", "pytest", "-m", "gpu", *paths, "-v",
                                "-rA", "--durations=0", "-p", "no:cacheprovider",
                                f"--junitxml={xml}"]))
    records = ctx.runner.run_together(commands, ctx.plan.caps["tests"])
    tests, summaries = [], []
    for record, xml in zip(records, xmls):
        log = ctx.out / record["log"]
        tests += parse_junit(xml) if xml.is_file() else parse_pytest_log(log)
        summaries.append(pytest_summary(log) or record["status"])
    counts: dict[str, int] = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    # pytest exits with 1 when a test failed: the part ran, its results say what failed.
    statuses = {r["status"] if r["returncode"] != 1 or not tests else "tests failed"
                for r in records}
    status = "ok" if statuses == {"ok"} else ", ".join(sorted(statuses - {"ok"}))
    return {"status": status, "commands": records,
            "results": {"summary": "; ".join(summaries), "counts": counts, "tests": tests}}


def part_loss(ctx: Context) -> dict[str, Any]:
    path = ctx.json_path("dpo_loss")
    argv = [sys.executable, "benchmarks/dpo_loss.py", "--device", ctx.plan.device,
            ctx.plan.loss_size, "--json", str(path)]
    record = ctx.runner.run("loss benchmark", argv, ctx.plan.caps["loss"])
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def throughput_command(ctx: Context, *flags: str, json_path: Path, model: str = "hh"
                       ) -> list[str]:
    return [sys.executable, "benchmarks/throughput.py", "--model", ctx.models[model],
            "--device", ctx.plan.device, "--packing-length", ctx.plan.packing_length,
            *ctx.plan.throughput_extra, *flags, "--json", str(json_path)]


def hh_flags(ctx: Context, layouts: tuple[str, ...]) -> tuple[str, ...]:
    return ("--data", HH_DATA, "--tokenizer", TOKENIZER, "--pairs", str(ctx.plan.hh_pairs),
            "--layouts", ",".join(layouts))


def part_throughput_hh(ctx: Context) -> dict[str, Any]:
    path = ctx.json_path("throughput-hh-rlhf")
    argv = throughput_command(ctx, *hh_flags(ctx, HH_LAYOUTS), json_path=path)
    record = ctx.runner.run("throughput, HH-RLHF pairs", argv, ctx.plan.caps["throughput-hh"])
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def part_throughput_profiles(ctx: Context) -> dict[str, Any]:
    path = ctx.json_path("throughput-profiles")
    argv = throughput_command(
        ctx, "--dataset", ",".join(PROFILES), "--paired-tokens",
        str(ctx.plan.profile_paired_tokens), "--layouts", ",".join(PROFILE_LAYOUTS),
        json_path=path, model="profiles")
    record = ctx.runner.run("throughput, synthetic profiles", argv,
                            ctx.plan.caps["throughput-profiles"])
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def part_knobs(ctx: Context) -> dict[str, Any]:
    cap = ctx.plan.caps["knobs"]
    commands: list[dict[str, Any]] = []
    baseline_report = (ctx.report["parts"].get("throughput-hh") or {}).get("results")
    source = "part throughput-hh"
    if not shared_packed(baseline_report):
        path = ctx.json_path("knob-baseline")
        argv = throughput_command(ctx, *hh_flags(ctx, ("shared+packed",)), json_path=path)
        commands.append(ctx.runner.run("knob baseline", argv, cap, minimum=cap))
        baseline_report, source = read_json(path), "its own run"
    baseline = shared_packed(baseline_report)
    runs: list[dict[str, Any]] = []
    results = {"baseline": baseline, "baseline_source": source, "runs": runs}
    for knob in KNOBS:
        row: dict[str, Any] = {"knob": knob.label, "setting": knob.setting,
                               "flags": list(knob.flags), "status": "skipped", "note": ""}
        if knob not in ctx.knobs:
            row["status"], row["note"] = knob_reason(knob, ctx.report)
        elif knob.cuda_only and ctx.plan.device != "cuda":
            row["note"] = "no effect on a CPU (dry run)"
        else:
            slug = re.sub(r"[^a-z0-9]+", "-", f"knob {knob.label} {knob.setting}".lower())
            path = ctx.json_path(slug.strip("-"))
            argv = throughput_command(ctx, *hh_flags(ctx, ("shared+packed",)), *knob.flags,
                                      json_path=path)
            # Only with its whole cap left: a knob cut short measures nothing.
            record = ctx.runner.run(f"knob: {knob.label} {knob.setting}", argv, cap,
                                    minimum=cap)
            commands.append(record)
            row["status"], row["note"] = record["status"], record["note"]
            if record["status"] == "failed":  # its last line says why
                lines = (ctx.out / record["log"]).read_text(errors="replace").split("\n")
                row["note"] = next((line.strip() for line in reversed(lines) if line.strip()),
                                   "")[:200]
            figures = shared_packed(read_json(path))
            if figures:
                row.update(figures)
                if baseline:
                    row["vs_baseline"] = figures["pairs_per_s"] / baseline["pairs_per_s"]
        runs.append(row)
        ctx.publish("knobs", {"status": "running", "commands": commands, "results": results})
    status = "ok" if all(r["status"] in ("ok", "skipped", "unsupported") for r in runs) \
        else "failed"
    return {"status": status, "commands": commands, "results": results}


def knob_reason(knob: Knob, report: dict[str, Any]) -> tuple[str, str]:
    """(status, note) of a knob that is not run: what the preflight found, or the budget."""
    preflight = report.get("preflight", {})
    if knob.requires and not preflight.get(knob.requires):
        return "unsupported", preflight.get(f"{knob.requires}_reason") or \
            f"the preflight found no {knob.requires}"
    return "skipped", "not in the budget: the parts and the knobs before it fill it"


def shared_packed(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The shared+packed figures of a throughput report, if it has them."""
    layout = ((report or {}).get("layouts") or {}).get("shared+packed")
    if not layout:
        return None
    keys = ("pairs_per_s", "tokens_per_s", "mfu", "peak_memory_gib", "seconds", "steps",
            "graphs_compiled_after_warmup")
    return {k: layout.get(k) for k in keys}


PARTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "tests": ("GPU tests", part_tests),
    "throughput-hh": ("Throughput: HH-RLHF pairs", part_throughput_hh),
    "throughput-profiles": ("Throughput: synthetic profiles", part_throughput_profiles),
    "loss": ("Loss and log-prob kernel", part_loss),
    "knobs": ("Speed knobs", part_knobs),
}


def kept_knobs(preflight: dict[str, Any], plan: Plan, parts: list[str], budget: float
               ) -> list[Knob]:
    """The knobs this machine can run (the preflight's finding) that the budget holds, whole,
    after the other parts' caps."""
    runnable = [k for k in KNOBS if k.requires is None or preflight.get(k.requires)]
    if "knobs" not in parts:
        return runnable
    room = budget - sum(plan.part_cap(name, 0) for name in parts if name != "knobs")
    return runnable[:max(int(room // plan.caps["knobs"]), 0)]


def plan_lines(plan: Plan, parts: list[str], knobs: int, budget: float) -> list[str]:
    """`part NAME cap SECONDS` per part in run order, then `total SECONDS budget SECONDS`."""
    caps = [(name, plan.part_cap(name, knobs)) for name in parts]
    return [f"part {name} cap {cap:.0f}" for name, cap in caps] + \
        [f"total {sum(cap for _, cap in caps):.0f} budget {budget:.0f}"]


# ---- parsing pytest's output --------------------------------------------------------------


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a JUnit XML file: id, outcome, seconds and a short message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    tests = []
    for case in root.iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}" if module else case.get("name", "")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = child.get("message") or (child.text or "")
                break
        tests.append({"id": test_id, "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0.0), 2),
                      "message": " ".join(message.split())[:300]})
    return tests


_VERBOSE_LINE = re.compile(
    r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b\s*(?:\((.*)\))?")


def parse_pytest_log(path: Path) -> list[dict[str, Any]]:
    """Outcomes from pytest -v lines, for when it was killed before writing its XML."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    tests = {}
    for line in lines:
        match = _VERBOSE_LINE.match(line)
        if match:
            test_id, outcome, message = match.groups()
            tests[test_id] = {"id": test_id, "outcome": outcome.lower(), "seconds": None,
                              "message": (message or "")[:300]}
    return list(tests.values())


def pytest_summary(path: Path) -> str:
    """pytest's last line, e.g. '3 passed, 20 skipped in 5.12s'."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        match = re.match(r"^=+ (.*\bin [0-9.]+s.*?) =+$", line.strip())
        if match:
            return match.group(1)
    return ""


# ---- environment and outputs --------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Date, commit and the host; the GPU's name, memory and driver from nvidia-smi (torch's
    view of it comes from the preflight)."""
    def run(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPO,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = run("git", "rev-parse", "--short", "HEAD")
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit,
        # Unknown (None) in a copy of the working tree without its git folder.
        "uncommitted_changes": bool(run("git", "status", "--porcelain")) if commit else None,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "gpu": None}
    gpu = run("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
              "--format=csv,noheader")
    if gpu:
        name, memory, driver = (field.strip() for field in gpu.splitlines()[0].split(","))
        info.update(gpu=name, gpu_memory=memory, driver=driver)
    return info


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    report["suite"]["seconds"] = round(time.monotonic() - report["suite"]["_start"], 1)
    public = {**report, "suite": {k: v for k, v in report["suite"].items()
                                  if not k.startswith("_")}}
    (out / "gpu-suite.json").write_text(json.dumps(public, indent=2, default=str) + "\n")
    (out / "gpu-suite.md").write_text(render_markdown(public))


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    env, suite, parts = report["environment"], report["suite"], report["parts"]
    pre = report.get("preflight", {})
    hardware = env.get("gpu") or pre.get("gpu") or \
        f"CPU ({env['machine']}, {env['cpus']} cores)"
    title = "GPU suite" if not suite["dry_run"] else "GPU suite, dry run on a CPU (toy sizes)"
    changes = {True: " (with uncommitted changes)", False: "",
               None: " (uncommitted changes unknown)"}[env["uncommitted_changes"]]
    lines = [f"## {env['date'][:10]}: {hardware}, commit {env['commit'] or 'unknown'}{changes}:"
             f" {title}", ""]
    memory = f" ({env['gpu_memory']}, driver {env['driver']})" if env.get("gpu_memory") else ""
    lines += [f"Hardware: {hardware}{memory}; torch {pre.get('torch')}, CUDA {pre.get('cuda')}, "
              f"Python {env['python']}. Command: `{suite['command']}`, "
              f"{suite['seconds'] / 60:.1f} min in all (budget {suite['budget']:.0f} s).", ""]
    if suite["dry_run"]:
        lines += ["A rehearsal: toy sizes on a CPU, GPU tests skipped; the figures mean "
                  "nothing.", ""]
    lines += render_preflight(pre) + [""]
    for name, part in parts.items():
        lines += [f"### {PARTS[name][0]}", ""]
        lines += [f"`{c['command']}`: {status_text(c)}" for c in part["commands"]]
        if not part["commands"]:
            lines.append(part["status"])
        lines.append("")
        try:
            lines += RENDERERS[name](part.get("results"), report)
        except Exception as e:  # noqa: BLE001 - a malformed result must not lose the rest
            lines.append(f"Results not rendered ({type(e).__name__}: {e}); see the JSON.")
        lines.append("")
    lines += ["### Commands", ""]
    rows = [[name, c["name"], status_text(c), f"`{c['command']}`"]
            for name, part in parts.items() for c in part["commands"]]
    return "\n".join(lines + table(["part", "command", "status", "command line"], rows) + [""])


def render_preflight(pre: dict[str, Any]) -> list[str]:
    if not pre.get("command"):
        return ["Preflight: not run."]
    missing = [name for name in ("pytest", "transformers", "flash_attn_cute")
               if pre.get(name) is False]
    probe = {True: "work (logits in float32 from bfloat16 operands; no float32 copy of the "
                   "head)", False: "FAIL: every half-precision call copies the [V, D] head "
                                   "weight to float32",
             None: "not probed (no CUDA)"}[pre.get("bf16_matmuls")]
    return [f"Preflight: {status_text(pre['command'])}; capability {pre.get('capability')}; "
            f"missing: {', '.join(missing) or 'nothing'}; the log-prob kernel's bfloat16 "
            f"matmuls {probe}; FLASH backend: "
            f"{'available' if pre.get('flash') else pre.get('flash_reason') or '-'}."]


def status_text(command: dict[str, Any]) -> str:
    if command["status"] == "skipped":
        return f"skipped ({command['note']})"
    text = f"{command['status']} in {command['seconds']:.0f} s"
    if command["status"] == "failed":
        text += f" (exit {command['returncode']})"
    if command["status"] == "timeout":
        text += f" ({command['note']})"
    return text


def render_tests(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results or not results["tests"]:
        return ["No test results (see the log)."]
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(results["counts"].items()))
    lines = [f"{counts}{'; pytest: ' + results['summary'] if results['summary'] else ''}.", ""]
    rows = [[f"`{t['id']}`", t["outcome"], fmt(t["seconds"], ".1f"),
             t["message"].replace("|", "/")[:160]] for t in results["tests"]]
    return lines + table(["test", "outcome", "s", "message"], rows)


def render_loss(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results:
        return ["No results (see the log)."]
    errors = ", ".join(f"{k} {v:.1e}" for k, v in results["part1"]["oracle_relative_error"]
                       .items())
    lines = [f"Part 1: four sigmoid DPO implementations from logits "
             f"{'x'.join(map(str, results['part1']['shape']))} float32 (largest relative "
             f"error against a float64 oracle: {errors}). Part 2: hidden states to loss, "
             f"forward and backward, {results['part2']['dtype']}.", ""]
    rows = [[str(r["part"]), r["variant"], r["size"], fmt(r["median_ms"], ".1f"),
             fmt(r["peak_extra_mib"], ".1f"), fmt(r["loss"], ".6f")] for r in results["rows"]]
    lines += table(["part", "variant", "size", "median ms", "peak extra MiB", "loss"], rows)
    lines.append("")
    for c in results["part2"]["comparisons"]:
        lines.append(f"- N={c['tokens']} V={c['vocab']} D={c['dim']}: kernel / materialized "
                     f"time {fmt(c['time_ratio'], '.2f')}x, peak memory "
                     f"{fmt(c['memory_ratio'], '.3f')}; loss gap {fmt(c['loss_gap'], '.1e')}")
    return lines


LAYOUT_COLUMNS = [("layout", None, None), ("steps", "steps", "d"), ("pairs", "pairs", "d"),
                  ("pairs/s", "pairs_per_s", ".4g"), ("tokens/s", "tokens_per_s", ".0f"),
                  ("MFU", "mfu", ".1%"), ("peak GiB", "peak_memory_gib", ".2f"),
                  ("padding", "padding_fraction", ".1%"), ("data wait s", "data_wait_s", ".3f"),
                  ("recompiled", "graphs_compiled_after_warmup", "d"),
                  ("x paired", "speedup_vs_paired", ".2f"),
                  ("x paired+packed", "speedup_vs_paired+packed", ".2f")]


def render_throughput_hh(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results or "layouts" not in results:
        return ["No results (see the log)."]
    data, model = results["data"], results["model"]
    lines = [f"{model['name']} ({model['num_params'] / 1e6:.0f}M parameters, random init); "
             f"{data['source']}: {data['num_pairs']} pairs, packing length "
             f"{data['packing_length']}, {data['tokens_per_micro_batch']} tokens per "
             f"micro-batch, token-ratio ceiling {data['token_ratio_ceiling']:.3f}.", ""]
    rows = [[name] + [fmt(r.get(key), spec) for _, key, spec in LAYOUT_COLUMNS[1:]]
            for name, r in results["layouts"].items()]
    lines += table([c[0] for c in LAYOUT_COLUMNS], rows)
    return lines + [f"\n{layout}: FAILED: {message}"
                    for layout, message in results.get("failures", {}).items()]


def render_profiles(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results or "datasets" not in results:
        return ["No results (see the log)."]
    summary = results.get("summary", {})
    lines = [f"Each profile: about {report['suite']['plan']['profile_paired_tokens']:,} tokens "
             "in the paired layout; pairs/s of shared+packed over paired+packed beside the "
             "token-ratio ceiling and the paper's packed speed-up (Wang & Hegde 2024).", ""]
    rows = []
    for name, dataset in results["datasets"].items():
        row, layouts = summary.get(name, {}), dataset["layouts"]
        ratio, ceiling = row.get("shared_packed_vs_paired_packed"), row.get("token_ratio_ceiling")
        packed = [layouts.get(k, {}) for k in ("paired+packed", "shared+packed")]
        rows.append([name, str(dataset["data"]["num_pairs"]), fmt(ceiling, ".2f"),
                     fmt(ratio, ".2f"), fmt(ratio / ceiling if ratio and ceiling else None,
                                            ".0%"), fmt(row.get("paper_packed"), ".2f"),
                     *(fmt(p.get("pairs_per_s"), ".4g") for p in packed),
                     *(fmt(p.get("mfu"), ".1%") for p in packed),
                     fmt(max((p.get("peak_memory_gib") or 0 for p in packed), default=None),
                         ".1f")])
    lines += table(["profile", "pairs", "token ratio", "s+pk / p+pk", "of ceiling",
                    "paper (packed)", "pairs/s p+pk", "pairs/s s+pk", "MFU p+pk", "MFU s+pk",
                    "peak GiB"], rows)
    return lines + [f"\n{name} {layout}: FAILED: {message}"
                    for name, dataset in results["datasets"].items()
                    for layout, message in dataset.get("failures", {}).items()]


def render_knobs(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results:
        return ["No results (see the log)."]
    base = results.get("baseline") or {}
    lines = [f"shared+packed on the HH-RLHF pairs; the baseline ({results['baseline_source']})"
             " runs the defaults: no activation checkpointing, block size 128, the Triton "
             "FlexAttention backend, compile mode default.", ""]
    rows = [["baseline", "default", fmt(base.get("pairs_per_s"), ".4g"),
             fmt(base.get("tokens_per_s"), ".0f"), fmt(base.get("mfu"), ".1%"),
             fmt(base.get("peak_memory_gib"), ".2f"), "1.00", "ok" if base else "-"]]
    for r in results["runs"]:
        status = (r["status"] + (f": {r['note']}" if r["note"] else "")).replace("|", "/")
        rows.append([r["knob"], r["setting"], fmt(r.get("pairs_per_s"), ".4g"),
                     fmt(r.get("tokens_per_s"), ".0f"), fmt(r.get("mfu"), ".1%"),
                     fmt(r.get("peak_memory_gib"), ".2f"), fmt(r.get("vs_baseline"), ".2f"),
                     status])
    return lines + table(["knob", "setting", "pairs/s", "tokens/s", "MFU", "peak GiB",
                          "x baseline", "status"], rows)


RENDERERS = {"tests": render_tests, "throughput-hh": render_throughput_hh,
             "throughput-profiles": render_profiles, "loss": render_loss,
             "knobs": render_knobs}


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the markdown, JSON and logs")
    p.add_argument("--dry-run", action="store_true",
                   help="every part at toy sizes on the CPU (a rehearsal)")
    p.add_argument("--plan", action="store_true",
                   help="print each part's cap and the total against the budget, run nothing")
    p.add_argument("--budget", type=float, help=f"seconds for everything (default "
                   f"{GPU_PLAN.budget:.0f}; dry run {DRY_RUN_PLAN.budget:.0f})")
    p.add_argument("--commit", help="the commit to report when the folder is a copy of the "
                   "working tree without git (default: git rev-parse)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--preflight", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preflight:
        return args
    if not args.out:
        p.error("--out is required")
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown or not args.parts:
        p.error(f"--parts: unknown {unknown}; expected some of {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preflight:
        Path(args.preflight).write_text(json.dumps(preflight_report(), indent=2) + "\n")
        return 0
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    budget = args.budget or plan.budget
    out = Path(args.out).resolve()
    for folder in (out, out / "logs", out / "json"):
        folder.mkdir(parents=True, exist_ok=True)
    env = child_environment()
    if args.dry_run:  # the CPU suite rehearses the GPU tests themselves; here they skip
        env["PREFIXDPO_GPU_REHEARSAL"] = "0"
    runner = Runner(out, time.monotonic() + budget, env, args.out)
    command = display([sys.executable, "benchmarks/gpu_suite.py",
                       *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {
        "environment": environment(),
        "suite": {"command": command, "dry_run": args.dry_run, "budget": budget,
                  "parts": args.parts, "plan": dataclasses.asdict(plan),
                  "_start": time.monotonic()},
        "parts": {}}
    if args.commit:
        report["environment"]["commit"] = args.commit
    runner.say(f"GPU suite{' (dry run on the CPU)' if args.dry_run else ''}: commit "
               f"{report['environment']['commit']}, budget {budget:.0f} s; writing {out}")
    preflight = part_preflight(Context(plan, out, runner, {}, report, []))
    knobs = kept_knobs(preflight, plan, args.parts, budget)
    lines = plan_lines(plan, args.parts, len(knobs), budget)
    report["suite"]["plan_lines"] = lines
    runner.say("preflight: " + ", ".join(f"{k} {v}" for k, v in preflight.items()
                                          if not k.endswith("_reason")))
    print("\n".join(lines), flush=True)
    write_outputs(out, report)
    if args.plan:
        return 0
    if preflight.get("prefixdpo_error"):
        raise SystemExit(preflight["prefixdpo_error"])
    if not args.dry_run and not preflight.get("cuda_available"):
        raise SystemExit("no CUDA device: run on a GPU machine, or rehearse with --dry-run")
    models = {"hh": plan.model, "profiles": plan.profile_model}
    if args.dry_run:
        for key, config in (("hh", DRY_RUN_MODEL), ("profiles", DRY_RUN_PROFILE_MODEL)):
            models[key] = str(out / f"dry-run-model-{key}.json")
            Path(models[key]).write_text(json.dumps(config, indent=2) + "\n")
    ctx = Context(plan, out, runner, models, report, knobs)
    for name in args.parts:
        title, function = PARTS[name]
        runner.say(f"== {title}")
        try:
            report["parts"][name] = function(ctx)
        except Exception as e:  # noqa: BLE001 - recorded; the next part still runs
            report["parts"][name] = {"status": f"suite error: {type(e).__name__}: {e}",
                                     "commands": [], "results": None}
            runner.say(f"{name}: suite error: {type(e).__name__}: {e}")
        write_outputs(out, report)
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    runner.say("done: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    print(f"\nwrote {out / 'gpu-suite.md'}, {out / 'gpu-suite.json'} and {out / 'logs'}\n")
    print((out / "gpu-suite.md").read_text())
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

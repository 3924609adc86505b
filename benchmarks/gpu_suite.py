"""Everything to run on a machine with one CUDA GPU, as one command within a time budget.

    PYTHONPATH=. timeout 480 python3 benchmarks/gpu_suite.py --out gpu-suite [--commit HASH]
    python benchmarks/gpu_suite.py --dry-run --out /tmp/rehearsal   # every part, toy sizes, CPU

Parts, in this order (most important first, so a short budget loses the least):
1. `tests`: the GPU tests, `pytest -m gpu` on tests/gpu and tests/kernels (FlexAttention
   against the dense path, FSDP2 + bf16 + compile against the plain model, the live reference,
   activation checkpointing, evaluation, zero host syncs, a whole run through torchrun with
   resume and Hugging Face export), the files split over three pytest processes run side by
   side so that their compilations share the CPU cores; per-test outcome and time from
   pytest's JUnit XML (from its -v lines if it was stopped).
2. `throughput-hh`: `benchmarks/throughput.py`, Llama 3.2 1B (random init) on 512 HH-RLHF
   pairs shipped in `assets/`, packing length 4096, the four layouts in one run.
3. `throughput-profiles`: the same model on the six synthetic length profiles in one run,
   each about the same number of tokens, the two packed layouts.
4. `loss`: `benchmarks/dpo_loss.py --device cuda --quick`.
5. `knobs`: speed knobs, each one more run of part 2's command in the shared+packed layout
   only, compared with part 2's shared+packed figures: activation checkpointing, the
   FlexAttention block size, the FlexAttention backend (flash vs triton), the compile mode.
   A knob `throughput.py` does not offer (yet) is skipped with the reason.

Every command runs in its own process group and is killed at its time limit; a part that fails
or runs out of time is recorded and the next one runs. The time: `--budget` seconds in all
(default 450, inside the 480 of the `timeout` above), and each part at most its cap (`Plan`);
a command that would get under `MIN_COMMAND_S` (a knob run: `Plan.knob_min`) is skipped as
out of time. `--parts` runs a subset (the knobs then measure their own baseline when part 2 is
not among them). `--commit` names the commit where the folder has no git metadata.

Written under `--out`, and rewritten after every part and every knob run (so an outer
`timeout` still leaves what was done):
- `gpu-suite.md`: a block ready to paste into BENCHMARKS.md (date, GPU, torch and CUDA
  versions, commit, every command with its status and time, the tables);
- `gpu-suite.json`: every figure (each part's commands and parsed results);
- `logs/`: the raw output of every command, and pytest's XML; `json/`: the benchmarks' own
  JSON reports.

`--dry-run` rehearses all of it on the CPU at toy sizes (1-layer models written to `--out`, a
few pairs, `dpo_loss.py --tiny`, one pytest process; the GPU tests skip themselves), so that
the suite is exercised by the CPU test suite (tests/benchmarks/test_gpu_suite.py) and cannot
rot. Knobs that have no effect without CUDA are skipped in the dry run.

The suite imports nothing from the project: it only launches commands and reads what they
write, so it reports a broken part instead of breaking. It is longer than the project's usual
~500 lines because it is one runnable file: the runner, the parts, the parsers, the write-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
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
LAYOUTS = ("paired", "paired+packed", "shared", "shared+packed")
PROFILE_LAYOUTS = ("paired+packed", "shared+packed")
PROFILES = ("capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback")
MIN_COMMAND_S = 15.0  # a command given less than this is skipped as out of time
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time caps (seconds) of every part."""

    device: str
    model: str                       # throughput.py --model (HH-RLHF pairs, knobs)
    profile_model: str               # throughput.py --model for the synthetic profiles
    hh_pairs: int                    # HH-RLHF pairs in part 2 (and the knob runs)
    hh_packing_length: str           # their packing length: the MFU target's 4096 on a GPU
    profile_paired_tokens: int       # tokens per synthetic profile, in the paired layout
    loss_size: str                   # dpo_loss.py --quick or --tiny
    test_processes: int              # pytest processes side by side
    throughput_extra: tuple[str, ...]
    caps: dict[str, float]           # part name -> seconds
    knob_cap: float                  # one knob run
    knob_min: float                  # a knob run given less is skipped (it could not finish)
    budget: float                    # default --budget


GPU_PLAN = Plan(device="cuda", model="llama-3.2-1b", profile_model="llama-3.2-1b",
                hh_pairs=512, hh_packing_length="4096", profile_paired_tokens=120_000,
                loss_size="--quick", test_processes=3, throughput_extra=(),
                caps={"tests": 170, "throughput-hh": 80, "throughput-profiles": 120,
                      "loss": 60, "knobs": 450},
                knob_cap=120, knob_min=60, budget=450)
# Toy sizes on the CPU: every command and every parser, in about a minute on 2 cores.
DRY_RUN_PLAN = Plan(device="cpu", model="", profile_model="", hh_pairs=4,
                    hh_packing_length="auto", profile_paired_tokens=2500, loss_size="--tiny",
                    test_processes=1, throughput_extra=("--warmup-steps", "1"),
                    caps={"tests": 90, "throughput-hh": 90, "throughput-profiles": 90,
                          "loss": 60, "knobs": 90},
                    knob_cap=90, knob_min=15, budget=300)
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
    """One speed knob: `flags` added to the baseline command. `option` is the throughput.py
    option that must exist; `cuda_only`: skipped in the dry run (no effect on a CPU)."""

    label: str
    setting: str
    flags: tuple[str, ...]
    option: str
    cuda_only: bool = True


KNOBS = (
    Knob("activation checkpointing", "on", ("--activation-checkpointing",),
         "--activation-checkpointing", cuda_only=False),
    Knob("FlexAttention block size", "64", ("--block-size", "64"), "--block-size"),
    # ---- FlexAttention backend: flash vs triton -------------------------------------------
    # FlexAttention's FLASH backend (FlashAttention-4 kernels) against its Triton kernels.
    Knob("FlexAttention backend", "flash", ("--flex-backend", "flash"), "--flex-backend"),
    Knob("FlexAttention backend", "triton", ("--flex-backend", "triton"), "--flex-backend"),
    # ----------------------------------------------------------------------------------------
    # Last: max-autotune compiles for longest.
    Knob("torch.compile mode", "max-autotune-no-cudagraphs",
         ("--compile-mode", "max-autotune-no-cudagraphs"), "--compile-mode"),
)


# ---- running commands ---------------------------------------------------------------------


def clock() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


class Runner:
    """Runs commands, one after another or side by side, against a deadline, each logged to
    its own file."""

    def __init__(self, out: Path, deadline: float, env: dict[str, str],
                 out_shown: str | None = None):
        self.out, self.deadline, self.env = out, deadline, env
        self.out_shown = out_shown or str(out)  # how commands show the output folder
        self.start = time.monotonic()
        self.count = 0

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"+{seconds // 60}:{seconds % 60:02d}"

    def say(self, message: str) -> None:
        print(f"[{clock()} {self.elapsed()}] {message}", flush=True)

    def run(self, name: str, argv: list[str], cap: float, part_deadline: float,
            minimum: float | None = None) -> dict[str, Any]:
        """Run `argv` from the repository root for at most `cap` seconds (and never past the
        part's or the suite's deadline); skip it when that leaves under `minimum` seconds
        (default MIN_COMMAND_S). Returns the command's record."""
        return self.run_together([(name, argv)], cap, part_deadline, minimum)[0]

    def run_together(self, commands: list[tuple[str, list[str]]], cap: float,
                     part_deadline: float, minimum: float | None = None
                     ) -> list[dict[str, Any]]:
        """Run (name, argv) commands side by side, under one time limit as in `run`."""
        minimum = MIN_COMMAND_S if minimum is None else minimum
        now = time.monotonic()
        limit = min(cap, self.deadline - now, part_deadline - now)
        records, running = [], []
        for name, argv in commands:
            self.count += 1
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            log = self.out / "logs" / f"{self.count:02d}-{slug}.log"
            shown = display(argv).replace(str(self.out), self.out_shown)
            records.append({"name": name, "command": shown,
                            "log": str(log.relative_to(self.out)), "status": "skipped",
                            "returncode": None, "seconds": 0.0, "cpu_s": None,
                            "limit_s": None, "note": ""})
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
            verdict = {"ok": "ok", "failed": f"FAILED (exit {record['returncode']})",
                       "timeout": "TIMEOUT"}[record["status"]]
            self.say(f"{record['name']}: {verdict} in {record['seconds']:.1f} s "
                     f"(log {record['log']})")
            if record["status"] != "ok":
                tail = (self.out / record["log"]).read_text(errors="replace")
                print("\n".join(f"    | {line[:200]}" for line in
                                tail.strip().splitlines()[-6:]), flush=True)
        if len(records) == 1:  # the CPU time of commands run side by side is not separable
            records[0]["cpu_s"] = round(children_cpu_seconds() - cpu_before, 1)
        return records


def children_cpu_seconds() -> float:
    """CPU time of the finished commands and the processes they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group (workers, torchrun's children), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def display(argv: list[str]) -> str:
    """The command as one would type it from the repository root."""
    shown = ["python" if arg == sys.executable else arg for arg in argv]
    return " ".join(shlex.quote(arg) for arg in shown)


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


# ---- the parts ----------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What the parts share: the plan, where things go, and what earlier parts found."""

    plan: Plan
    out: Path
    runner: Runner
    models: dict[str, str]               # throughput.py --model: "hh" and "profiles"
    report: dict[str, Any]

    def part_deadline(self, name: str) -> float:
        return time.monotonic() + self.plan.caps[name]

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
    records = ctx.runner.run_together(commands, ctx.plan.caps["tests"],
                                      ctx.part_deadline("tests"))
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
    record = ctx.runner.run("loss benchmark", argv, ctx.plan.caps["loss"],
                            ctx.part_deadline("loss"))
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def throughput_command(ctx: Context, *flags: str, json_path: Path, model: str = "hh"
                       ) -> list[str]:
    return [sys.executable, "benchmarks/throughput.py", "--model", ctx.models[model],
            "--device", ctx.plan.device, *ctx.plan.throughput_extra, *flags, "--json",
            str(json_path)]


def hh_flags(ctx: Context, layouts: tuple[str, ...]) -> tuple[str, ...]:
    return ("--data", HH_DATA, "--tokenizer", TOKENIZER, "--pairs", str(ctx.plan.hh_pairs),
            "--packing-length", ctx.plan.hh_packing_length, "--layouts", ",".join(layouts))


def part_throughput_hh(ctx: Context) -> dict[str, Any]:
    path = ctx.json_path("throughput-hh-rlhf")
    argv = throughput_command(ctx, *hh_flags(ctx, LAYOUTS), json_path=path)
    record = ctx.runner.run("throughput, HH-RLHF pairs", argv, ctx.plan.caps["throughput-hh"],
                            ctx.part_deadline("throughput-hh"))
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def part_throughput_profiles(ctx: Context) -> dict[str, Any]:
    path = ctx.json_path("throughput-profiles")
    argv = throughput_command(
        ctx, "--dataset", ",".join(PROFILES), "--paired-tokens",
        str(ctx.plan.profile_paired_tokens), "--layouts", ",".join(PROFILE_LAYOUTS),
        json_path=path, model="profiles")
    record = ctx.runner.run("throughput, synthetic profiles", argv,
                            ctx.plan.caps["throughput-profiles"],
                            ctx.part_deadline("throughput-profiles"))
    # Rewritten after each profile: a run cut short keeps the profiles it finished.
    return {"status": record["status"], "commands": [record], "results": read_json(path)}


def part_knobs(ctx: Context) -> dict[str, Any]:
    deadline = ctx.part_deadline("knobs")
    commands: list[dict[str, Any]] = []
    baseline_report = (ctx.report["parts"].get("throughput-hh") or {}).get("results")
    source = "part throughput-hh"
    if not shared_packed(baseline_report):
        path = ctx.json_path("knob-baseline")
        argv = throughput_command(ctx, *hh_flags(ctx, ("shared+packed",)), json_path=path)
        commands.append(ctx.runner.run("knob baseline", argv, ctx.plan.knob_cap, deadline,
                                       ctx.plan.knob_min))
        baseline_report, source = read_json(path), "its own run"
    baseline = shared_packed(baseline_report)
    options, supported = throughput_options(ctx, baseline_report, commands, deadline)
    runs: list[dict[str, Any]] = []
    results = {"baseline": baseline, "baseline_source": source, "runs": runs}
    for knob in KNOBS:
        row: dict[str, Any] = {"knob": knob.label, "setting": knob.setting,
                               "flags": list(knob.flags), "status": "skipped", "note": ""}
        if knob.option not in options:
            row["note"] = f"throughput.py has no {knob.option} option yet"
        elif knob.cuda_only and ctx.plan.device != "cuda":
            row["note"] = "no effect on a CPU (dry run)"
        else:
            slug = re.sub(r"[^a-z0-9]+", "-", f"knob {knob.label} {knob.setting}".lower())
            path = ctx.json_path(slug.strip("-"))
            argv = throughput_command(ctx, *hh_flags(ctx, ("shared+packed",)), *knob.flags,
                                      json_path=path)
            record = ctx.runner.run(f"knob: {knob.label} {knob.setting}", argv,
                                    ctx.plan.knob_cap, deadline, ctx.plan.knob_min)
            commands.append(record)
            row["status"], row["note"] = record["status"], record["note"]
            if record["status"] == "failed":  # its last line says why (an error, a refusal)
                lines = (ctx.out / record["log"]).read_text(errors="replace").split("\n")
                row["note"] = next((line.strip() for line in reversed(lines) if line.strip()),
                                   "")[:200]
                if "not supported yet" in row["note"]:
                    row["status"] = "unsupported"
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


def shared_packed(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The shared+packed figures of a throughput report, if it has them."""
    layout = ((report or {}).get("layouts") or {}).get("shared+packed")
    if not layout:
        return None
    keys = ("pairs_per_s", "tokens_per_s", "mfu", "peak_memory_gib", "seconds", "steps",
            "graphs_compiled_after_warmup")
    return {k: layout.get(k) for k in keys}


def throughput_options(ctx: Context, report: dict[str, Any] | None,
                       commands: list[dict[str, Any]], deadline: float
                       ) -> tuple[set[str], dict[str, Any]]:
    """The options throughput.py accepts, and the knobs it reports as supported: from a report
    it wrote (its `args` are its parsed options), else from `--help`."""
    if report and "args" in report:
        options = {"--" + key.replace("_", "-") for key in report["args"]}
        return options, report.get("supported", {})
    argv = [sys.executable, "benchmarks/throughput.py", "--help"]
    record = ctx.runner.run("throughput.py --help", argv, 60, deadline)
    commands.append(record)
    text = (ctx.out / record["log"]).read_text(errors="replace") \
        if record["status"] == "ok" else ""
    return set(re.findall(r"--[a-z][a-z0-9-]*", text)), {}


PARTS: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "tests": ("GPU tests", part_tests),
    "throughput-hh": ("Throughput: HH-RLHF pairs", part_throughput_hh),
    "throughput-profiles": ("Throughput: synthetic profiles", part_throughput_profiles),
    "loss": ("Loss and log-prob kernel", part_loss),
    "knobs": ("Speed knobs", part_knobs),
}


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


def environment(device: str) -> dict[str, Any]:
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
        "cpus": os.cpu_count()}
    info["torch"], info["cuda"], info["cuda_available"] = None, None, False
    if device == "cuda":
        try:
            import torch

            info["torch"], info["cuda"] = torch.__version__, torch.version.cuda
            info["cuda_available"] = torch.cuda.is_available()
        except ImportError:
            pass
    else:  # the version without importing torch (seconds of a CPU rehearsal)
        try:
            info["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = run("nvidia-smi", "--query-gpu=name,memory.total,driver_version",
              "--format=csv,noheader")
    if gpu:
        name, memory, driver = (field.strip() for field in gpu.splitlines()[0].split(","))
        info.update(gpu=name, gpu_memory=memory, driver=driver)
    elif device == "cuda" and info["cuda_available"]:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["gpu"] = None
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
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    env, suite, parts = report["environment"], report["suite"], report["parts"]
    date = env["date"][:10]
    hardware = env.get("gpu") or f"CPU ({env['machine']}, {env['cpus']} cores)"
    title = "GPU suite" if not suite["dry_run"] else "GPU suite, dry run on a CPU (toy sizes)"
    changes = {True: " (with uncommitted changes)", False: "",
               None: " (uncommitted changes unknown)"}[env["uncommitted_changes"]]
    lines = [f"## {date}: {hardware}, commit {env['commit'] or 'unknown'}{changes}: {title}",
             ""]
    memory = f" ({env['gpu_memory']}, driver {env['driver']})" if env.get("gpu_memory") else ""
    lines += [f"Hardware: {hardware}{memory}; torch {env['torch']}, CUDA {env['cuda']}, "
              f"Python {env['python']}. Command: `{suite['command']}`, "
              f"{suite['seconds'] / 60:.1f} min in all (budget {suite['budget']:.0f} s).", ""]
    if suite["dry_run"]:
        lines += ["A rehearsal: toy sizes on a CPU, GPU tests skipped; the figures mean "
                  "nothing.", ""]
    for name, part in parts.items():
        lines += [f"### {PARTS[name][0]}", ""]
        for command in part["commands"]:
            lines.append(f"`{command['command']}`: {status_text(command)}")
        lines.append("")
        try:
            lines += RENDERERS[name](part.get("results"), report)
        except Exception as e:  # noqa: BLE001 - a malformed result must not lose the rest
            lines.append(f"Results not rendered ({type(e).__name__}: {e}); see the JSON.")
        lines.append("")
    lines += ["### Commands", ""]
    rows = [[name, c["name"], status_text(c), f"`{c['command']}`"]
            for name, part in parts.items() for c in part["commands"]]
    lines += table(["part", "command", "status", "command line"], rows) + [""]
    return "\n".join(lines)


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


def layout_table(layouts: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[name] + [fmt(r.get(key), spec) for _, key, spec in LAYOUT_COLUMNS[1:]]
            for name, r in layouts.items()]
    return table([c[0] for c in LAYOUT_COLUMNS], rows)


def data_line(report: dict[str, Any]) -> str:
    data, model = report["data"], report["model"]
    return (f"{model['name']} ({model['num_params'] / 1e6:.0f}M parameters, random init); "
            f"{data['source']}: {data['num_pairs']} pairs, packing length "
            f"{data['packing_length']}, {data['tokens_per_micro_batch']} tokens per "
            f"micro-batch, token-ratio ceiling {data['token_ratio_ceiling']:.3f}.")


def render_throughput_hh(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results or "layouts" not in results:
        return ["No results (see the log)."]
    lines = [data_line(results), ""] + layout_table(results["layouts"])
    for layout, message in results.get("failures", {}).items():
        lines.append(f"\n{layout}: FAILED: {message}")
    return lines


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
        ratio = row.get("shared_packed_vs_paired_packed")
        ceiling = row.get("token_ratio_ceiling")
        share = ratio / ceiling if ratio and ceiling else None
        packed = [layouts.get(k, {}) for k in PROFILE_LAYOUTS]
        rows.append([name, str(dataset["data"]["num_pairs"]), fmt(ceiling, ".2f"),
                     fmt(ratio, ".2f"), fmt(share, ".0%"), fmt(row.get("paper_packed"), ".2f"),
                     *(fmt(p.get("pairs_per_s"), ".4g") for p in packed),
                     *(fmt(p.get("mfu"), ".1%") for p in packed),
                     fmt(max((p.get("peak_memory_gib") or 0 for p in packed), default=None),
                         ".1f")])
    header = ["profile", "pairs", "token ratio", "s+pk / p+pk", "of ceiling", "paper (packed)",
              "pairs/s p+pk", "pairs/s s+pk", "MFU p+pk", "MFU s+pk", "peak GiB"]
    lines += table(header, rows)
    for name, dataset in results["datasets"].items():
        for layout, message in dataset.get("failures", {}).items():
            lines.append(f"\n{name} {layout}: FAILED: {message}")
    return lines


def render_knobs(results: dict[str, Any] | None, report: dict[str, Any]) -> list[str]:
    if not results:
        return ["No results (see the log)."]
    base = results.get("baseline") or {}
    lines = [f"shared+packed on the HH-RLHF pairs; the baseline ({results['baseline_source']})"
             " runs the defaults: no activation checkpointing, block size 128, the default "
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
    p.add_argument("--out", required=True, help="folder for the markdown, JSON and logs")
    p.add_argument("--dry-run", action="store_true",
                   help="every part at toy sizes on the CPU (a rehearsal)")
    p.add_argument("--budget", type=float, help="seconds for everything (default 450; dry "
                   "run 300)")
    p.add_argument("--commit", help="the commit to report when the folder is a copy of the "
                   "working tree without git (default: git rev-parse)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {', '.join(PARTS)}")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown or not args.parts:
        raise SystemExit(f"--parts: unknown {unknown}; expected some of {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY_RUN_PLAN if args.dry_run else GPU_PLAN
    budget = args.budget or plan.budget
    out = Path(args.out).resolve()
    for folder in (out, out / "logs", out / "json"):
        folder.mkdir(parents=True, exist_ok=True)
    env_info = environment(plan.device)
    if args.commit:
        env_info["commit"] = args.commit
    if not args.dry_run and not env_info["cuda_available"]:
        raise SystemExit("no CUDA device: run on a GPU machine, or rehearse with --dry-run")
    models = {"hh": plan.model, "profiles": plan.profile_model}
    if args.dry_run:
        for key, config in (("hh", DRY_RUN_MODEL), ("profiles", DRY_RUN_PROFILE_MODEL)):
            models[key] = str(out / f"dry-run-model-{key}.json")
            Path(models[key]).write_text(json.dumps(config, indent=2) + "\n")
    command = display([sys.executable, "benchmarks/gpu_suite.py",
                       *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {
        "environment": env_info,
        "suite": {"command": command, "dry_run": args.dry_run, "budget": budget,
                  "parts": args.parts, "plan": dataclasses.asdict(plan),
                  "_start": time.monotonic()},
        "parts": {}}
    env = child_environment()
    if args.dry_run:  # the CPU suite rehearses the GPU tests themselves; here they skip
        env["PREFIXDPO_GPU_REHEARSAL"] = "0"
    runner = Runner(out, time.monotonic() + budget, env, args.out)
    ctx = Context(plan, out, runner, models, report)
    runner.say(f"GPU suite{' (dry run on the CPU)' if args.dry_run else ''}: "
               f"{env_info.get('gpu') or 'no GPU'}, torch {env_info['torch']}, "
               f"commit {env_info['commit']}, budget {budget:.0f} s, parts "
               f"{', '.join(args.parts)}; writing {out}")
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

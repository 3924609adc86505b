"""Everything to run on a machine with one CUDA GPU, as one command within a time budget.

    PYTHONPATH=. timeout 570 python3 benchmarks/gpu_suite.py --out gpu-suite [--commit HASH]
    python benchmarks/gpu_suite.py --plan --out gpu-suite   # the parts and their caps
    python benchmarks/gpu_suite.py --dry-run --out /tmp/rehearsal   # every part, toy sizes, CPU

BENCHMARKS.md, "Running on a GPU", says what runs, in which order, and what is written. The
suite launches commands and reads the JSON they write; only the preflight's own process imports
the project, so a broken part is reported instead of ending the suite.
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Git's output here, "" without git. (Not `measure.git`: this process never imports torch,
    so a torch that fails to import is the preflight's finding, not the suite's traceback.)"""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


HH_DATA = "assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz"
TOKENIZER = "assets/tokenizers/mistral-7b-v0.1"
HH_LAYOUTS = ("shared+packed", "paired+packed", "paired", "shared")
PROFILE_LAYOUTS = ("shared+packed", "paired+packed")
PROFILES = ("capybara", "hh-rlhf", "metamath-dpo", "tldr", "tulu-helpsteer", "ultrafeedback")
MIN_COMMAND_S = 15.0  # a command given less than this is skipped as out of time
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
# Relative expected time of the GPU test files (compilations, launched runs); others count 1.
GPU_TEST_WEIGHTS = {"test_flex_cuda.py": 3.0, "test_train_run_cuda.py": 3.0,
                    "test_fsdp_cuda.py": 2.0, "test_reference_eval_cuda.py": 2.0}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time caps (seconds) of every part; a knob runs only with its whole cap left."""

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
                      "loss": 40, "knobs": 60}, budget=540)
# Toy sizes on the CPU: every command and every parser, in about a minute on 2 cores.
DRY_RUN_PLAN = dataclasses.replace(
    GPU_PLAN, device="cpu", model="", profile_model="", hh_pairs=4, packing_length="auto",
    profile_paired_tokens=2500, loss_size="--tiny", test_processes=1, budget=600,
    caps={"tests": 90, "throughput-hh": 90, "throughput-profiles": 90, "loss": 60, "knobs": 60})
DRY_RUN_MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                     hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                     max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
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


class Runner:
    """Runs commands against the suite's deadline, one after another or side by side, each in
    its own process group (so that a stop reaches its workers) and logged to its own file."""

    def __init__(self, out: Path, deadline: float, env: dict[str, str],
                 out_shown: str | None = None):
        self.out, self.deadline, self.env = out, deadline, env
        self.out_shown = out_shown or str(out)  # how commands show the output folder
        self.start, self.count = time.monotonic(), 0

    def say(self, message: str) -> None:
        seconds = int(time.monotonic() - self.start)
        print(f"[{datetime.datetime.now():%H:%M:%S} +{seconds // 60}:{seconds % 60:02d}] "
              f"{message}", flush=True)

    def run(self, name: str, argv: list[str], cap: float, minimum: float | None = None
            ) -> dict[str, Any]:
        """Run `argv` from the repository root for at most `cap` seconds (and never past the
        deadline); skip it when that leaves under `minimum` (default MIN_COMMAND_S)."""
        return self.run_together([(name, argv)], cap, minimum)[0]

    def run_together(self, commands: list[tuple[str, list[str]]], cap: float,
                     minimum: float | None = None) -> list[dict[str, Any]]:
        """Run (name, argv) commands side by side under one limit, as `run` does."""
        limit = min(cap, self.deadline - time.monotonic())
        records = [self.record(name, argv) for name, argv in commands]
        if limit < (MIN_COMMAND_S if minimum is None else minimum):
            for record in records:
                record["note"] = f"out of time ({max(limit, 0):.0f} s left)"
                self.say(f"{record['name']}: skipped, {record['note']}")
            return records
        started, cpu_before = time.monotonic(), children_cpu_seconds()
        running = [self.launch(record, argv, limit)
                   for record, (_, argv) in zip(records, commands)]
        for record, (log, process) in zip(records, running):
            try:
                record["returncode"] = process.wait(
                    timeout=max(started + limit - time.monotonic(), 0.1))
                record["status"] = "ok" if record["returncode"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                stop_group(process)
                record.update(status="timeout", returncode=process.returncode,
                              note=f"killed after {limit:.0f} s")
            log.close()
            record["seconds"] = round(time.monotonic() - started, 1)
            self.say(f"{record['name']}: {status_text(record)} (log {record['log']})")
            if record["status"] != "ok":
                print("\n".join(f"    | {line[:200]}" for line in
                                read_lines(self.out / record["log"])[-6:]), flush=True)
        if len(records) == 1:  # the CPU time of commands run side by side is not separable
            records[0]["cpu_s"] = round(children_cpu_seconds() - cpu_before, 1)
        return records

    def record(self, name: str, argv: list[str]) -> dict[str, Any]:
        self.count += 1
        return {"name": name, "status": "skipped", "returncode": None,
                "command": display(argv).replace(str(self.out), self.out_shown),
                "log": f"logs/{self.count:02d}-{slug(name)}.log", "seconds": 0.0,
                "cpu_s": None, "limit_s": None, "note": ""}

    def launch(self, record: dict[str, Any], argv: list[str], limit: float
               ) -> tuple[Any, subprocess.Popen]:
        record["limit_s"] = round(limit)
        self.say(f"{record['name']}: started (limit {limit:.0f} s)\n    {record['command']}")
        log = open(self.out / record["log"], "w")
        log.write(f"$ {record['command']}\n")
        log.flush()
        return log, subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)


def children_cpu_seconds() -> float:
    return sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])  # user + system


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group (workers, torchrun's children), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
            return


def display(argv: list[str]) -> str:
    """The command as one would type it from the repository root."""
    return " ".join(shlex.quote("python" if arg == sys.executable else arg) for arg in argv)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def preflight_report() -> dict[str, Any]:
    """What this machine has, found without building any model (in a process of its own)."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ImportError: its parent package is missing
            return False

    report: dict[str, Any] = {name.replace(".", "_"): installed(name)
                              for name in ("pytest", "transformers", "flash_attn.cute")}
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
    # Where bfloat16 matmuls fail, every half-precision call copies the [V, D] head to float32.
    report["bf16_matmuls"] = half_matmuls_work(torch.device("cuda")) if cuda else None
    try:
        flex_kernel_options("flash")
        report["flash"], report["flash_reason"] = True, ""
    except ValueError as e:
        report["flash"], report["flash_reason"] = False, str(e)
    return report


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


@dataclasses.dataclass
class Suite:
    """What the parts share: the plan, the runner, the report so far, the knobs the preflight
    kept and the models (presets, or the dry run's configs)."""

    plan: Plan
    out: Path
    runner: Runner
    report: dict[str, Any]
    knobs: list[Knob] = dataclasses.field(default_factory=list)
    models: dict[str, str] = dataclasses.field(default_factory=dict)

    def write(self) -> None:
        """Rewrite the JSON and the markdown: a suite stopped at any point leaves what it did."""
        self.report["suite"]["seconds"] = round(time.monotonic() - self.runner.start, 1)
        text = json.dumps(self.report, indent=2, default=str)
        (self.out / "gpu-suite.json").write_text(text + "\n")
        (self.out / "gpu-suite.md").write_text(render_markdown(self.report))

    def run_json(self, name: str, argv: list[str], json_name: str, cap: float,
                 minimum: float | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Run a command that writes its report to `--json PATH`: its record and that report."""
        path = self.out / "json" / f"{json_name}.json"
        record = self.runner.run(name, [*argv, "--json", str(path)], cap, minimum)
        return record, read_json(path)

    def one_command(self, part: str, name: str, argv: list[str], json_name: str
                    ) -> dict[str, Any]:
        record, results = self.run_json(name, argv, json_name, self.plan.caps[part])
        return {"status": record["status"], "commands": [record], "results": results}

    def throughput(self, *flags: str, model: str = "hh") -> list[str]:
        return [sys.executable, "benchmarks/throughput.py", "--model", self.models[model],
                "--device", self.plan.device, "--packing-length", self.plan.packing_length,
                *self.plan.throughput_extra, *flags]

    def hh_throughput(self, layouts: tuple[str, ...], *flags: str) -> list[str]:
        return self.throughput("--data", HH_DATA, "--tokenizer", TOKENIZER, "--pairs",
                               str(self.plan.hh_pairs), "--layouts", ",".join(layouts), *flags)


def gpu_test_groups(processes: int) -> list[list[str]]:
    """The GPU test files in `processes` groups of about equal expected time (heavier files
    first, each into the lightest group), a pytest process each: on a GPU their compilations
    then share the CPU cores."""
    if processes <= 1:
        return [["tests/gpu", "tests/kernels"]]
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests/gpu").glob("test_*.py"))]
    groups: list[list[str]] = [[] for _ in range(processes)]
    loads = [0.0] * processes
    for path in sorted([*files, "tests/kernels"],
                       key=lambda f: -GPU_TEST_WEIGHTS.get(Path(f).name, 1.0)):
        lightest = loads.index(min(loads))
        groups[lightest].append(path)
        loads[lightest] += GPU_TEST_WEIGHTS.get(Path(path).name, 1.0)
    return [group for group in groups if group]


def part_tests(s: Suite) -> dict[str, Any]:
    if s.report["preflight"].get("pytest") is False:
        return {"status": "skipped: pytest is not installed", "commands": [], "results": None}
    groups = gpu_test_groups(s.plan.test_processes)
    xmls = [s.out / "logs" / f"pytest-{index + 1}.xml" for index in range(len(groups))]
    commands = []
    for index, (paths, xml) in enumerate(zip(groups, xmls)):
        xml.unlink(missing_ok=True)
        name = "GPU tests" if len(groups) == 1 else f"GPU tests {index + 1}/{len(groups)}"
        commands.append((name, [sys.executable, "-m", "pytest", "-m", "gpu", *paths, "-v",
                                "-rA", "--durations=0", "-p", "no:cacheprovider",
                                f"--junitxml={xml}"]))
    records = s.runner.run_together(commands, s.plan.caps["tests"])
    tests, summaries = [], []
    for record, xml in zip(records, xmls):
        log = s.out / record["log"]
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


def part_throughput_hh(s: Suite) -> dict[str, Any]:
    return s.one_command("throughput-hh", "throughput, HH-RLHF pairs",
                         s.hh_throughput(HH_LAYOUTS), "throughput-hh-rlhf")


def part_throughput_profiles(s: Suite) -> dict[str, Any]:
    argv = s.throughput("--dataset", ",".join(PROFILES), "--paired-tokens",
                        str(s.plan.profile_paired_tokens), "--layouts",
                        ",".join(PROFILE_LAYOUTS), model="profiles")
    return s.one_command("throughput-profiles", "throughput, synthetic profiles", argv,
                         "throughput-profiles")


def part_loss(s: Suite) -> dict[str, Any]:
    argv = [sys.executable, "benchmarks/dpo_loss.py", "--device", s.plan.device,
            s.plan.loss_size]
    return s.one_command("loss", "loss benchmark", argv, "dpo_loss")


def part_knobs(s: Suite) -> dict[str, Any]:
    """Each knob against shared+packed on the HH-RLHF pairs, each run only with its whole cap
    left (a knob cut short measures nothing); the baseline is part 2's, or its own run."""
    cap, commands = s.plan.caps["knobs"], []
    hh = (s.report["parts"].get("throughput-hh") or {}).get("results")
    results = {"baseline": shared_packed(hh), "baseline_source": "part throughput-hh",
               "runs": []}
    if not results["baseline"]:
        record, own = s.run_json("knob baseline", s.hh_throughput(("shared+packed",)),
                                 "knob-baseline", cap, minimum=cap)
        commands.append(record)
        results.update(baseline=shared_packed(own), baseline_source="its own run")
    preflight = s.report.get("preflight", {})
    for knob in KNOBS:
        row: dict[str, Any] = {"knob": knob.label, "setting": knob.setting,
                               "flags": list(knob.flags), "status": "skipped", "note": ""}
        if knob.requires and not preflight.get(knob.requires):
            row["status"] = "unsupported"
            row["note"] = preflight.get(f"{knob.requires}_reason") or \
                f"the preflight found no {knob.requires}"
        elif knob not in s.knobs:
            row["note"] = "not in the budget: the parts and the knobs before it fill it"
        elif knob.cuda_only and s.plan.device != "cuda":
            row["note"] = "no effect on a CPU (dry run)"
        else:
            name = f"knob: {knob.label} {knob.setting}"
            record, figures = s.run_json(name, s.hh_throughput(("shared+packed",), *knob.flags),
                                         slug(name), cap, minimum=cap)
            commands.append(record)
            row["status"], row["note"] = record["status"], record["note"]
            if record["status"] == "failed":  # its last line says why
                row["note"] = next((line.strip() for line in
                                    reversed(read_lines(s.out / record["log"]))
                                    if line.strip()), "")[:200]
            row.update(shared_packed(figures) or {})
            if row.get("pairs_per_s") and results["baseline"]:
                row["vs_baseline"] = row["pairs_per_s"] / results["baseline"]["pairs_per_s"]
        results["runs"].append(row)
        s.report["parts"]["knobs"] = {"status": "running", "commands": commands,
                                      "results": results}
        s.write()
    ok = all(r["status"] in ("ok", "skipped", "unsupported") for r in results["runs"])
    return {"status": "ok" if ok else "failed", "commands": commands, "results": results}


def shared_packed(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The shared+packed figures of a throughput report, if it has them."""
    layout = ((report or {}).get("layouts") or {}).get("shared+packed")
    keys = ("pairs_per_s", "tokens_per_s", "mfu", "peak_memory_gib", "seconds", "steps",
            "graphs_compiled_after_warmup")
    return {k: layout.get(k) for k in keys} if layout else None


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
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                outcome, message = name, child.get("message") or (child.text or "")
                break
        tests.append({"id": test_id, "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0.0), 2),
                      "message": " ".join(message.split())[:300]})
    return tests


def parse_pytest_log(path: Path) -> list[dict[str, Any]]:
    """Outcomes from pytest -v lines, for when it was killed before writing its XML."""
    tests = {}
    for line in read_lines(path):
        match = re.match(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b\s*"
                         r"(?:\((.*)\))?", line)
        if match:
            test_id, outcome, message = match.groups()
            tests[test_id] = {"id": test_id, "outcome": outcome.lower(), "seconds": None,
                              "message": (message or "")[:300]}
    return list(tests.values())


def pytest_summary(path: Path) -> str:
    """pytest's last line, e.g. '3 passed, 20 skipped in 5.12s'."""
    for line in reversed(read_lines(path)):
        match = re.match(r"^=+ (.*\bin [0-9.]+s.*?) =+$", line.strip())
        if match:
            return match.group(1)
    return ""


def environment() -> dict[str, Any]:
    """Date, commit and the host; the GPU's name, memory and driver from nvidia-smi (torch's
    view of it comes from the preflight)."""
    commit = git("rev-parse", "--short", "HEAD")
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit,
        # Unknown (None) in a copy of the working tree without its git folder.
        "uncommitted_changes": bool(git("status", "--porcelain")) if commit else None,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "gpu": None}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpu = ""
    if gpu:
        name, memory, driver = (field.strip() for field in gpu.splitlines()[0].split(","))
        info.update(gpu=name, gpu_memory=memory, driver=driver)
    return info


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def table(columns: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table; `columns` is 'header[:format spec]|...'; a missing value shows '-'."""
    headers, _, specs = zip(*(column.partition(":") for column in columns.split("|")))
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(fmt(value, spec).replace("|", "/") for value, spec in zip(row, specs))
        + " |" for row in rows]


def status_text(command: dict[str, Any]) -> str:
    status, note = command["status"], command["note"]
    if status == "skipped":
        return f"skipped ({note})"
    why = {"failed": f" (exit {command['returncode']})", "timeout": f" ({note})"}.get(status, "")
    return f"{status} in {command['seconds']:.0f} s{why}"


def render_markdown(report: dict[str, Any]) -> str:
    env, suite, parts = report["environment"], report["suite"], report["parts"]
    pre = report.get("preflight", {})
    hardware = env.get("gpu") or pre.get("gpu") or \
        f"CPU ({env['machine']}, {env['cpus']} cores)"
    title = "GPU suite" if not suite["dry_run"] else "GPU suite, dry run on a CPU (toy sizes)"
    changes = {True: " (with uncommitted changes)", False: "",
               None: " (uncommitted changes unknown)"}[env["uncommitted_changes"]]
    memory = f" ({env['gpu_memory']}, driver {env['driver']})" if env.get("gpu_memory") else ""
    lines = [f"## {env['date'][:10]}: {hardware}, commit {env['commit'] or 'unknown'}{changes}:"
             f" {title}", "",
             f"Hardware: {hardware}{memory}; torch {pre.get('torch')}, CUDA {pre.get('cuda')}, "
             f"Python {env['python']}. Command: `{suite['command']}`, "
             f"{suite['seconds'] / 60:.1f} min in all (budget {suite['budget']:.0f} s).", ""]
    if suite["dry_run"]:
        lines += ["A rehearsal: toy sizes on a CPU, GPU tests skipped; the figures mean "
                  "nothing.", ""]
    lines += render_preflight(pre) + [""]
    for name, part in parts.items():
        title, _, render = PARTS[name]
        lines += [f"### {title}", ""]
        lines += [f"`{c['command']}`: {status_text(c)}" for c in part["commands"]] or \
            [part["status"]]
        lines.append("")
        try:
            lines += render(part["results"], report) if part.get("results") else \
                ["No results (see the log)."]
        except Exception as e:  # noqa: BLE001 - a malformed result must not lose the rest
            lines.append(f"Results not rendered ({type(e).__name__}: {e}); see the JSON.")
        lines.append("")
    rows = [[name, c["name"], status_text(c), f"`{c['command']}`"]
            for name, part in parts.items() for c in part["commands"]]
    lines += ["### Commands", ""] + table("part|command|status|command line", rows)
    return "\n".join(lines + [""])


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


def render_tests(results: dict[str, Any], report: dict[str, Any]) -> list[str]:
    if not results["tests"]:
        return ["No test results (see the log)."]
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(results["counts"].items()))
    lines = [f"{counts}{'; pytest: ' + results['summary'] if results['summary'] else ''}.", ""]
    rows = [[f"`{t['id']}`", t["outcome"], t["seconds"], t["message"][:160]]
            for t in results["tests"]]
    return lines + table("test|outcome|s:.1f|message", rows)


def render_loss(results: dict[str, Any], report: dict[str, Any]) -> list[str]:
    part1, part2 = results["part1"], results["part2"]
    errors = ", ".join(f"{k} {v:.1e}" for k, v in part1["oracle_relative_error"].items())
    lines = [f"Part 1: four sigmoid DPO implementations from logits "
             f"{'x'.join(map(str, part1['shape']))} float32 (largest relative error against a "
             f"float64 oracle: {errors}). Part 2: hidden states to loss, forward and backward, "
             f"{part2['dtype']}.", ""]
    keys = ("part", "variant", "size", "median_ms", "peak_extra_mib", "loss")
    lines += table("part|variant|size|median ms:.1f|peak extra MiB:.1f|loss:.6f",
                   [[r[k] for k in keys] for r in results["rows"]])
    return lines + [""] + [
        f"- N={c['tokens']} V={c['vocab']} D={c['dim']}: kernel / materialized time "
        f"{fmt(c['time_ratio'], '.2f')}x, peak memory {fmt(c['memory_ratio'], '.3f')}; loss gap "
        f"{fmt(c['loss_gap'], '.1e')}" for c in part2["comparisons"]]


def render_throughput_hh(results: dict[str, Any], report: dict[str, Any]) -> list[str]:
    data, model = results["data"], results["model"]
    lines = [f"{model['name']} ({model['num_params'] / 1e6:.0f}M parameters, random init); "
             f"{data['source']}: {data['num_pairs']} pairs, packing length "
             f"{data['packing_length']}, {data['tokens_per_micro_batch']} tokens per "
             f"micro-batch, token-ratio ceiling {data['token_ratio_ceiling']:.3f}.", ""]
    keys = ("steps", "pairs", "pairs_per_s", "tokens_per_s", "mfu", "peak_memory_gib",
            "padding_fraction", "data_wait_s", "graphs_compiled_after_warmup",
            "speedup_vs_paired", "speedup_vs_paired+packed")
    lines += table("layout|steps:d|pairs:d|pairs/s:.4g|tokens/s:.0f|MFU:.1%|peak GiB:.2f|"
                   "padding:.1%|data wait s:.3f|recompiled:d|x paired:.2f|x paired+packed:.2f",
                   [[name, *(r.get(k) for k in keys)] for name, r in results["layouts"].items()])
    return lines + [f"\n{layout}: FAILED: {message}"
                    for layout, message in results.get("failures", {}).items()]


def render_profiles(results: dict[str, Any], report: dict[str, Any]) -> list[str]:
    lines = [f"Each profile: about {report['suite']['plan']['profile_paired_tokens']:,} tokens "
             "in the paired layout; pairs/s of shared+packed over paired+packed beside the "
             "token-ratio ceiling and the paper's packed speed-up (Wang & Hegde 2024).", ""]
    rows = []
    for name, dataset in results["datasets"].items():
        row = results.get("summary", {}).get(name, {})
        ratio, ceiling = row.get("shared_packed_vs_paired_packed"), row.get("token_ratio_ceiling")
        packed = [dataset["layouts"].get(k, {}) for k in ("paired+packed", "shared+packed")]
        rows.append([name, dataset["data"]["num_pairs"], ceiling, ratio,
                     ratio / ceiling if ratio and ceiling else None, row.get("paper_packed"),
                     *(p.get("pairs_per_s") for p in packed), *(p.get("mfu") for p in packed),
                     max((p.get("peak_memory_gib") or 0 for p in packed), default=None)])
    return lines + table(
        "profile|pairs|token ratio:.2f|s+pk / p+pk:.2f|of ceiling:.0%|paper (packed):.2f|"
        "pairs/s p+pk:.4g|pairs/s s+pk:.4g|MFU p+pk:.1%|MFU s+pk:.1%|peak GiB:.1f", rows) + [
        f"\n{name} {layout}: FAILED: {message}" for name, dataset in results["datasets"].items()
        for layout, message in dataset.get("failures", {}).items()]


def render_knobs(results: dict[str, Any], report: dict[str, Any]) -> list[str]:
    base = results.get("baseline") or {}
    keys = ("pairs_per_s", "tokens_per_s", "mfu", "peak_memory_gib")
    rows = [["baseline", "default", *(base.get(k) for k in keys), 1.0, "ok" if base else None]]
    rows += [[r["knob"], r["setting"], *(r.get(k) for k in keys), r.get("vs_baseline"),
              r["status"] + (f": {r['note']}" if r["note"] else "")] for r in results["runs"]]
    return [f"shared+packed on the HH-RLHF pairs; the baseline ({results['baseline_source']})"
            " runs the defaults: no activation checkpointing, block size 128, the Triton "
            "FlexAttention backend, compile mode default.", ""] + table(
        "knob|setting|pairs/s:.4g|tokens/s:.0f|MFU:.1%|peak GiB:.2f|x baseline:.2f|status", rows)


PARTS = {  # name: (title, run, render), in run order, the most important first
    "tests": ("GPU tests", part_tests, render_tests),
    "throughput-hh": ("Throughput: HH-RLHF pairs", part_throughput_hh, render_throughput_hh),
    "throughput-profiles": ("Throughput: synthetic profiles", part_throughput_profiles,
                            render_profiles),
    "loss": ("Loss and log-prob kernel", part_loss, render_loss),
    "knobs": ("Speed knobs", part_knobs, render_knobs),
}


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


def run_preflight(s: Suite, parts: list[str], budget: float) -> dict[str, Any]:
    """The preflight in a process of its own, then the knobs it keeps and the plan's lines."""
    path = s.out / "json" / "preflight.json"
    record = s.runner.run("preflight", [sys.executable, str(Path(__file__).resolve()),
                                        "--preflight", str(path)], 60, minimum=1)
    preflight = read_json(path) or {}
    s.report["preflight"] = {**preflight, "command": record}
    s.knobs = kept_knobs(preflight, s.plan, parts, budget)
    s.report["suite"]["plan_lines"] = plan_lines(s.plan, parts, len(s.knobs), budget)
    s.runner.say("preflight: " + ", ".join(f"{k} {v}" for k, v in preflight.items()
                                            if not k.endswith("_reason")))
    print("\n".join(s.report["suite"]["plan_lines"]), flush=True)
    s.write()
    return preflight


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
    command = display([sys.executable, "benchmarks/gpu_suite.py",
                       *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {
        "environment": {**environment(), **({"commit": args.commit} if args.commit else {})},
        "suite": {"command": command, "dry_run": args.dry_run, "budget": budget,
                  "parts": args.parts, "plan": dataclasses.asdict(plan)},
        "parts": {}}
    s = Suite(plan, out, Runner(out, time.monotonic() + budget, env, args.out), report)
    s.runner.say(f"GPU suite{' (dry run on the CPU)' if args.dry_run else ''}: commit "
                 f"{report['environment']['commit']}, budget {budget:.0f} s; writing {out}")
    preflight = run_preflight(s, args.parts, budget)
    if args.plan:
        return 0
    if preflight.get("prefixdpo_error"):
        raise SystemExit(preflight["prefixdpo_error"])
    if not args.dry_run and not preflight.get("cuda_available"):
        raise SystemExit("no CUDA device: run on a GPU machine, or rehearse with --dry-run")
    s.models = {"hh": plan.model, "profiles": plan.profile_model}
    if args.dry_run:
        for key, config in (("hh", DRY_RUN_MODEL), ("profiles", DRY_RUN_PROFILE_MODEL)):
            s.models[key] = str(out / f"dry-run-model-{key}.json")
            Path(s.models[key]).write_text(json.dumps(config, indent=2) + "\n")
    for name in args.parts:
        title, run, _ = PARTS[name]
        s.runner.say(f"== {title}")
        try:
            report["parts"][name] = run(s)
        except Exception as e:  # noqa: BLE001 - recorded; the next part still runs
            report["parts"][name] = {"status": f"suite error: {type(e).__name__}: {e}",
                                     "commands": [], "results": None}
            s.runner.say(f"{name}: suite error: {type(e).__name__}: {e}")
        s.write()
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    s.runner.say("done: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    print(f"\nwrote {out / 'gpu-suite.md'}, {out / 'gpu-suite.json'} and {out / 'logs'}\n")
    print((out / "gpu-suite.md").read_text())
    return 0 if all(status == "ok" for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

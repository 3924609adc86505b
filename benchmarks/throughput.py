"""Throughput of full DPO training steps in the four layouts, measured in one run.

    python benchmarks/throughput.py [--quick] [--model tiny|llama-3.2-1b|llama-3.1-8b|
        mistral-7b|CONFIG.json] [--dataset hh-rlhf|capybara|...[,...]|all
        | --data FILE... --tokenizer DIR] [--layouts paired,paired+packed,shared,shared+packed]
        [--pairs N] [--paired-tokens N] [--tokens-per-micro-batch T] [--packing-length auto|L]
        [--reference precomputed|live] [--activation-checkpointing]
        [--compile-mode default|max-autotune-no-cudagraphs] [--block-size B]
        [--json OUT] [--profile]

What is timed: for each layout, one pass over the same examples, each step a full
`train.loop.train_step` (policy forward + backward, the reference, gradient clipping, AdamW
update), with the loader's background prefetching exactly as in training. Before the pass, a
few warm-up steps (compilation, allocator) from the start of the same plan are run and not
timed (compiled unpacked layouts: also one micro-batch of each extreme shape, see
`warmup_steps`).
Each layout starts from a freshly built model (same seed), a fresh optimizer and an
empty compile cache, so the order of layouts does not matter. On CUDA the model is set up as
the trainer does it: `train.parallelize` with bfloat16 mixed precision and compiled decoder
layers (FSDP2 over a group of one rank), FlexAttention with one BlockMask per micro-batch; on
CPU in float32 with the dense mask, uncompiled.

Like with like: every layout processes the same examples, each exactly once (the pairs and
non-padding tokens of every layout are checked against the examples). They are first fitted
ONCE to the packing length in the paired layout (the stricter one: the prompt counts twice),
so no layout cuts anything another does not. Batching rule, one token budget T per micro-batch
(padding included):
- packed layouts: rows of `packing_length` L, `T // L` rows per micro-batch, packed by the
  loader (best-fit decreasing); the SAME L and row count for paired+packed and shared+packed,
  so their shapes and compiled graphs are identical and the shared layout simply needs fewer
  micro-batches;
- unpacked layouts: in the loader's shuffled order, a micro-batch takes whole examples (paired:
  two rows each, shared: one) while rows x (longest row rounded up to the trainer's row
  multiple: 128 on CUDA, 8 on CPU) <= T; an example bigger than T alone gets its own.
`--packing-length auto` is the trainer's auto rule applied to the paired lengths (1.1 x the
95th percentile rounded up to 128, never below the longest), so by default nothing is cut.
One optimizer step takes `--grad-accum` micro-batches (default 1).

Data: real preference files with a tokenizer (`--data ... --tokenizer ...`), or a synthetic
profile with the median total length (prompt + chosen, in tokens) and the prompt/completion
length ratio of one of the six datasets of Wang & Hegde (2024), Table 1. Synthetic lengths:
prompt, chosen and rejected lengths are drawn independently from lognormals with sigma
`--spread` (default 0.5) and medians m * r / (1 + r) and m / (1 + r), all scaled so that the
sample median of prompt + chosen is exactly m, then clipped to [1, 4 x their median]; token ids
are uniform. The measured medians are printed beside the targets. `--dataset` takes several
profiles (comma-separated, or `all`): each is measured in turn exactly as if run alone, then a
summary table gives each profile's ratios beside its token-ratio ceiling and the paper's
speed-ups; `--json` then holds `{"environment", "args", "datasets": {profile: report},
"summary"}` and is rewritten after each profile, so an interrupted run keeps what it measured.
`--paired-tokens N` draws, per profile, as many pairs as hold about N tokens in the paired
layout (the first pairs of a larger draw), so short and long profiles take similar time.

Speed knobs, each compared by running the same command with and without it:
- `--activation-checkpointing`: recompute each decoder layer in backward (as the 1B recipe does);
- `--compile-mode max-autotune-no-cudagraphs`: the inductor options of that `torch.compile`
  mode (`torch._inductor.list_mode_options`), applied while a layout is measured to everything
  compiled in its steps: decoder layers, FlexAttention, the BlockMask and the log-prob kernel;
- `--block-size B`: FlexAttention's block size (a power of two from 16 to 128), passed to the
  training step as `flex_block_size` (default 128).

Reported per layout: pairs/s, non-padding tokens/s, padding fraction, MFU (CUDA: useful FLOPs
from `train.metrics.forward_flops`, x3 for forward + backward, +1 forward for a live reference,
over time and the GPU's bf16 peak), peak memory (CUDA: max allocated since the layout's start;
CPU: the process's peak RSS, never reset), time blocked waiting for the loader, graphs compiled
after warm-up (torch._dynamo counters: 0 means no recompilation), and the ratio of pairs/s to
`paired` and to `paired+packed`. Also the token-ratio ceiling of the data: tokens of the paired
layouts / tokens of the shared ones. Absolute figures mean something only on a GPU; the ratios
are what to compare. On CPU the default attention executor is `documents` (per span: its
cost is the pairs the mask allows); `--attention dense` shows the whole-row `L x L` mask
instead, which makes packed rows pay for every masked-out pair. A tiny model's time goes mostly
to its vocabulary head, whose work (one row per completion token) is the same in every layout. `--profile` prints a torch.profiler table of one extra (untimed) step per
layout.

The script is longer than the project's usual ~500 lines because it is one runnable file: the
synthetic profiles, the like-for-like batching, the timing loop and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.example import Example, Group
from prefixdpo.data.layout import Numbering, is_packed, is_shared
from prefixdpo.data.loader import (PreferenceLoader, StepBatches, example_length,
                         fit_examples)
from prefixdpo.data.packing import auto_packing_length
from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.masks import FLEX_BLOCK_SIZE
from prefixdpo.model.executor import choose_executor
from prefixdpo.model.transformer import build_model
from prefixdpo.train.config import OptimSection
from prefixdpo.train.distributed import Distributed, setup
from prefixdpo.train.loop import train_step
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.metrics import forward_flops, peak_flops, peak_memory_gib
from prefixdpo.train.optim import build_optimizer
from prefixdpo.train.parallelize import freeze, parallelize
from prefixdpo.train.reference import LiveReference, TableReference

LAYOUTS = ("paired", "paired+packed", "shared", "shared+packed")

# Median prompt+chosen length in tokens and prompt/completion length ratio (Wang & Hegde 2024,
# "Accelerating Direct Preference Optimization with Prefix Sharing", Table 1).
PROFILES = {
    "capybara": (1160, 1.59),
    "hh-rlhf": (186, 2.15),
    "metamath-dpo": (872, 3.91),
    "tldr": (416, 11.14),
    "tulu-helpsteer": (775, 6.34),
    "ultrafeedback": (409, 0.42),
}

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, initializer_range=0.02)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
# Architecture fields of the real models (their config.json), so no file is needed.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized; takes the tokenizer's vocabulary when real data is given.
    "tiny": dict(_LLAMA, vocab_size=4096, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         max_position_embeddings=131072),
    "llama-3.1-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                         max_position_embeddings=131072),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                       hidden_act="silu", rms_norm_eps=1e-5, initializer_range=0.02,
                       vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rope_theta=10000.0, sliding_window=4096,
                       tie_word_embeddings=False, max_position_embeddings=32768),
}

# Speed-ups of prefix sharing over unshared FlexAttention reported by Wang & Hegde (2024),
# without and with packing, for comparison in the summary of several profiles.
PAPER_SPEEDUPS = {
    "capybara": (1.54, 1.36),
    "hh-rlhf": (1.19, 1.48),
    "metamath-dpo": (1.47, 1.60),
    "tldr": (1.20, 1.38),
    "tulu-helpsteer": (1.56, 1.52),
    "ultrafeedback": (1.18, 1.21),
}

QUICK = dict(model="tiny", dataset="hh-rlhf", pairs=32, tokens_per_micro_batch=2048,
             warmup_steps=1, device="cpu")

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# ---- model and data -----------------------------------------------------------------------


def model_config(name: str, num_layers: int | None, tokenizer_vocab: int | None) -> ModelConfig:
    if name in PRESETS:
        fields = dict(PRESETS[name])
        if name == "tiny" and tokenizer_vocab:
            fields["vocab_size"] = tokenizer_vocab
        config = ModelConfig.from_hf_dict(fields, source=f"preset {name}")
    elif Path(name).exists():
        config = ModelConfig.from_file(name)
    else:
        raise ValueError(f"--model {name!r}: neither a preset ({', '.join(PRESETS)}) nor a "
                         "config.json file or folder")
    if num_layers:
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    return config


def synthetic_examples(profile: str, num_pairs: int, vocab_size: int, spread: float,
                       seed: int) -> list[Example]:
    """Random-token pairs with the profile's length statistics (see the module docstring)."""
    median, ratio = PROFILES[profile]
    rng = np.random.default_rng(seed)
    prompt_median, completion_median = median * ratio / (1 + ratio), median / (1 + ratio)
    prompts = rng.lognormal(math.log(prompt_median), spread, num_pairs)
    chosen = rng.lognormal(math.log(completion_median), spread, num_pairs)
    rejected = rng.lognormal(math.log(completion_median), spread, num_pairs)
    scale = median / np.median(prompts + chosen)

    def lengths(values: np.ndarray, typical: float) -> np.ndarray:
        return np.clip(np.rint(values * scale), 1, max(1, round(4 * typical))).astype(int)

    prompts = lengths(prompts, prompt_median)
    chosen = lengths(chosen, completion_median)
    rejected = lengths(rejected, completion_median)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(3, vocab_size, n, dtype=np.int32)  # 0-2: special ids, unused

    return [Example(i, (Group(tokens(p), (tokens(c), tokens(r))),), ((0, 1),))
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))]


def synthetic_examples_for_tokens(profile: str, paired_tokens: int, vocab_size: int,
                                  spread: float, seed: int) -> list[Example]:
    """The first pairs of a draw of the profile that together hold about `paired_tokens`
    tokens in the paired layout (at least one pair). The draw is twice the pairs the profile's
    medians suggest (its lengths are scaled to the draw's median, so it is drawn whole, then
    cut), doubled again while it falls short."""
    median, ratio = PROFILES[profile]
    typical = median * (2 * ratio + 2) / (1 + ratio)  # prompt twice, two completions
    num_pairs = max(16, math.ceil(2 * paired_tokens / typical))
    while True:
        examples = synthetic_examples(profile, num_pairs, vocab_size, spread, seed)
        total = np.cumsum([e.num_paired_tokens for e in examples])
        if total[-1] >= paired_tokens:
            return examples[:int(np.searchsorted(total, paired_tokens)) + 1]
        num_pairs *= 2


def real_examples(files: Sequence[str], tokenizer: Tokenizer, fmt: str,
                  max_examples: int = 0) -> list[Example]:
    """The examples of every file (at most `max_examples` of each; 0 = all)."""
    logging.getLogger("prefixdpo.data.dataset").setLevel(logging.ERROR)  # skipped rows: counted here
    examples: list[Example] = []
    for file in files:
        config = DataConfig(path=file, format=fmt, bad_rows="skip", max_examples=max_examples)
        data = load_preference_data(config, tokenizer, progress=False)
        print(f"{file}: {len(data.examples)} examples, {data.num_skipped} bad rows skipped")
        examples.extend(data.examples)
    return examples


def data_statistics(examples: Sequence[Example]) -> dict[str, float]:
    """Medians of the first group of every example (prompt, chosen, prompt + chosen)."""
    prompts = np.array([len(e.groups[0].prompt) for e in examples])
    chosen = np.array([len(e.groups[0].completions[0]) for e in examples])
    paired = sum(e.num_paired_tokens for e in examples)
    shared = sum(e.num_shared_tokens for e in examples)
    return {"median_prompt_plus_chosen": float(np.median(prompts + chosen)),
            "median_prompt": float(np.median(prompts)),
            "median_chosen": float(np.median(chosen)),
            "prompt_completion_ratio": float(np.median(prompts) / np.median(chosen)),
            "paired_tokens": paired, "shared_tokens": shared,
            "token_ratio_ceiling": paired / shared}


# ---- one layout ---------------------------------------------------------------------------


def compile_mode_options(mode: str) -> contextlib.AbstractContextManager:
    """The inductor options of a `torch.compile` mode, in force inside the context."""
    import torch._inductor
    import torch._inductor.config

    return torch._inductor.config.patch(torch._inductor.list_mode_options(mode))


def compile_counts() -> dict[str, int]:
    """Graphs dynamo has compiled and graph breaks so far in this process (never reset)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_layout(layout: str, examples: list[Example], config: ModelConfig,
                   args: argparse.Namespace, env: Distributed, packing_length: int) -> dict:
    device = env.device
    cuda = device.type == "cuda"
    executor = choose_executor(args.attention, device, flex_backend=args.flex_backend,
                               block_size=args.block_size or FLEX_BLOCK_SIZE)
    if cuda:  # free the previous layout's memory before measuring this one's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()  # every layout compiles from scratch (in its warm-up)

    model = parallelize(build_model(config, device, seed=args.seed), env.mesh,
                        mixed_precision=cuda,
                        activation_checkpointing=args.activation_checkpointing,
                        compile=args.compile)
    num_sequences = Numbering(examples).num_sequences
    if args.reference == "live":
        frozen = build_model(config, device, torch.bfloat16 if cuda else torch.float32,
                             seed=args.seed)
        reference = LiveReference(parallelize(freeze(frozen), env.mesh, mixed_precision=False,
                                              compile=args.compile))
    else:  # a precomputed table: its values do not change the cost, so no scoring pass
        generator = torch.Generator().manual_seed(args.seed)
        reference = TableReference(
            (-100.0 * torch.rand(num_sequences, generator=generator) - 1.0).to(device))
    optimizer = build_optimizer(model, OptimSection(lr=args.lr), device)

    def step(batches: StepBatches):
        result, _ = train_step(model, batches, reference=reference, loss_config=LossConfig(),
                               loss_state=LossState(), optimizer=optimizer, max_grad_norm=1.0,
                               env=env, executor=executor)
        return result

    def loader(prefetch: int) -> PreferenceLoader:
        return PreferenceLoader.with_token_budget(
            examples, layout, args.tokens_per_micro_batch, packing_length=packing_length,
            pad_multiple=executor.row_multiple, grad_accum=args.grad_accum, seed=args.seed,
            prefetch=prefetch, pin_memory=cuda)

    timed_loader = loader(prefetch=2)
    num_steps = timed_loader.steps_in_epoch(0)
    for batches in warmup_steps(loader(prefetch=0), args.warmup_steps, args.compile):
        step(batches)
    synchronize(device)
    compiled_before = compile_counts()

    pairs = tokens = row_tokens = micro_batches = 0
    flops = 0.0
    data_wait = max_wait = 0.0
    losses = []
    flops_factor = 3 + (args.reference == "live")
    batches_iter = iter(timed_loader)
    next_batches = next(batches_iter)  # the first build is not a wait a running loop would see
    synchronize(device)
    start = time.perf_counter()
    for index in range(num_steps):
        if index:
            before = time.perf_counter()
            next_batches = next(batches_iter)
            waited = time.perf_counter() - before
            data_wait, max_wait = data_wait + waited, max(max_wait, waited)
        batches = next_batches
        result = step(batches)
        losses.append(result.loss)
        pairs += result.num_pairs
        tokens += result.num_tokens
        micro_batches += len(batches)
        row_tokens += sum(b.input_ids.numel() for b in batches)
        flops += flops_factor * sum(forward_flops(b, config) for b in batches)
    synchronize(device)
    seconds = time.perf_counter() - start
    batches_iter.close()
    compiled_after = compile_counts()

    expected_tokens = sum(e.num_shared_tokens if is_shared(layout) else e.num_paired_tokens
                          for e in examples)
    expected_pairs = Numbering(examples).num_pairs
    if pairs != expected_pairs or tokens != expected_tokens:
        raise RuntimeError(f"{layout}: processed {pairs} pairs and {tokens} tokens, expected "
                           f"{expected_pairs} and {expected_tokens}")
    peak = peak_flops(device)
    result = {
        "layout": layout,
        "steps": num_steps,
        "micro_batches": micro_batches,
        "rows_per_micro_batch": timed_loader.micro_batch_size if is_packed(layout) else None,
        "pairs": pairs,
        "tokens": tokens,
        "row_tokens": row_tokens,
        "padding_fraction": 1.0 - tokens / row_tokens,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / peak if peak else None,
        "flops": flops,
        "peak_memory_gib": peak_memory_gib(device),
        "data_wait_s": data_wait,
        "max_data_wait_s": max_wait,
        "graphs_compiled_in_warmup_and_before": compiled_before["graphs"],
        "graphs_compiled_after_warmup": compiled_after["graphs"] - compiled_before["graphs"],
        "graph_breaks_after_warmup":
            compiled_after["graph_breaks"] - compiled_before["graph_breaks"],
        "mean_loss": float(np.mean(losses)),
    }
    if args.profile:
        result["profile"] = profile_step(step, next(iter(loader(prefetch=0))), device)
        print(f"\n--- profile of one {layout} step ---\n{result['profile']}")
    del model, reference, optimizer
    return result


def warmup_steps(loader: PreferenceLoader, count: int, extremes: bool) -> list[StepBatches]:
    """The first `count` steps of the plan; with `extremes` (compiled runs) in unpacked
    layouts, whose shapes vary, also one micro-batch of each extreme shape (fewest and most
    rows, shortest and longest rows), so that the compiler's switch to dynamic shapes (and its
    specialization of size 1) happens here rather than in the timed pass. Built without a
    background thread."""
    steps = [loader.step_batches(0, s) for s in range(min(count, loader.steps_in_epoch(0)))]
    if count and extremes and not is_packed(loader.layout):
        plan = loader.micro_batch_plan(0)
        shapes = {i: (len(rows), max(loader.longest_document[r[0]] for r in rows))
                  for i, rows in enumerate(plan)}
        seen = {tuple(b.input_ids.shape) for batches in steps for b in batches}
        for pick in (min, max):
            for axis in (0, 1):
                i = pick(shapes, key=lambda k: shapes[k][axis])
                batch = loader.build(plan[i])
                if tuple(batch.input_ids.shape) not in seen:
                    seen.add(tuple(batch.input_ids.shape))
                    steps.append(StepBatches.single_process([batch]))
    return steps


def profile_step(step, batches: StepBatches, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step(batches)
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


# ---- report -------------------------------------------------------------------------------


def add_ratios(results: dict[str, dict]) -> None:
    for base in ("paired", "paired+packed"):
        if base in results:
            for r in results.values():
                r[f"speedup_vs_{base}"] = r["pairs_per_s"] / results[base]["pairs_per_s"]


def format_table(results: dict[str, dict], cuda: bool) -> str:
    columns = [("layout", "{:<14}", "layout"), ("steps", "{:>6}", "steps"),
               ("micro", "{:>6}", "micro_batches"), ("pairs", "{:>6}", "pairs"),
               ("tokens", "{:>9}", "tokens"), ("pad", "{:>6.1%}", "padding_fraction"),
               ("pairs/s", "{:>9.4g}", "pairs_per_s"), ("tokens/s", "{:>9.0f}", "tokens_per_s"),
               ("MFU", "{:>6.1%}", "mfu"),
               ("peak GiB" if cuda else "RSS GiB", "{:>8.2f}", "peak_memory_gib"),
               ("wait s", "{:>7.3f}", "data_wait_s"),
               ("recomp", "{:>6}", "graphs_compiled_after_warmup"),
               ("x paired", "{:>8.2f}", "speedup_vs_paired"),
               ("x p+packed", "{:>10.2f}", "speedup_vs_paired+packed")]
    widths = [len(fmt.format(*([""] if "<" in fmt else [0]))) for _, fmt, _ in columns]
    header = " ".join(f"{name:>{w}}" if i else f"{name:<{w}}"
                      for i, ((name, _, _), w) in enumerate(zip(columns, widths)))
    lines = [header]
    for r in results.values():
        cells = []
        for (_, fmt, key), w in zip(columns, widths):
            value = r.get(key)
            cells.append(f"{'-':>{w}}" if value is None else fmt.format(value))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain")),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads()}


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"CPU smoke run: defaults {QUICK} (explicit flags still win)")
    p.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a config.json; "
                   "default tiny on CPU, llama-3.2-1b on CUDA")
    p.add_argument("--num-layers", type=int, help="override the number of decoder layers "
                   "(e.g. an 8B shape with fewer layers on one GPU)")
    p.add_argument("--dataset", help=f"synthetic length profile: {', '.join(sorted(PROFILES))}; "
                   "several comma-separated, or 'all', run in turn (default hh-rlhf); ignored "
                   "with --data")
    p.add_argument("--data", nargs="+", help="real preference files (needs --tokenizer)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json, for --data")
    p.add_argument("--format", default="auto", help="data format of --data files")
    p.add_argument("--pairs", type=int, help="use the first N examples (default: all of "
                   "--data; synthetic: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--paired-tokens", type=int, help="synthetic: as many pairs as hold about "
                   "this many tokens in the paired layout (--pairs still caps them)")
    p.add_argument("--spread", type=float, default=0.5, help="lognormal sigma of synthetic "
                   "lengths")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    p.add_argument("--tokens-per-micro-batch", type=int,
                   help="token budget of a micro-batch, padding included (default 16384 on "
                   "CUDA, 4096 on CPU; at least the packing length)")
    p.add_argument("--packing-length", default="auto", help="'auto' or a multiple of 128")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--reference", choices=("precomputed", "live"), default="precomputed")
    p.add_argument("--warmup-steps", type=int, help="untimed steps per layout (default 3 on "
                   "CUDA, 1 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="CUDA: do not compile the decoder layers")
    p.add_argument("--attention", choices=("auto", "flex", "documents", "dense"), default="auto",
                   help="attention executor (default: flex on CUDA, documents on CPU)")
    p.add_argument("--flex-backend", choices=("triton", "flash"), default="triton",
                   help="FlexAttention kernels (CUDA): triton, or flash (FlashAttention-4)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in backward")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="inductor options of this torch.compile mode for everything compiled "
                   "in the step (see the module docstring)")
    p.add_argument("--block-size", type=int, help="FlexAttention block size, a power of two "
                   "from 16 to 128 (default: the trainer's, 128)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one extra step per layout")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.device = args.device or "auto"
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    for layout in args.layouts:
        if layout not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {layout!r}; expected {LAYOUTS}")
    args.datasets = parse_datasets(args.dataset or "hh-rlhf")
    if args.data and not args.tokenizer:
        raise SystemExit("--data needs --tokenizer (a folder with tokenizer.json)")
    if args.block_size is not None:
        size = args.block_size
        if not (16 <= size <= 128 and size & (size - 1) == 0):
            raise SystemExit(f"--block-size {size}: expected a power of two from 16 to 128 "
                             "(rows are padded to multiples of 128)")
    return args


def parse_datasets(text: str) -> list[str]:
    names = sorted(PROFILES) if text == "all" else \
        [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if unknown or not names:
        raise SystemExit(f"--dataset: unknown profile(s) {unknown or text!r}; expected "
                         f"{', '.join(sorted(PROFILES))} or 'all'")
    return list(dict.fromkeys(names))


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> None:
    args.model = args.model or ("llama-3.2-1b" if cuda else "tiny")
    args.dataset = ",".join(args.datasets)
    if args.warmup_steps is None:
        args.warmup_steps = 3 if cuda else 1
    args.compile = cuda if args.compile is None else (args.compile and cuda)
    if args.pairs is None and not args.data and not args.paired_tokens:
        args.pairs = 2048 if cuda else 256


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    owns_group = not dist.is_initialized()
    env = setup(args.device)
    cuda = env.device.type == "cuda"
    resolve_defaults(args, cuda)
    try:
        return run(args, env)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace, env: Distributed) -> dict[str, Any]:
    """Every dataset in turn; the report (see the module docstring for its form with several
    synthetic profiles). Exits with an error after writing it when a layout failed."""
    cuda = env.device.type == "cuda"
    print(f"device: {env.device} ({environment(env.device)['device']}), torch {torch.__version__}"
          f"{', compiled, bf16 mixed precision' if args.compile else ''}")
    compiles_anything = cuda  # FlexAttention, the BlockMask and the kernel compile on CUDA
    print(f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, "
          f"compile mode {args.compile_mode}"
          f"{'' if compiles_anything else ' (no effect: nothing is compiled on CPU)'}, "
          f"FlexAttention block size {args.block_size or 'default (128)'}"
          f"{'' if cuda else ' (no effect: FlexAttention runs on CUDA only)'}, "
          f"attention executor {args.attention}")
    names: list[str | None] = [None] if args.data else args.datasets
    several = len(names) > 1
    reports: dict[str, dict[str, Any]] = {}

    def combined() -> dict[str, Any]:
        head = {"environment": environment(env.device), "args": dict(vars(args)),
                "supported": {"compile_modes": list(COMPILE_MODES)}}
        if not several:
            return {**head, **next(iter(reports.values()))}
        return {**head, "datasets": reports, "summary": summarize(reports)}

    for name in names:
        if several:
            print(f"\n=== {name} ===", flush=True)
        reports[name or "data"] = measure_dataset(args, env, name)
        if several and args.json:
            write_json(args.json, combined())
    report = combined()
    if several:
        print("\nSummary: pairs/s ratios beside the token-ratio ceiling, the useful-FLOPs "
              "ratio (paired / shared) and the paper's speed-ups (shared / unshared "
              "FlexAttention, unpacked / packed)")
        print(format_summary(report["summary"]))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    failed = {f"{name} {layout}" if several else layout
              for name, r in reports.items() for layout in r["failures"]}
    if failed:
        raise SystemExit(f"{len(failed)} layout(s) failed: {', '.join(sorted(failed))}")
    return report


def write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def measure_dataset(args: argparse.Namespace, env: Distributed, profile: str | None
                    ) -> dict[str, Any]:
    """Every layout on one dataset: `--data` files (profile None) or a synthetic profile."""
    cuda = env.device.type == "cuda"
    if profile is None:
        tokenizer = load_tokenizer(args.tokenizer)
        config = model_config(args.model, args.num_layers, tokenizer.vocab_size)
        examples = real_examples(args.data, tokenizer, args.format, args.pairs or 0)
        data_name = ", ".join(args.data)
    else:
        config = model_config(args.model, args.num_layers, None)
        if args.paired_tokens:
            examples = synthetic_examples_for_tokens(profile, args.paired_tokens,
                                                     config.vocab_size, args.spread, args.seed)
        else:
            examples = synthetic_examples(profile, args.pairs, config.vocab_size, args.spread,
                                          args.seed)
        data_name = f"synthetic {profile} (median {PROFILES[profile][0]}, ratio " \
                    f"{PROFILES[profile][1]}, sigma {args.spread})"
    if args.pairs:
        examples = examples[:args.pairs]
    largest_id = max(int(max(g.prompt.max(), *(c.max() for c in g.completions)))
                     for e in examples for g in e.groups)
    if largest_id >= config.vocab_size:
        raise SystemExit(f"token id {largest_id} >= the model's vocab_size {config.vocab_size}:"
                         " use a model whose vocabulary covers the tokenizer")

    # One packing length for both packed layouts, fitted in the paired layout (see docstring).
    packing_length = auto_packing_length([example_length(e, "paired+packed") for e in examples]) \
        if args.packing_length == "auto" else int(args.packing_length)
    examples, fit = fit_examples(examples, "paired+packed", packing_length, "truncate")
    budget = args.tokens_per_micro_batch or max(16384 if cuda else 4096, packing_length)
    if budget < packing_length:
        raise SystemExit(f"--tokens-per-micro-batch {budget} is below the packing length "
                         f"{packing_length}: a packed micro-batch needs at least one row")
    # This dataset's settings: the budget may follow its packing length.
    args = argparse.Namespace(**{**vars(args), "tokens_per_micro_batch": budget})
    stats = data_statistics(examples)

    print(f"model: {args.model}, {config.num_hidden_layers} layers, "
          f"{config.num_params / 1e6:.1f}M parameters, random init")
    print(f"data: {data_name}: {len(examples)} pairs, median prompt+chosen "
          f"{stats['median_prompt_plus_chosen']:.0f} tokens, prompt/completion ratio "
          f"{stats['prompt_completion_ratio']:.2f}")
    print(f"packing length {packing_length} ({fit.num_truncated} examples cut to fit), "
          f"{budget} tokens per micro-batch ({budget // packing_length} packed rows), "
          f"grad_accum {args.grad_accum}, reference {args.reference}, "
          f"{args.warmup_steps} warm-up step(s)")
    print(f"token-ratio ceiling (paired / shared tokens): {stats['token_ratio_ceiling']:.3f}")

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for layout in args.layouts:
        try:
            with compile_mode_options(args.compile_mode):
                results[layout] = measure_layout(layout, examples, config, args, env,
                                                 packing_length)
        except Exception as e:  # noqa: BLE001 - reported, the other layouts still run
            traceback.print_exc()
            failures[layout] = f"{type(e).__name__}: {e}"
            print(f"  {layout}: FAILED ({failures[layout]})", flush=True)
            continue
        r = results[layout]
        print(f"  {layout}: {r['seconds']:.2f} s, {r['pairs_per_s']:.4g} pairs/s", flush=True)
    add_ratios(results)
    print()
    print(format_table(results, cuda))
    for layout, message in failures.items():
        print(f"{layout}: FAILED: {message}")
    recompiled = [k for k, r in results.items() if r["graphs_compiled_after_warmup"]]
    if args.compile:
        print("recompilation after warm-up: " + (", ".join(
            f"{k} ({results[k]['graphs_compiled_after_warmup']} graphs)" for k in recompiled)
            if recompiled else "none"))

    return {"model": {"name": args.model, "num_params": config.num_params,
                      "num_hidden_layers": config.num_hidden_layers},
            "data": {"source": data_name, "profile": profile, "num_pairs": len(examples),
                     "packing_length": packing_length, "num_truncated": fit.num_truncated,
                     "packing_efficiency_paired": fit.efficiency,
                     "tokens_per_micro_batch": budget, **stats},
            "layouts": results, "failures": failures}


# ---- several profiles ---------------------------------------------------------------------


SUMMARY_RATIOS = {  # name: (numerator layout, denominator layout)
    "shared_vs_paired": ("shared", "paired"),
    "shared_packed_vs_paired_packed": ("shared+packed", "paired+packed"),
    "shared_packed_vs_paired": ("shared+packed", "paired"),
}


def summarize(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per profile: the pairs/s ratios that exist among the layouts run, the token-ratio
    ceiling, the useful-FLOPs ratio (paired / shared: with the vocabulary head, whose rows
    are the completion tokens in every layout, and attention pairs counted), and the paper's
    speed-ups."""
    summary = {}
    for name, report in reports.items():
        layouts = report["layouts"]
        row: dict[str, Any] = {"pairs": report["data"]["num_pairs"],
                               "token_ratio_ceiling": report["data"]["token_ratio_ceiling"]}
        paired = [layouts[n]["flops"] for n in ("paired", "paired+packed") if n in layouts]
        shared = [layouts[n]["flops"] for n in ("shared", "shared+packed") if n in layouts]
        row["flops_ratio"] = paired[0] / shared[0] if paired and shared else None
        for key, (a, b) in SUMMARY_RATIOS.items():
            row[key] = layouts[a]["pairs_per_s"] / layouts[b]["pairs_per_s"] \
                if a in layouts and b in layouts else None
        row["paper_unpacked"], row["paper_packed"] = PAPER_SPEEDUPS.get(name, (None, None))
        summary[name] = row
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    columns = [("profile", "{:<15}", None), ("pairs", "{:>6}", "pairs"),
               ("ceiling", "{:>8.2f}", "token_ratio_ceiling"),
               ("FLOPs", "{:>6.2f}", "flops_ratio"),
               ("s / p", "{:>6.2f}", "shared_vs_paired"),
               ("s+pk / p+pk", "{:>11.2f}", "shared_packed_vs_paired_packed"),
               ("s+pk / p", "{:>8.2f}", "shared_packed_vs_paired"),
               ("paper unpk", "{:>10.2f}", "paper_unpacked"),
               ("paper pk", "{:>8.2f}", "paper_packed")]
    widths = [len(fmt.format(*([""] if "<" in fmt else [0]))) for _, fmt, _ in columns]
    lines = [" ".join(f"{name:>{w}}" if i else f"{name:<{w}}"
                      for i, ((name, _, _), w) in enumerate(zip(columns, widths)))]
    for profile, row in summary.items():
        cells = []
        for (_, fmt, key), w in zip(columns, widths):
            value = profile if key is None else row.get(key)
            cells.append(f"{'-':>{w}}" if value is None else fmt.format(value))
        lines.append(" ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

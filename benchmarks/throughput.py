"""Throughput of full DPO training steps in the four layouts, on the trainer's own code.

    python benchmarks/throughput.py [--quick] [--model tiny|llama-3.2-1b|llama-3.1-8b|
        mistral-7b|CONFIG.json] [--dataset hh-rlhf|capybara|...[,...]|all
        | --data FILE... --tokenizer DIR] [--layouts paired,paired+packed,shared,shared+packed]
        [--pairs N] [--paired-tokens N] [--rounds R] [--json OUT] ... (--help: all options)

What runs is the trainer's: the model, reference and optimizer of `train.setup.build_training`
(on CUDA FSDP2, bf16 mixed precision, compiled layers, FlexAttention; on the CPU float32 and
the documents executor), `Training.step` for each step, batches from the trainer's loader
with a token budget per micro-batch (`PreferenceLoader.with_token_budget`), built in its
background thread. A precomputed reference is a stand-in table: its values do not change the
cost. Every layout makes one timed pass over the same examples per round (pairs and tokens
checked); with several rounds (the CPU's default) the layouts' passes advance in turn a step
at a time, so a slow spell of the machine lands on every layout alike, and each ratio is
reported as its median and range over the rounds. With one round (CUDA's) the passes run one
after another, each written out as soon as it is done. The layouts and the profiles share one
model and dynamo's cache. The CPU's useful FLOP/s are given as a share of a float32 GEMM it
measures in every round on the same threads. Synthetic data follows one of the six length
profiles of Wang & Hegde (2024), Table 1. The presets are the config.json files in
benchmarks/models/. BENCHMARKS.md says what each figure means and how to read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from measure import (PeakMemory, clock, compile_counts, compile_mode_options, environment,
                     gemm_peak_flops, synchronize)

from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.example import Example, Group
from prefixdpo.data.layout import Numbering, is_packed, is_shared
from prefixdpo.data.loader import PreferenceLoader, StepBatches, example_length, fit_examples
from prefixdpo.data.packing import auto_packing_length
from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.executor import choose_executor
from prefixdpo.model.masks import FLEX_BLOCK_SIZE
from prefixdpo.train.build import ModelSource
from prefixdpo.train.config import OptimSection, ReferenceSection, TrainSection
from prefixdpo.train.distributed import Distributed, setup
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.metrics import peak_flops
from prefixdpo.train.reference import TableReference
from prefixdpo.train.setup import Training, build_training

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

# Presets: the architecture fields of real models (and a CPU-sized "tiny"), as config.json.
MODELS = Path(__file__).resolve().parent / "models"
PRESETS = sorted(path.stem for path in MODELS.glob("*.json"))

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
             warmup_steps=1, device="cpu", rounds=2)
# Default sizes. On the CPU, CPU_ROUNDS interleaved rounds, and as many pairs of a profile as
# hold CPU_TOKENS_TIMES_LENGTH / (its median length) tokens in the paired layout: 129k for
# HH-RLHF, 21k for Capybara, whose tokens cost more (longer attention). Measured on 2 cores,
# HH-RLHF's passes then last about 10 s and its ratios stay within 5% over the rounds (within
# 10% at a quarter of that). On CUDA one round of GPU_PAIRS pairs.
CPU_TOKENS_TIMES_LENGTH, CPU_ROUNDS, GPU_PAIRS = 24_000_000, 5, 2048

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# ---- model and data -----------------------------------------------------------------------


def model_config(name: str, num_layers: int | None, tokenizer_vocab: int | None) -> ModelConfig:
    """A preset or a config.json; "tiny" takes the tokenizer's vocabulary when one is given."""
    path = MODELS / f"{name}.json" if name in PRESETS else Path(name)
    if not path.exists():
        raise ValueError(f"--model {name!r}: neither a preset ({', '.join(PRESETS)}) nor a "
                         "config.json file or folder")
    config = ModelConfig.from_file(path)
    if name == "tiny" and tokenizer_vocab:
        config = dataclasses.replace(config, vocab_size=tokenizer_vocab)
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


# ---- one layout ----------------------------------------------------------------------------


class LayoutRun:
    """One layout's loader and the figures of its timed passes."""

    def __init__(self, layout: str, examples: list[Example], training: Training,
                 args: argparse.Namespace, packing_length: int):
        self.layout, self.examples, self.training, self.args = layout, examples, training, args
        device = training.env.device
        self.loader = PreferenceLoader.with_token_budget(
            examples, layout, args.tokens_per_micro_batch, packing_length=packing_length,
            pad_multiple=training.executor.row_multiple, grad_accum=args.grad_accum,
            seed=args.seed, pin_memory=device.type == "cuda")
        self.passes: list[dict[str, Any]] = []
        self.loss_state = LossState()

    def step(self, batches: StepBatches):
        result, self.loss_state = self.training.step(batches, self.loss_state)
        return result

    def warm_up(self) -> None:
        """The first steps of the plan, untimed; compiled unpacked layouts, whose shapes vary,
        also run one micro-batch of each extreme shape (fewest and most rows, shortest and
        longest rows), so that the switch to dynamic shapes happens here."""
        loader, count = self.loader, self.args.warmup_steps
        steps = [loader.step_batches(0, s) for s in range(min(count, loader.steps_in_epoch(0)))]
        if count and self.args.compile and not is_packed(self.layout):
            plan = loader.micro_batch_plan(0)
            shapes = {i: (len(rows), max(loader.longest_document[r[0]] for r in rows))
                      for i, rows in enumerate(plan)}
            seen = {tuple(b.input_ids.shape) for batches in steps for b in batches}
            for pick in (min, max):
                for axis in (0, 1):
                    batch = loader.build(plan[pick(shapes, key=lambda k: shapes[k][axis])])
                    if tuple(batch.input_ids.shape) not in seen:
                        seen.add(tuple(batch.input_ids.shape))
                        steps.append(StepBatches.single_process([batch]))
        for batches in steps:
            self.step(batches)

    def timed_pass(self) -> Iterator[None]:
        """One pass over every example, a step at a time: a generator, so that the caller can
        interleave the layouts' passes step by step. Each step is timed from the request for
        its batches to the end of its update; the figures are added to `passes` at the end."""
        device = self.training.env.device
        figures = dict(pairs=0, tokens=0, row_tokens=0, micro_batches=0, flops=0.0,
                       seconds=0.0, data_wait_s=0.0, max_data_wait_s=0.0, graphs_compiled=0,
                       graph_breaks=0)
        losses = []
        num_steps = self.loader.steps_in_epoch(0)
        self.loader.epoch = self.loader.step = 0  # every pass: the same plan, epoch 0's
        batches_iter = iter(self.loader)
        batches = next(batches_iter)  # not a wait a running loop would see
        for index in range(num_steps):
            before = compile_counts()
            start = clock(device)
            if index:
                batches = next(batches_iter)
                waited = time.perf_counter() - start
                figures["data_wait_s"] += waited
                figures["max_data_wait_s"] = max(figures["max_data_wait_s"], waited)
            result = self.step(batches)
            figures["seconds"] += clock(device) - start
            after = compile_counts()
            figures["graphs_compiled"] += after["graphs"] - before["graphs"]
            figures["graph_breaks"] += after["graph_breaks"] - before["graph_breaks"]
            losses.append(result.loss)
            figures["pairs"] += result.num_pairs
            figures["tokens"] += result.num_tokens
            figures["micro_batches"] += len(batches)
            figures["row_tokens"] += sum(b.input_ids.numel() for b in batches)
            figures["flops"] += self.training.step_flops(batches)
            yield
        batches_iter.close()
        expected_tokens = sum(e.num_shared_tokens if is_shared(self.layout)
                              else e.num_paired_tokens for e in self.examples)
        expected_pairs = Numbering(self.examples).num_pairs
        if (figures["pairs"], figures["tokens"]) != (expected_pairs, expected_tokens):
            raise RuntimeError(f"{self.layout}: processed {figures['pairs']} pairs and "
                               f"{figures['tokens']} tokens, expected {expected_pairs} and "
                               f"{expected_tokens}")
        figures.update(steps=num_steps, mean_loss=float(np.mean(losses)))
        self.passes.append(figures)

    def summary(self, gemm_flops: float | None) -> dict[str, Any]:
        """The median pass's figures (by seconds), with every pass's seconds."""
        median = sorted(self.passes, key=lambda p: p["seconds"])[(len(self.passes) - 1) // 2]
        seconds = median["seconds"]
        peak = peak_flops(self.training.env.device)
        flops_per_s = median["flops"] / seconds
        return {"layout": self.layout, **{k: median[k] for k in (
                    "steps", "micro_batches", "pairs", "tokens", "row_tokens", "flops",
                    "data_wait_s", "max_data_wait_s", "mean_loss")},
                "rows_per_micro_batch": self.loader.micro_batch_size
                if is_packed(self.layout) else None,
                "padding_fraction": 1.0 - median["tokens"] / median["row_tokens"],
                "seconds": seconds, "round_seconds": [p["seconds"] for p in self.passes],
                "pairs_per_s": median["pairs"] / seconds,
                "tokens_per_s": median["tokens"] / seconds, "flops_per_s": flops_per_s,
                "mfu": flops_per_s / peak if peak else None,
                "gemm_share": flops_per_s / gemm_flops if gemm_flops else None,
                "peak_memory_gib": max(p["peak_memory_gib"] for p in self.passes),
                "graphs_compiled_after_warmup": sum(p["graphs_compiled"] for p in self.passes),
                "graph_breaks_after_warmup": sum(p["graph_breaks"] for p in self.passes)}

    def profile(self) -> str:
        from torch.profiler import ProfilerActivity, profile

        device = self.training.env.device
        cuda = device.type == "cuda"
        batches = self.loader.step_batches(0, 0)
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as p:
            self.step(batches)
            synchronize(device)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        return p.key_averages().table(sort_by=sort, row_limit=25)


# ---- one dataset --------------------------------------------------------------------------


RATIOS = {  # name: (numerator layout, denominator layout)
    "shared_vs_paired": ("shared", "paired"),
    "shared_packed_vs_paired_packed": ("shared+packed", "paired+packed"),
    "shared_packed_vs_paired": ("shared+packed", "paired"),
}


def round_ratios(runs: dict[str, LayoutRun]) -> dict[str, dict[str, Any]]:
    """Each ratio of pairs/s computed within each round (the layouts process the same pairs,
    so it is the inverse ratio of their seconds): its median, its range and every round's."""
    ratios = {}
    for name, (a, b) in RATIOS.items():
        if a in runs and b in runs:
            rounds = [pb["seconds"] / pa["seconds"]
                      for pa, pb in zip(runs[a].passes, runs[b].passes)]
            if rounds:
                median = statistics.median(rounds)
                ratios[name] = {"median": median, "min": min(rounds), "max": max(rounds),
                                "spread": max(median / min(rounds), max(rounds) / median) - 1,
                                "rounds": rounds}
    return ratios


def measure_dataset(args: argparse.Namespace, env: Distributed, profile: str | None,
                    publish: Callable[[dict[str, Any]], None],
                    trainings: dict[ModelConfig, Training]) -> dict[str, Any]:
    """Every layout on one dataset, `--rounds` times interleaved (see the module docstring);
    `publish` receives the report after every pass. `trainings` keeps the set-up of each model
    config for the next datasets (the profiles share one: one model, one compile cache)."""
    cuda = env.device.type == "cuda"
    if profile is None:
        tokenizer = load_tokenizer(args.tokenizer)
        config = model_config(args.model, args.num_layers, tokenizer.vocab_size)
        examples = real_examples(args.data, tokenizer, args.format, args.pairs or 0)
        data_name = ", ".join(args.data)
    else:
        config = model_config(args.model, args.num_layers, None)
        paired_tokens = args.paired_tokens or (
            CPU_TOKENS_TIMES_LENGTH // PROFILES[profile][0] if args.pairs is None else 0)
        if paired_tokens:
            examples = synthetic_examples_for_tokens(profile, paired_tokens,
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
    packing_length = auto_packing_length([example_length(e, "paired+packed") for e in examples]) \
        if args.packing_length == "auto" else int(args.packing_length)
    examples, fit = fit_examples(examples, "paired+packed", packing_length, "truncate")
    budget = args.tokens_per_micro_batch or max(16384 if cuda else 4096, packing_length)
    if budget < packing_length:
        raise SystemExit(f"--tokens-per-micro-batch {budget} is below the packing length "
                         f"{packing_length}: a packed micro-batch needs at least one row")
    args = argparse.Namespace(**{**vars(args), "tokens_per_micro_batch": budget})
    stats = data_statistics(examples)
    print(f"model: {args.model}, {config.num_hidden_layers} layers, "
          f"{config.num_params / 1e6:.1f}M parameters, random init")
    print(f"data: {data_name}: {len(examples)} pairs, median prompt+chosen "
          f"{stats['median_prompt_plus_chosen']:.0f} tokens, prompt/completion ratio "
          f"{stats['prompt_completion_ratio']:.2f}; token-ratio ceiling (paired / shared "
          f"tokens) {stats['token_ratio_ceiling']:.3f}")
    print(f"packing length {packing_length} ({fit.num_truncated} examples cut to fit), "
          f"{budget} tokens per micro-batch, grad_accum {args.grad_accum}, reference "
          f"{args.reference}, {args.warmup_steps} warm-up step(s), {args.rounds} round(s)",
          flush=True)
    if config not in trainings:
        trainings[config] = build_dataset_training(args, env, config)
    training = trainings[config]
    if args.reference == "precomputed":  # a stand-in table for this dataset's sequences
        generator = torch.Generator().manual_seed(args.seed)
        table = -100.0 * torch.rand(Numbering(examples).num_sequences, generator=generator) - 1
        stand_in = TableReference(table.to(env.device))
        training = dataclasses.replace(training, reference=stand_in, eval_reference=stand_in)
    runs = {layout: LayoutRun(layout, examples, training, args, packing_length)
            for layout in args.layouts}
    failures: dict[str, str] = {}
    gemm: list[float] = []
    head = {"model": {"name": args.model, "num_params": config.num_params,
                      "num_hidden_layers": config.num_hidden_layers},
            "data": {"source": data_name, "profile": profile, "num_pairs": len(examples),
                     "packing_length": packing_length, "num_truncated": fit.num_truncated,
                     "packing_efficiency_paired": fit.efficiency,
                     "tokens_per_micro_batch": budget, **stats}}

    def report() -> dict[str, Any]:
        gemm_flops = statistics.median(gemm) if gemm else None
        layouts = {k: run.summary(gemm_flops) for k, run in runs.items()
                   if run.passes and k not in failures}
        for base in ("paired", "paired+packed"):
            for r in layouts.values():
                if base in layouts:
                    r[f"speedup_vs_{base}"] = r["pairs_per_s"] / layouts[base]["pairs_per_s"]
        return {**head, "rounds": args.rounds, "gemm_flops": gemm_flops,
                "gemm_flops_rounds": gemm, "layouts": layouts, "failures": failures,
                "ratios": round_ratios({k: runs[k] for k in layouts})}

    with compile_mode_options(args.compile_mode):
        for r in range(args.rounds):
            if not cuda:
                gemm.append(gemm_peak_flops())
            sequential = args.rounds == 1
            if r == 0 and not sequential:
                for layout, run in runs.items():
                    attempt(layout, failures, run.warm_up)
            active = {k: run.timed_pass() for k, run in runs.items() if k not in failures}
            memory = PeakMemory(env.device)
            if sequential:  # one pass after another, each warmed up before, published after
                for layout, steps in active.items():
                    if not attempt(layout, failures, runs[layout].warm_up):
                        continue
                    memory.reset()
                    while not advance(layout, failures, steps):
                        pass
                    if layout not in failures:
                        runs[layout].passes[-1]["peak_memory_gib"] = memory.gib()
                        publish(report())
            else:  # the passes interleaved step by step, so a slow spell hits them alike
                memory.reset()
                running = dict(active)
                while running:
                    for layout in list(running):
                        if advance(layout, failures, running[layout]):
                            del running[layout]
                for layout in active:
                    if layout not in failures:
                        runs[layout].passes[-1]["peak_memory_gib"] = memory.gib()
                publish(report())
            for layout in active:
                if layout not in failures:
                    figures = runs[layout].passes[-1]
                    print(f"  round {r + 1}/{args.rounds} {layout}: {figures['seconds']:.2f} s, "
                          f"{figures['pairs'] / figures['seconds']:.4g} pairs/s", flush=True)
    result = report()
    print()
    print(format_table(result["layouts"], cuda))
    for name, ratio in result["ratios"].items():
        print(f"{name}: median {ratio['median']:.3f}, range {ratio['min']:.3f}-"
              f"{ratio['max']:.3f} ({ratio['spread']:.1%}) over {len(ratio['rounds'])} rounds")
    if gemm:
        print(f"float32 GEMM peak: {statistics.median(gemm) / 1e9:.1f} GFLOP/s (median of "
              f"{len(gemm)} rounds)")
    for layout, message in failures.items():
        print(f"{layout}: FAILED: {message}")
    if args.profile:
        for layout, run in runs.items():
            if layout not in failures:
                result["layouts"][layout]["profile"] = table = run.profile()
                print(f"\n--- profile of one {layout} step ---\n{table}")
    return result


def attempt(layout: str, failures: dict[str, str], work: Callable[[], Any]) -> bool:
    """Run `work` for a layout; whether it ran. A failure is recorded and printed: the other
    layouts still run."""
    try:
        work()
        return True
    except Exception as e:  # noqa: BLE001 - reported, the other layouts still run
        traceback.print_exc()
        failures[layout] = f"{type(e).__name__}: {e}"
        print(f"  {layout}: FAILED ({failures[layout]})", flush=True)
        return False


def advance(layout: str, failures: dict[str, str], steps: Iterator[None]) -> bool:
    """One more step of a layout's pass; whether the pass is over (done, or failed)."""
    more: list[None] = []
    return not attempt(layout, failures, lambda: more.extend(itertools.islice(steps, 1))) \
        or not more


def build_dataset_training(args: argparse.Namespace, env: Distributed, config: ModelConfig
                           ) -> Training:
    """The trainer's set-up for this model; a precomputed reference is a stand-in table (set
    per dataset), so there is no scoring pass."""
    cuda = env.device.type == "cuda"
    executor = choose_executor(args.attention, env.device, flex_backend=args.flex_backend,
                               block_size=args.block_size or FLEX_BLOCK_SIZE)
    stand_in = TableReference(torch.zeros(0)) if args.reference == "precomputed" else None
    return build_training(
        ModelSource(config, None, None, args.seed), env, executor,
        train=TrainSection(activation_checkpointing=args.activation_checkpointing,
                           compile=args.compile and cuda),
        optim=OptimSection(lr=args.lr), loss=LossConfig(),
        reference=ReferenceSection(mode=args.reference), stand_in_reference=stand_in,
        log=lambda line: None)


# ---- report -------------------------------------------------------------------------------


def format_table(results: dict[str, dict], cuda: bool) -> str:
    columns = [("layout", "{:<14}", "layout"), ("steps", "{:>6}", "steps"),
               ("micro", "{:>6}", "micro_batches"), ("pairs", "{:>6}", "pairs"),
               ("tokens", "{:>9}", "tokens"), ("pad", "{:>6.1%}", "padding_fraction"),
               ("pairs/s", "{:>9.4g}", "pairs_per_s"), ("tokens/s", "{:>9.0f}", "tokens_per_s"),
               ("MFU" if cuda else "of GEMM", "{:>8.1%}", "mfu" if cuda else "gemm_share"),
               ("peak GiB" if cuda else "RSS GiB", "{:>8.2f}", "peak_memory_gib"),
               ("wait s", "{:>7.3f}", "data_wait_s"),
               ("recomp", "{:>6}", "graphs_compiled_after_warmup"),
               ("x paired", "{:>8.2f}", "speedup_vs_paired"),
               ("x p+packed", "{:>10.2f}", "speedup_vs_paired+packed")]
    return aligned(columns, [(r, r) for r in results.values()])


def aligned(columns: list[tuple[str, str, str | None]], rows: list[tuple[Any, dict]]) -> str:
    """A text table: `columns` (header, format, key; None: the row's label)."""
    widths = [len(fmt.format(*([""] if "<" in fmt else [0]))) for _, fmt, _ in columns]
    lines = [" ".join(f"{name:>{w}}" if i else f"{name:<{w}}"
                      for i, ((name, _, _), w) in enumerate(zip(columns, widths)))]
    for label, row in rows:
        cells = []
        for (_, fmt, key), w in zip(columns, widths):
            value = label if key is None else row.get(key)
            cells.append(f"{'-':>{w}}" if value is None else fmt.format(value))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def summarize(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per profile: each ratio's median and range over the rounds, the token-ratio ceiling,
    the useful-FLOPs ratio (paired / shared, the head and attention pairs counted), the CPU's
    share of its GEMM peak in shared+packed, and the paper's speed-ups."""
    summary = {}
    for name, report in reports.items():
        layouts = report["layouts"]
        row: dict[str, Any] = {"pairs": report["data"]["num_pairs"],
                               "token_ratio_ceiling": report["data"]["token_ratio_ceiling"]}
        paired = [layouts[n]["flops"] for n in ("paired", "paired+packed") if n in layouts]
        shared = [layouts[n]["flops"] for n in ("shared", "shared+packed") if n in layouts]
        row["flops_ratio"] = paired[0] / shared[0] if paired and shared else None
        for key in RATIOS:
            ratio = report.get("ratios", {}).get(key)
            row[key] = ratio["median"] if ratio else None
            row[f"{key}_range"] = [ratio["min"], ratio["max"]] if ratio else None
        row["gemm_share"] = (layouts.get("shared+packed") or {}).get("gemm_share")
        row["paper_unpacked"], row["paper_packed"] = PAPER_SPEEDUPS.get(name, (None, None))
        summary[name] = row
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    def ranged(key: str) -> Callable[[dict], str | None]:
        def cell(row: dict) -> str | None:
            if row.get(key) is None:
                return None
            low, high = row[f"{key}_range"]
            return f"{row[key]:.2f} ({low:.2f}-{high:.2f})"
        return cell

    rows = [(profile, {**row, **{f"{k}_text": ranged(k)(row) for k in RATIOS}})
            for profile, row in summary.items()]
    columns = [("profile", "{:<15}", None), ("pairs", "{:>6}", "pairs"),
               ("ceiling", "{:>8.2f}", "token_ratio_ceiling"),
               ("FLOPs", "{:>6.2f}", "flops_ratio"),
               ("s / p", "{:>18}", "shared_vs_paired_text"),
               ("s+pk / p+pk", "{:>18}", "shared_packed_vs_paired_packed_text"),
               ("s+pk / p", "{:>18}", "shared_packed_vs_paired_text"),
               ("of GEMM", "{:>8.1%}", "gemm_share"),
               ("paper unpk", "{:>10.2f}", "paper_unpacked"),
               ("paper pk", "{:>8.2f}", "paper_packed")]
    return aligned(columns, rows)


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
                   f"--data; synthetic: {GPU_PAIRS} on CUDA)")
    p.add_argument("--paired-tokens", type=int, help="synthetic: as many pairs as hold about "
                   "this many tokens in the paired layout (default on CPU "
                   f"{CPU_TOKENS_TIMES_LENGTH:,} / the profile's median length; --pairs still "
                   "caps them)")
    p.add_argument("--spread", type=float, default=0.5, help="lognormal sigma of synthetic "
                   "lengths")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, measured in "
                   "this order in every round")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {CPU_ROUNDS} on "
                   "CPU, 1 on CUDA)")
    p.add_argument("--tokens-per-micro-batch", type=int,
                   help="token budget of a micro-batch, padding included (default 16384 on "
                   "CUDA, 4096 on CPU; at least the packing length)")
    p.add_argument("--packing-length", default="auto", help="'auto' or a multiple of 128")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--reference", choices=("precomputed", "live"), default="precomputed")
    p.add_argument("--warmup-steps", type=int, help="untimed steps per layout (default 2 on "
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
                   "in the step")
    p.add_argument("--block-size", type=int, help="FlexAttention block size, a power of two "
                   f"from 16 to {FLEX_BLOCK_SIZE} (default {FLEX_BLOCK_SIZE})")
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
            p.error(f"--layouts: unknown layout {layout!r}; expected {LAYOUTS}")
    args.datasets = parse_datasets(p, args.dataset or "hh-rlhf")
    if args.data and not args.tokenizer:
        p.error("--data needs --tokenizer (a folder with tokenizer.json)")
    size = args.block_size
    if size is not None and not (16 <= size <= FLEX_BLOCK_SIZE and size & (size - 1) == 0):
        p.error(f"--block-size {size}: expected a power of two from 16 to {FLEX_BLOCK_SIZE} "
                f"(rows are padded to multiples of {FLEX_BLOCK_SIZE})")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def parse_datasets(p: argparse.ArgumentParser, text: str) -> list[str]:
    names = sorted(PROFILES) if text == "all" else \
        [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROFILES]
    if unknown or not names:
        p.error(f"--dataset: unknown profile(s) {unknown or text!r}; expected "
                f"{', '.join(sorted(PROFILES))} or 'all'")
    return list(dict.fromkeys(names))


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> None:
    args.model = args.model or ("llama-3.2-1b" if cuda else "tiny")
    args.dataset = ",".join(args.datasets)
    if args.warmup_steps is None:
        args.warmup_steps = 2 if cuda else 1
    if args.rounds is None:
        args.rounds = 1 if cuda else CPU_ROUNDS
    args.compile = cuda if args.compile is None else (args.compile and cuda)
    if cuda and args.pairs is None and not args.data and not args.paired_tokens:
        args.pairs = GPU_PAIRS


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    owns_group = not dist.is_initialized()
    env = setup(args.device)
    resolve_defaults(args, env.device.type == "cuda")
    try:
        return run(args, env)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace, env: Distributed) -> dict[str, Any]:
    """Every dataset in turn; the report. Exits with an error after writing it when a layout
    failed."""
    cuda = env.device.type == "cuda"
    info = environment(env.device)
    print(f"device: {env.device} ({info['device']}), torch {torch.__version__}, "
          f"{info['torch_threads']} threads, load average {info['load_average'][0]:.2f}"
          f"{', compiled, bf16 mixed precision' if args.compile else ''}")
    print(f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}, "
          f"compile mode {args.compile_mode}, FlexAttention block size "
          f"{args.block_size or FLEX_BLOCK_SIZE}, backend {args.flex_backend}"
          f"{'' if cuda else ' (FlexAttention and compilation: CUDA only)'}, attention "
          f"executor {args.attention}")
    names: list[str | None] = [None] if args.data else args.datasets
    several = len(names) > 1
    reports: dict[str, dict[str, Any]] = {}
    trainings: dict[ModelConfig, Training] = {}

    def combined() -> dict[str, Any]:
        head = {"environment": {**info, "load_average_end": environment(env.device)[
                    "load_average"]}, "args": dict(vars(args)),
                "supported": {"compile_modes": list(COMPILE_MODES)}}
        if not several:
            return {**head, **next(iter(reports.values()))}
        return {**head, "datasets": reports, "summary": summarize(reports)}

    def publish(name: str, report: dict[str, Any]) -> None:
        reports[name] = report
        if args.json:
            write_json(args.json, combined())

    for name in names:
        if several:
            print(f"\n=== {name} ===", flush=True)
        publish(name or "data", measure_dataset(
            args, env, name, lambda report, key=name or "data": publish(key, report),
            trainings))
    report = combined()
    if several:
        print("\nSummary: pairs/s ratios, median (range) over the rounds, beside the token-ratio "
              "ceiling, the useful-FLOPs ratio (paired / shared), shared+packed's share of the "
              "GEMM peak (CPU) and the paper's speed-ups (shared / unshared FlexAttention, "
              "unpacked / packed)")
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


if __name__ == "__main__":
    main()

"""prefixdpo against TRL's DPOTrainer: the same DPO training, timed in one run, numbers checked.

    python benchmarks/vs_trl.py [--tiny] [--model DIR] [--tokenizer DIR] [--data FILE ...]
        [--pairs N] [--pairs-per-step B] [--steps K] [--repeats R] [--warmup-steps W]
        [--layouts shared+packed,paired] [--packing-length step|L] [--device cpu|cuda]
        [--one-at-a-time] [--lr LR] [--seed S] [--no-compile] [--json OUT]

Needs TRL, an optional extra: `pip install -e ".[bench]"`. What is the same in both trainers,
how a step is timed and what is checked: BENCHMARKS.md, "Against TRL's DPOTrainer". Each
contender runs in a process of its own, so that its memory is its own; prefixdpo is set up by
`train.setup.build_training` and steps with `Training.step` on batches of the trainer's loader.
The TRL pieces here (`dpo_config`, `recording_trainer`, ...) serve `learning_vs_trl.py` too.
"""

from __future__ import annotations

import argparse
import collections
import enum
import importlib.util
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measure import ROOT, PeakMemory, clock, compile_counts, environment

from prefixdpo.data.encoding import encode_preferences
from prefixdpo.data.example import Example
from prefixdpo.data.formats import CHAT, IDS, Preference, detect_format, parse_record
from prefixdpo.data.layout import Batch, Numbering, is_packed
from prefixdpo.data.loader import PreferenceLoader, StepBatches, example_length
from prefixdpo.data.packing import round_up
from prefixdpo.data.reading import RowError, read_rows
from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer
from prefixdpo.model.config import ModelConfig

DEFAULT_DATA = ROOT / "assets" / "data" / "hh-rlhf-helpful-base-test-1000.jsonl.gz"
DEFAULT_TOKENIZER = ROOT / "assets" / "tokenizers" / "mistral-7b-v0.1"
LAYOUTS = ("shared+packed", "shared", "paired+packed", "paired")
REQUIRED = ("trl", "transformers", "accelerate", "datasets")
INSTALL_HINT = 'pip install -e ".[bench]"'
LN2 = math.log(2.0)
# Tolerances: float32 (CPU) / bfloat16 compute (CUDA).
LOSS_ATOL = {"float32": 1e-5, "bfloat16": 5e-2}
LOGP_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
LLAMA: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
    rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, initializer_range=0.02,
    attention_bias=False, mlp_bias=False)
# HuggingFaceTB/SmolLM-135M-Instruct's config.json (SmolLM2-135M has the same shape).
SMOLLM_135M = dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
TINY_MODEL = dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                  max_position_embeddings=8192)
TINY = dict(pairs=8, pairs_per_step=4, steps=1, repeats=2, warmup_steps=1)
TINY_VOCAB = 512
END_OF_TEXT = "<|endoftext|>"
# A contender is a process group of its own, and the libraries print no progress bars.
QUIET_ENV = dict(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                 TOKENIZERS_PARALLELISM="false")
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- data: the same selection in every process ---------------------------------------------


def read_preferences(files: Sequence[str], fmt: str, max_pairs: int
                     ) -> tuple[list[tuple[int, Preference]], collections.Counter]:
    """The first `max_pairs` (0: all) usable pairs of the files, and why others were left out."""
    out: list[tuple[int, Preference]] = []
    skipped: collections.Counter = collections.Counter()
    rows = (row for file in files for row in read_rows(file))
    for index, row in enumerate(rows):
        try:
            if row.error is not None:
                raise RowError(row.location, row.error)
            fmt = detect_format(row.value, row.location) if fmt == "auto" else fmt
            preference = parse_record(row.value, row.location, fmt)
        except RowError as e:
            skipped[e.reason.split(";")[0].split(" (")[0]] += 1
            continue
        if preference.kind == IDS:
            raise SystemExit("vs_trl.py: pre-tokenized data cannot be compared: TRL tokenizes "
                             "text itself; give text or conversational data")
        if len(preference.groups) != 1 or len(preference.pairs) != 1:
            skipped["chosen and rejected prompts differ (TRL has one prompt per pair)"] += 1
            continue
        out.append((index, preference))
        if max_pairs and len(out) >= max_pairs:
            break
    return out, skipped


def select_pairs(files: Sequence[str], fmt: str, tokenizer: Tokenizer, num_pairs: int,
                 pairs_per_step: int) -> tuple[list[Preference], list[Example],
                                               collections.Counter]:
    """Parsed pairs and our Examples of them, as many as a whole number of steps holds."""
    read, skipped = read_preferences(files, fmt, num_pairs)
    template = tokenizer.compile_chat_template() if any(p.kind == CHAT for _, p in read) \
        else None
    preferences, examples = [], []
    for (_, preference), result in zip(read, encode_preferences(read, tokenizer,
                                                                chat_template=template)):
        if isinstance(result, Example):
            preferences.append(preference)
            examples.append(result)
        else:
            skipped[result.reason.split(";")[0]] += 1
    usable = len(examples) // pairs_per_step * pairs_per_step
    if usable == 0:
        raise SystemExit(f"vs_trl.py: {len(examples)} usable pairs, fewer than one step of "
                         f"{pairs_per_step}")
    return preferences[:usable], examples[:usable], skipped


def trl_record(preference: Preference) -> dict[str, Any]:
    """The pair as TRL takes it: standard (text) or conversational (messages)."""
    group, (chosen, rejected) = preference.groups[0], preference.pairs[0]
    if preference.kind == CHAT:
        def messages(ms): return [dict(m) for m in ms]
    else:
        def messages(text): return text
    return {"prompt": messages(group.prompt), "chosen": messages(group.completions[chosen]),
            "rejected": messages(group.completions[rejected])}


def our_ids(example: Example) -> tuple[list[int], list[int], list[int]]:
    group, (chosen, rejected) = example.groups[0], example.pairs[0]
    return (group.prompt.tolist(), group.completions[chosen].tolist(),
            group.completions[rejected].tolist())


def step_positions(step: int, num_pairs: int, pairs_per_step: int) -> list[int]:
    first = (step % (num_pairs // pairs_per_step)) * pairs_per_step
    return list(range(first, first + pairs_per_step))


def token_differences(trl: tuple[list[int], list[int]], ours: tuple[list[int], list[int]],
                      bos_id: int | None, eos_id: int) -> list[str]:
    """Why TRL's (prompt, completion) ids differ from ours; [] when they are equal."""
    (trl_prompt, trl_completion), (our_prompt, our_completion) = trl, ours
    reasons = []
    if bos_id is not None:
        trl_bos, our_bos = trl_prompt[:1] == [bos_id], our_prompt[:1] == [bos_id]
        if trl_bos != our_bos:
            reasons.append(f"BOS only in {'TRL' if trl_bos else 'ours'}")
        trl_prompt, our_prompt = trl_prompt[trl_bos:], our_prompt[our_bos:]
    trl_eos, our_eos = trl_completion[-1:] == [eos_id], our_completion[-1:] == [eos_id]
    if trl_eos != our_eos:
        reasons.append(f"EOS only in {'TRL' if trl_eos else 'ours'}")
    trl_completion = trl_completion[:len(trl_completion) - trl_eos]
    our_completion = our_completion[:len(our_completion) - our_eos]
    if trl_prompt == our_prompt and trl_completion == our_completion:
        return reasons
    if trl_prompt + trl_completion == our_prompt + our_completion:
        reasons.append("same tokens, split differently into prompt and completion")
    elif trl_prompt == our_prompt:
        reasons.append("completion starts differently (tokens merged across the boundary: "
                       "ours is then the completion encoded alone)"
                       if trl_completion[:1] != our_completion[:1] else
                       "completion tokens differ after its start")
    else:
        shorter = min(len(trl_prompt), len(our_prompt))
        reasons.append("prompt end differs (TRL's prompt is the common prefix of the prompt "
                       "alone and prompt + completion)"
                       if trl_prompt[:shorter] == our_prompt[:shorter] else
                       "prompt tokens differ")
    return reasons


def first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def token_agreement(trl_ids: list[tuple], examples: list[Example], tokenizer: Tokenizer,
                    show: Callable[[list[int]], list[str]]) -> tuple[list[bool], dict, dict]:
    """Per pair whether TRL's (prompt, chosen, rejected) ids are ours; the count of each reason
    for the others, and an example of each (`show`: ids to token strings)."""
    agree, reasons, shown = [], collections.Counter(), {}
    for i, ((tp, tc, tr), (op, oc, orj)) in enumerate(zip(trl_ids, map(our_ids, examples))):
        why = "; ".join(sorted({*token_differences((tp, tc), (op, oc), tokenizer.bos_id,
                                                   tokenizer.eos_id),
                                *token_differences((tp, tr), (op, orj), tokenizer.bos_id,
                                                   tokenizer.eos_id)}))
        agree.append(not why)
        if why:
            reasons[why] += 1
            if why not in shown:
                a, b = tp + tc, op + oc
                w = slice(max(0, first_difference(a, b) - 2), first_difference(a, b) + 3)
                shown[why] = (f"pair {i} (chosen), from token {w.start}: TRL {show(a[w])} vs "
                              f"ours {show(b[w])}")
    return agree, dict(reasons), shown


# ---- TRL, as both comparisons set it up ----------------------------------------------------


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def exit_without_trl(script: str, missing: list[str]) -> None:
    if missing:
        print(f"{script} needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)


def quiet_environment() -> None:
    """For this process and those it starts: see QUIET_ENV."""
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    os.environ.update(QUIET_ENV)


def dpo_config(output_dir: Path, activation_checkpointing: bool, **settings: Any):
    """TRL's DPOConfig with what both comparisons share: the sigmoid loss, reference log-probs
    precomputed, no gradient accumulation, no reports, checkpoints or progress bars."""
    from trl import DPOConfig

    # transformers 5 renamed the field.
    name = "activation_checkpointing" if "activation_checkpointing" in \
        DPOConfig.__dataclass_fields__ else "gradient_checkpointing"
    return DPOConfig(output_dir=str(output_dir), report_to="none", save_strategy="no",
                     disable_tqdm=True, fp16=False, gradient_accumulation_steps=1,
                     loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     dataloader_num_workers=0, **{name: activation_checkpointing}, **settings)


def recording_trainer(sequential: bool, **kwargs: Any):
    """A DPOTrainer that records each training step's batch shape and loss (no synchronization)
    and the pairs evaluations see; `sequential`: the pairs in order, so that every contender's
    step s holds the same pairs."""
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        shapes: list[tuple[int, ...]] = []
        losses: list[torch.Tensor] = []
        eval_pairs = 0

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return SequentialSampler(dataset) if sequential else \
                super()._get_train_sampler(train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.shapes.append(tuple(inputs["input_ids"].shape))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.detach())
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            self.eval_pairs += inputs["input_ids"].shape[0] // 2
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    return RecordingDPOTrainer(**kwargs)


def step_clock(device: torch.device, after_step: Callable[[int], None] = lambda step: None):
    """A callback timing each optimizer step, from `on_step_begin` to `on_step_end` (forward,
    backward, metrics, clipping, AdamW, scheduler, zero_grad; the batch already collated);
    `after_step(steps done)` runs outside the timed span."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = clock(device)

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(clock(device) - self.start)
            after_step(state.global_step)

    return StepClock()


TRL_FIELDS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "max_steps", "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "max_grad_norm", "optim",
    "seed", "use_cpu", "bf16", "fp16", "gradient_checkpointing", "activation_checkpointing",
    "beta", "loss_type", "label_smoothing", "max_length", "truncation_mode", "padding_free",
    "pad_to_multiple_of", "precompute_ref_log_probs", "precompute_ref_batch_size",
    "disable_dropout", "use_liger_kernel", "torch_compile")


def trl_settings(trainer) -> dict[str, Any]:
    """The versions and the settings TRL ran with, as it holds them."""
    import accelerate
    import datasets
    import transformers
    import trl

    def plain(value):  # enums by their value, as JSON has them
        value = value.value if isinstance(value, enum.Enum) else value
        return value if isinstance(value, (str, int, float, bool, type(None))) else \
            [plain(v) for v in value] if isinstance(value, (list, tuple)) else str(value)

    return {"trl": trl.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "accelerate": accelerate.__version__,
            "collator": type(trainer.data_collator).__name__,
            "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
            "model_dtype": str(trainer.model.dtype), "torch_threads": torch.get_num_threads(),
            **{name: plain(getattr(trainer.args, name, "n/a")) for name in TRL_FIELDS}}


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    d = optimizer.defaults
    return {"class": type(optimizer).__name__, "lr": d.get("lr"),
            "betas": list(d.get("betas", ())), "eps": d.get("eps"),
            "weight_decay": sorted({g.get("weight_decay") for g in optimizer.param_groups}),
            "fused": d.get("fused"), "foreach": d.get("foreach")}


# ---- the contenders, each in its own process -----------------------------------------------


def worker(role: str, spec: dict[str, Any], connection, log_path: str) -> None:
    """A contender's process: what it prints goes to its log, its figures to the driver."""
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        (run_trl if role == "trl" else run_ours)(spec, role, connection)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which stops the run
        connection.send({"event": "error", "message": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()})
        raise SystemExit(1) from None


def run_trl(spec: dict[str, Any], role: str, connection) -> None:
    started = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    B, k, W = spec["pairs_per_step"], spec["steps"], spec["warmup_steps"]
    ours_tokenizer = load_tokenizer(spec["tokenizer"])
    preferences, examples, _ = select_pairs(spec["data"], spec["format"], ours_tokenizer,
                                            spec["pairs"], B)
    num_pairs = len(examples)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    args = dpo_config(
        Path(spec["workdir"]) / "trl", activation_checkpointing=False, seed=spec["seed"],
        use_cpu=not cuda, bf16=cuda, per_device_train_batch_size=B,
        max_steps=W + spec["repeats"] * k, learning_rate=spec["lr"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"],
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=spec["max_grad_norm"], optim="adamw_torch_fused" if cuda else "adamw_torch",
        beta=spec["beta"], max_length=None, padding_free=False, precompute_ref_batch_size=B)
    trainer_started = time.perf_counter()
    trainer = recording_trainer(
        sequential=True, model=spec["model"], args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list([trl_record(p) for p in preferences]))
    trainer_init_s = time.perf_counter() - trainer_started
    processed = trainer.train_dataset
    trl_ids = [tuple(processed[i][f"{part}_ids"] for part in ("prompt", "chosen", "rejected"))
               for i in range(num_pairs)]
    agree, reasons, reason_examples = token_agreement(trl_ids, examples, ours_tokenizer,
                                                      tokenizer.convert_ids_to_tokens)

    # The first step's per-pair policy log-probs through TRL's own forward (the one its
    # training step runs), on TRL's first batch and on our token ids of the same pairs.
    def first_batch_logps(records: list[dict[str, Any]]) -> list[list[float]]:
        inputs = trainer._prepare_inputs(trainer.data_collator(records))
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
        return [[float(c), float(r)] for c, r in zip(chosen.tolist(), rejected.tolist())]

    first = step_positions(0, num_pairs, B)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    ready = dict(
        num_pairs=num_pairs, agree=agree, reasons=reasons, reason_examples=reason_examples,
        first_logps=first_batch_logps([processed[i] for i in first]),
        ours_tokens_first_logps=first_batch_logps(
            [dict(zip(keys, our_ids(examples[i]))) for i in first]),
        reference_logps=[[float(processed[i]["ref_chosen_logps"]),
                          float(processed[i]["ref_rejected_logps"])] for i in range(num_pairs)])

    def step_tokens(step: int) -> int:
        """Non-padding tokens of step `step`, checking from its batch's shape that TRL's step
        holds the pairs every contender's does."""
        positions = step_positions(step, num_pairs, B)
        longest = max(len(trl_ids[i][0]) + max(map(len, trl_ids[i][1:])) for i in positions)
        multiple = trainer.args.pad_to_multiple_of
        expected = (2 * B, round_up(longest, multiple) if isinstance(multiple, int) else longest)
        if trainer.shapes[step] != expected:
            raise RuntimeError(f"TRL's step {step} batch has shape {trainer.shapes[step]}, not "
                               f"{expected} of pairs {positions[0]}..{positions[-1]}")
        return sum(2 * len(trl_ids[i][0]) + len(trl_ids[i][1]) + len(trl_ids[i][2])
                   for i in positions)

    memory = PeakMemory(device)

    def after_step(step: int) -> None:
        """After the warm-up and after every K timed steps: report, then wait for the driver."""
        if step == W:
            connection.send(dict(
                ready, event="ready", setup_s=time.perf_counter() - started,
                trainer_init_s=trainer_init_s,
                warmup_losses=[float(x) for x in trainer.losses],
                settings={**trl_settings(trainer),
                          "optimizer": optimizer_settings(trainer.optimizer),
                          "scheduler": type(trainer.lr_scheduler).__name__}))
        elif step > W and (step - W) % k == 0:
            done = range(step - k, step)
            connection.send(dict(
                event="round", seconds=timer.seconds[-k:], pairs=k * B,
                tokens=sum(map(step_tokens, done)),
                row_tokens=sum(math.prod(trainer.shapes[s]) for s in done),
                losses=[float(trainer.losses[s]) for s in done],
                peak_memory_gib=memory.gib()))
        else:
            return
        if connection.recv() == "run":
            memory.reset()

    timer = step_clock(device, after_step)
    trainer.add_callback(timer)
    trainer.train()


def step_batches(examples: list[Example], layout: str, packing_length: str, row_multiple: int,
                 pairs_per_step: int) -> list[Batch]:
    """Each step's micro-batch, holding exactly the step's pairs, collated by the trainer's
    loader: unpacked, a row per document padded to the longest; packed, one row of the step's
    tokens rounded up ("step"), or the step's pairs packed best-fit into rows of a fixed
    length (as many rows in every step: the most any step needs)."""
    steps = [step_positions(s, len(examples), pairs_per_step)
             for s in range(len(examples) // pairs_per_step)]
    tokens = [sum(example_length(examples[p], layout) for p in positions) for positions in steps]
    packed, one_row = is_packed(layout), is_packed(layout) and packing_length == "step"
    length = round_up(max(tokens), row_multiple) if packing_length == "step" \
        else int(packing_length)

    def loader(rows: int) -> PreferenceLoader:
        return PreferenceLoader(examples, layout, rows, shuffle=False, prefetch=0,
                                packing_length=length if packed else 0,
                                pad_multiple=row_multiple)

    rows_per_step = [[positions] if one_row else loader(2 * pairs_per_step).pack(positions)
                     for positions in steps]
    collating = loader(max(map(len, rows_per_step)))
    return [collating.build(rows, round_up(n, row_multiple) if one_row else None)
            for rows, n in zip(rows_per_step, tokens)]


def run_ours(spec: dict[str, Any], layout: str, connection) -> None:
    started = time.perf_counter()
    from prefixdpo.model.executor import choose_executor
    from prefixdpo.train.build import ModelSource
    from prefixdpo.train.config import OptimSection, ReferenceSection, TrainSection
    from prefixdpo.train.distributed import setup
    from prefixdpo.train.forward import attention_masks, batch_sequence_log_probs
    from prefixdpo.train.losses import LossConfig, LossState
    from prefixdpo.train.parallelize import reshard
    from prefixdpo.train.setup import build_training

    env = setup(spec["device"])
    device, cuda = env.device, env.device.type == "cuda"
    executor = choose_executor("auto", device)
    B, k, W = spec["pairs_per_step"], spec["steps"], spec["warmup_steps"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    _, examples, _ = select_pairs(spec["data"], spec["format"], tokenizer, spec["pairs"], B)
    source = ModelSource(ModelConfig.from_file(Path(spec["model"])), Path(spec["model"]), None,
                         spec["seed"])
    optim = OptimSection(lr=spec["lr"], weight_decay=0.0, betas=tuple(spec["betas"]),
                         eps=spec["eps"], schedule="constant", warmup_steps=0,
                         max_grad_norm=spec["max_grad_norm"])
    # The reference table of the initial weights is cached in the work folder: the first
    # prefixdpo worker computes it, the next ones load it.
    workdir = Path(spec["workdir"])
    training = build_training(
        source, env, executor,
        train=TrainSection(output_dir=str(workdir / f"ours-{layout}"), micro_batch_size=4,
                           compile=cuda and spec["compile"]),
        optim=optim, loss=LossConfig(type=("sigmoid",), beta=spec["beta"]),
        reference=ReferenceSection(mode="precomputed", cache_dir=str(workdir / "reference")),
        examples=examples)
    batches = step_batches(examples, layout, spec["packing_length"], executor.row_multiple, B)
    steps = [StepBatches.single_process([batch]) for batch in batches]

    # The first step's per-pair policy log-probs (initial weights), in this layout.
    first = batches[0].to(device)
    with torch.no_grad():
        logps, _ = batch_sequence_log_probs(training.model, first,
                                            attention_masks(first, source.config, executor))
    reshard(training.model)
    by_pair = {int(p): [float(logps[c]), float(logps[r])] for p, c, r in zip(
        first.pair_ids.tolist(), first.chosen_sequence.tolist(),
        first.rejected_sequence.tolist())}
    table = training.reference.table.detach().double().cpu()
    offsets = Numbering(examples).sequence_offsets
    reference_logps = [[float(table[offset + c]) for c in example.pairs[0]]
                       for offset, example in zip(offsets.tolist(), examples)]
    loss_state = LossState()

    def step(s: int):
        nonlocal loss_state
        start = clock(device)
        result, loss_state = training.step(steps[s % len(steps)], loss_state)
        return result, clock(device) - start, batches[s % len(steps)].input_ids.numel()

    warmup_losses = [step(s)[0].loss for s in range(W)]
    one_row = is_packed(layout) and spec["packing_length"] == "step"
    settings = {
        "layout": layout,
        "packing": (spec["packing_length"] if is_packed(layout) else "none")
        + (" (one row per step, its tokens rounded up)" if one_row else ""),
        "row_multiple": executor.row_multiple, "compiled_layers": cuda and spec["compile"],
        "attention": "FlexAttention" if executor.name == "flex" else
        f"{executor.name} executor (scaled_dot_product_attention)",
        "mixed_precision": "bfloat16 compute, float32 parameters" if cuda else "none (float32)",
        "reference": "precomputed table (train.setup.build_training)",
        "optimizer": optimizer_settings(training.optimizer), "loss": "sigmoid",
        "beta": spec["beta"], "max_grad_norm": optim.max_grad_norm,
        "torch_threads": torch.get_num_threads(), "grad_accum": 1}
    connection.send(dict(event="ready", setup_s=time.perf_counter() - started,
                         settings=settings, warmup_losses=warmup_losses,
                         num_pairs=len(examples), reference_logps=reference_logps,
                         first_logps=[by_pair[i] for i in step_positions(0, len(examples), B)]))
    memory = PeakMemory(device)
    for s in range(W, sys.maxsize, k):
        if connection.recv() != "run":
            return
        memory.reset()
        graphs_before = compile_counts()["graphs"]
        results, seconds, cells = zip(*(step(s + i) for i in range(k)))
        connection.send(dict(event="round", seconds=list(seconds),
                             pairs=sum(r.num_pairs for r in results),
                             tokens=sum(r.num_tokens for r in results), row_tokens=sum(cells),
                             losses=[r.loss for r in results], peak_memory_gib=memory.gib(),
                             graphs_compiled=compile_counts()["graphs"] - graphs_before))


class Contender:
    """One contender's process (`worker`), driven over a pipe."""

    def __init__(self, name: str, role: str, spec: dict[str, Any], workdir: Path):
        context = multiprocessing.get_context("spawn")  # a fresh process: its own allocator
        self.name, self.log_path = name, workdir / f"{role.replace('+', '_')}.log"
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=worker,
                                       args=(role, spec, theirs, str(self.log_path)))
        self.process.start()
        theirs.close()  # so that receiving from a dead worker ends

    def receive(self) -> dict[str, Any]:
        try:
            message = self.connection.recv()
        except EOFError:
            self.process.join()
            raise SystemExit(f"vs_trl.py: {self.name} worker exited ({self.process.exitcode}) "
                             f"without a reply; its log ends:\n{self.log_tail()}") from None
        if message["event"] == "error":
            raise SystemExit(f"vs_trl.py: {self.name} worker failed: {message['message']}\n"
                             f"{message['traceback']}\nits log ends:\n{self.log_tail()}")
        return message

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.connection.send("stop")
        self.process.join(timeout=120)
        if self.process.exitcode != 0:
            raise SystemExit(f"vs_trl.py: {self.name} worker exited ({self.process.exitcode}) "
                             f"at the end; its log ends:\n{self.log_tail()}")

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---- driver --------------------------------------------------------------------------------


def train_tiny_tokenizer(preferences: Sequence[Preference], out: Path) -> Path:
    """A byte-level BPE (GPT-2's kind, as SmolLM2's) of TINY_VOCAB ids trained on the pairs."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = [text if isinstance(text, str) else " ".join(m["content"] for m in text)
             for p in preferences for text in (p.groups[0].prompt, *p.groups[0].completions)]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT, "add_bos_token": False, "model_max_length": 1 << 30}))
    return out


def prepare_model(model: str | None, tiny: bool, seed: int, tokenizer: Tokenizer,
                  tokenizer_dir: Path, workdir: Path) -> tuple[Path, ModelConfig, str]:
    """The model folder both trainers load (`model`, or a random one written there), its
    config and a description."""
    if model:
        config = ModelConfig.from_file(Path(model))
        return Path(model), config, f"{model} ({config.num_params / 1e6:.1f}M parameters)"
    from prefixdpo.model.hf_checkpoint import save_hf_checkpoint
    from prefixdpo.model.transformer import build_model

    fields = dict(TINY_MODEL if tiny else SMOLLM_135M)
    fields["vocab_size"] = max(0 if tiny else fields["vocab_size"], tokenizer.vocab_size)
    config = ModelConfig.from_hf_dict(fields, source="tiny preset" if tiny
                                      else "SmolLM-135M shape")
    save_hf_checkpoint(build_model(config, "cpu", seed=seed).state_dict(), config,
                       workdir / "model", tokenizer_dir=tokenizer_dir)
    name = "tiny (2 layers, hidden size 64)" if tiny else \
        "SmolLM-135M shape (30 layers, hidden size 576, 9/3 heads, tied embeddings)"
    return workdir / "model", config, (f"{name}, vocabulary {config.vocab_size}, random init "
                                       f"(seed {seed}), {config.num_params / 1e6:.1f}M parameters")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help=f"CI run: {TINY}, a tiny model and a "
                   "byte-level tokenizer trained on the pairs (explicit flags still win)")
    p.add_argument("--model", help="a Hugging Face model folder (config.json + safetensors "
                   "[+ tokenizer]); default: a random SmolLM-135M-shaped model")
    p.add_argument("--tokenizer", help="a tokenizer folder; default: the model's, else "
                   f"{DEFAULT_TOKENIZER.relative_to(ROOT)}")
    p.add_argument("--data", nargs="+", help="preference files (text or conversational "
                   f"formats); default {DEFAULT_DATA.relative_to(ROOT)}")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--pairs", type=int, help="use the first N usable pairs (default: exactly "
                   "the pairs the steps use, each once)")
    p.add_argument("--pairs-per-step", type=int, help="pairs per optimizer step (default 8)")
    p.add_argument("--steps", type=int, help="timed steps per contender and round (default 4)")
    p.add_argument("--repeats", type=int, help="rounds (default 3)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 1 on CPU, "
                   "3 on CUDA)")
    p.add_argument("--layouts", default="shared+packed,paired",
                   help=f"prefixdpo layouts, comma-separated, from {LAYOUTS}")
    p.add_argument("--packing-length", default="step", help="packed layouts: 'step' (each "
                   "step's pairs in one row, its length rounded up) or a row length")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: bfloat16 compute in both")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="CUDA: do not compile prefixdpo's layers (TRL is not compiled)")
    p.add_argument("--one-at-a-time", action="store_true", help="run each contender alone "
                   "(set up, its rounds, exit) rather than all at once, interleaved: for a "
                   "machine whose memory cannot hold them together")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every setting and figure to this file")
    args = p.parse_args(argv)
    defaults = dict(TINY) if args.tiny else dict(
        pairs=None, pairs_per_step=8, steps=4, repeats=3,
        warmup_steps=3 if args.device == "cuda" else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if unknown := [layout for layout in args.layouts if layout not in LAYOUTS]:
        p.error(f"--layouts: unknown layout {unknown[0]!r}; expected some of {LAYOUTS}")
    if args.packing_length != "step" and not args.packing_length.isdigit():
        p.error("--packing-length: 'step' or a number of tokens")
    if min(args.pairs_per_step, args.steps, args.repeats, args.warmup_steps) < 1:
        p.error("--pairs-per-step, --steps, --repeats and --warmup-steps must be >= 1 (the "
                "first, untimed step is the one whose numbers are checked)")
    if args.pairs is None:
        args.pairs = args.pairs_per_step * (args.warmup_steps + args.repeats * args.steps)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    exit_without_trl("vs_trl.py", missing_packages())
    quiet_environment()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        return drive(args, Path(tmp))


def drive(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    files = args.data or [str(DEFAULT_DATA)]
    if args.tiny and not args.tokenizer:
        read, _ = read_preferences(files, args.format, args.pairs)
        tokenizer_dir = train_tiny_tokenizer([p for _, p in read], workdir / "tokenizer")
        tokenizer_note = (f"byte-level BPE of {TINY_VOCAB} ids trained on the {len(read)} "
                          "pairs (tiny mode)")
    else:
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else \
            Path(args.model) if args.model and (Path(args.model) / "tokenizer.json").is_file() \
            else DEFAULT_TOKENIZER
        tokenizer_note = str(tokenizer_dir) + (
            " (Mistral 7B v0.1 SentencePiece, shipped in assets/: the SmolLM2 tokenizer is "
            "not)" if tokenizer_dir == DEFAULT_TOKENIZER else "")
    tokenizer = load_tokenizer(tokenizer_dir)
    preferences, examples, skipped = select_pairs(files, args.format, tokenizer, args.pairs,
                                                  args.pairs_per_step)
    model_dir, config, model_note = prepare_model(args.model, args.tiny, args.seed, tokenizer,
                                                  tokenizer_dir, workdir)
    largest = max(max(max(ids) for ids in our_ids(e)) for e in examples)
    if largest >= config.vocab_size:
        raise SystemExit(f"vs_trl.py: token id {largest} >= the model's vocab_size "
                         f"{config.vocab_size}: use a tokenizer the model covers")
    num_pairs, B, k, R, W = (len(examples), args.pairs_per_step, args.steps, args.repeats,
                             args.warmup_steps)
    spec = {**vars(args), "data": [str(f) for f in files], "pairs": num_pairs,
            "model": str(model_dir), "tokenizer": str(tokenizer_dir), "workdir": str(workdir),
            "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": 1.0, "beta": 0.1}
    paired_tokens = sum(e.num_paired_tokens for e in examples)
    shared_tokens = sum(e.num_shared_tokens for e in examples)

    env_info = environment(torch.device(args.device))
    print(f"prefixdpo vs TRL DPOTrainer, {env_info['date']}, commit {env_info['commit']}"
          f"{' (uncommitted changes)' if env_info['uncommitted_changes'] else ''}")
    print(f"device: {args.device} ({env_info['device']}), torch {torch.__version__}, "
          f"compute {dtype}")
    print(f"model: {model_note}\ntokenizer: {tokenizer_note}")
    print(f"data: {', '.join(map(str, files))}: {num_pairs} pairs" + (
        f" ({sum(skipped.values())} rows left out: "
        + "; ".join(f"{n} {why}" for why, n in skipped.most_common()) + ")" if skipped else ""))
    print(f"work: {B} pairs per optimizer step (one micro-batch), {W} warm-up step(s), then "
          f"{R} rounds x {k} timed steps per contender, "
          f"{'one contender at a time' if args.one_at_a_time else 'interleaved'}; step s takes "
          f"pairs (s mod {num_pairs // B}) x {B} ..; token ratio of the pairs (paired / "
          f"shared, our tokens): {paired_tokens / shared_tokens:.3f}")
    print(f"same in both: {dtype}, sigmoid loss beta {spec['beta']}, AdamW lr {args.lr} "
          f"betas {tuple(spec['betas'])} eps {spec['eps']} weight decay 0, constant lr without "
          f"warmup, max grad norm {spec['max_grad_norm']}, reference log-probs precomputed, "
          "no activation checkpointing, no truncation, no gradient accumulation")

    roles = {"TRL": "trl", **{f"prefixdpo {layout}": layout for layout in args.layouts}}
    names = list(roles)
    # Set up, then run, one group at a time: each contender alone, or all of them together,
    # interleaved. The first prefixdpo layout computes the reference table the others load.
    groups = [[name] for name in [*names[1:], "TRL"]] if args.one_at_a_time else [names]
    contenders: dict[str, Contender] = {}
    ready: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {name: [] for name in names}

    def start(group: list[str]) -> None:
        for name in group:
            contenders[name] = Contender(name, roles[name], spec, workdir)

    def wait(group: list[str]) -> None:
        for name in group:
            ready[name] = contenders[name].receive()
            print(f"  {name} ready after {ready[name]['setup_s']:.1f} s", flush=True)

    try:
        for group in groups:
            print(f"setting up {', '.join(group)} (not timed) ...", flush=True)
            later = [name for name in group if name not in ("TRL", names[1])]
            start([name for name in group if name not in later])
            wait([name for name in group if name == names[1]])  # then the table exists
            start(later)
            wait([name for name in group if name not in ready])
            for r in range(R):
                for name in group:
                    contenders[name].connection.send("run")
                    rounds[name].append(message := contenders[name].receive())
                    print(f"round {r + 1}/{R}: {name}: {np.mean(message['seconds']):.3f} "
                          "s/step", flush=True)
            for name in group:
                contenders[name].stop()
    finally:
        for contender in contenders.values():
            contender.close()
    ready = {name: ready[name] for name in names}  # the report's order
    report = analyze(args, dtype, ready, rounds, env_info, spec, model_note, tokenizer_note,
                     files, skipped, paired_tokens, shared_tokens)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if report["failed_checks"]:
        raise SystemExit(f"vs_trl.py: checks failed: {'; '.join(report['failed_checks'])}")
    return report


def relative_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                         mask: Sequence[bool] | None = None) -> list[float]:
    return [abs(u - v) / max(abs(v), 1e-12) for i, (x, y) in enumerate(zip(a, b))
            if mask is None or mask[i] for u, v in zip(x, y)]


def analyze(args, dtype, ready, rounds, env_info, spec, model_note, tokenizer_note, files,
            skipped, paired_tokens, shared_tokens) -> dict[str, Any]:
    """Print the settings, the checks and the times; the report of them all."""
    trl = ready["TRL"]
    ours_names = [name for name in ready if name != "TRL"]
    B = spec["pairs_per_step"]
    failed: list[str] = []
    loss_atol, logp_rtol = LOSS_ATOL[dtype], LOGP_RTOL[dtype]

    def check(what: str, value: float, tolerance: float, shown: str) -> None:
        print(f"    {shown} {'ok' if value <= tolerance else 'FAILED'}")
        if value > tolerance:
            failed.append(f"{what}: {value:.2e} > {tolerance:g}")

    print("\nsettings:")
    for name, message in ready.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in message["settings"].items()))

    print("\nchecks:")
    agree = trl["agree"]
    share = sum(agree) / len(agree)
    print(f"  token ids (prompt, chosen, rejected) identical in TRL's processed dataset and "
          f"ours: {sum(agree)}/{len(agree)} pairs ({share:.1%})")
    for reason, count in sorted(trl["reasons"].items(), key=lambda kv: -kv[1]):
        print(f"    {count} pairs: {reason}\n      e.g. {trl['reason_examples'][reason]}")
    step1 = {name: message["warmup_losses"][0] for name, message in ready.items()}
    print(f"  step-1 loss (policy = reference, expected ln 2 = {LN2:.6f}, tolerance "
          f"{loss_atol:g}):")
    for name, loss in step1.items():
        check(f"{name} step-1 loss", abs(loss - LN2), loss_atol,
              f"{name}: {loss:.7f} (|loss - ln 2| = {abs(loss - LN2):.2e})")
    first_agree = agree[:B]
    logp_checks: dict[str, Any] = {}
    print(f"  first-step policy log-probs, relative difference to TRL (tolerance "
          f"{logp_rtol:g}):")
    for name in ours_names:
        ours = ready[name]
        compared = {  # key: (label, relative differences, pairs)
            "same_tokens": ("TRL's forward on our token ids (first batch)", relative_differences(
                trl["ours_tokens_first_logps"], ours["first_logps"]), B),
            "own_tokens_where_agree": (
                "each trainer's own tokens, pairs that agree (first batch)",
                relative_differences(trl["first_logps"], ours["first_logps"], first_agree),
                sum(first_agree)),
            "reference_where_agree": ("reference log-probs, pairs that agree (all)",
                                      relative_differences(trl["reference_logps"],
                                                           ours["reference_logps"], agree),
                                      sum(agree))}
        logp_checks[name] = {key: {"pairs": pairs, "max_rel_diff": max(values, default=None)}
                             for key, (_, values, pairs) in compared.items()}
        for label, values, pairs in compared.values():
            if values:
                check(f"{name}: {label}", max(values), logp_rtol,
                      f"{name}: {label}: {pairs} pairs, max {max(values):.2e}")
            else:
                print(f"    {name}: {label}: no pairs")

    # Not a check (AdamW's first updates amplify rounding differences), but shows that the
    # trainings stay together: every step's loss against TRL's, on the same pairs.
    losses = {name: ready[name]["warmup_losses"] + [x for m in rounds[name] for x in m["losses"]]
              for name in ready}
    loss_gaps = {name: max(abs(a - b) for a, b in zip(losses[name], losses["TRL"]))
                 for name in ours_names}
    print(f"  loss of every step ({len(losses['TRL'])}) against TRL's, max |difference| "
          "(information): " + ", ".join(f"{name} {gap:.2e}" for name, gap in loss_gaps.items()))

    contenders: dict[str, dict] = {}
    for name, messages in rounds.items():
        seconds = [s for m in messages for s in m["seconds"]]
        pairs, tokens, row_tokens = (sum(m[key] for m in messages)
                                     for key in ("pairs", "tokens", "row_tokens"))
        total = sum(seconds)
        contenders[name] = {
            "steps": len(seconds), "pairs": pairs, "tokens": tokens, "row_tokens": row_tokens,
            "seconds": total, "s_per_step": total / len(seconds),
            "median_s_per_step": float(np.median(seconds)),
            "round_s_per_step": [float(np.mean(m["seconds"])) for m in messages],
            "pairs_per_s": pairs / total, "tokens_per_s": tokens / total,
            "padding_fraction": 1.0 - tokens / row_tokens,
            "peak_memory_gib": max(m["peak_memory_gib"] for m in messages),
            "graphs_compiled_in_timed_steps": sum(m.get("graphs_compiled", 0)
                                                  for m in messages),
            "losses": [x for m in messages for x in m["losses"]],
            "warmup_losses": ready[name]["warmup_losses"], "setup_s": ready[name]["setup_s"],
            "settings": ready[name]["settings"]}
    base = contenders["TRL"]
    for c in contenders.values():
        c["speedup_vs_trl"] = c["pairs_per_s"] / base["pairs_per_s"]
        c["round_speedup_vs_trl"] = [t / s for s, t in zip(c["round_s_per_step"],
                                                            base["round_s_per_step"])]
        c["memory_vs_trl"] = c["peak_memory_gib"] / base["peak_memory_gib"]
    memory = "peak GiB" if args.device == "cuda" else "peak RSS GiB"
    print(f"\ntimed: {spec['repeats']} rounds x {spec['steps']} steps per contender "
          f"({memory}: the peak of the timed steps, each contender in its own process)")
    print(f"{'contender':<26}{'s/step':>9}{'median':>9}{'pairs/s':>9}{'tokens/s':>10}"
          f"{'tok/step':>9}{'pad':>7}{memory:>13}{'x TRL':>7}{'rounds x TRL':>16}")
    for name, c in contenders.items():
        spread = "-" if name == "TRL" else \
            f"{min(c['round_speedup_vs_trl']):.2f}-{max(c['round_speedup_vs_trl']):.2f}"
        print(f"{name:<26}{c['s_per_step']:>9.3f}{c['median_s_per_step']:>9.3f}"
              f"{c['pairs_per_s']:>9.3g}{c['tokens_per_s']:>10.0f}"
              f"{c['tokens'] / c['steps']:>9.0f}{c['padding_fraction']:>7.1%}"
              f"{c['peak_memory_gib']:>13.2f}{c['speedup_vs_trl']:>7.2f}{spread:>16}")
    print("(x TRL: pairs/s over TRL's; tokens are each trainer's non-padding tokens: the shared "
          "layouts hold each prompt once)")
    if args.device == "cuda":
        print("prefixdpo graphs compiled during the timed steps: " + (", ".join(
            f"{name} {c['graphs_compiled_in_timed_steps']}" for name, c in contenders.items()
            if c["graphs_compiled_in_timed_steps"]) or "none"))
    if failed:
        print("\nFAILED checks:\n  " + "\n  ".join(failed))
    return {"environment": {**env_info, **{key: trl["settings"][key] for key in (
                "trl", "transformers", "accelerate", "datasets")}},
            "args": vars(args), "model": model_note, "tokenizer": tokenizer_note,
            "data": {"files": [str(f) for f in files], "num_pairs": trl["num_pairs"],
                     "skipped": dict(skipped), "paired_tokens": paired_tokens,
                     "shared_tokens": shared_tokens,
                     "token_ratio": paired_tokens / shared_tokens},
            "settings": {"compute_dtype": dtype, **{key: spec[key] for key in (
                "pairs_per_step", "steps", "repeats", "warmup_steps", "lr", "betas", "eps",
                "max_grad_norm", "beta", "seed", "packing_length")}},
            "checks": {"token_agreement_share": share, "agreeing_pairs": sum(agree),
                       "pairs": len(agree), "disagreement_reasons": trl["reasons"],
                       "disagreement_examples": trl["reason_examples"],
                       "step1_loss": step1, "loss_tolerance": loss_atol,
                       "logp_tolerance": logp_rtol, "logps": logp_checks,
                       "max_loss_difference_to_trl": loss_gaps},
            "contenders": contenders, "failed_checks": failed}


if __name__ == "__main__":
    main()

"""prefixdpo against TRL's DPOTrainer: the same DPO training, timed in one run, numbers checked.

    python benchmarks/vs_trl.py [--tiny] [--model DIR] [--tokenizer DIR] [--data FILE ...]
        [--pairs N] [--pairs-per-step B] [--steps K] [--repeats R] [--warmup-steps W]
        [--layouts shared+packed,paired] [--packing-length step|L] [--device cpu|cuda]
        [--one-at-a-time] [--lr LR] [--seed S] [--no-compile] [--json OUT]

Needs TRL, an optional extra: `pip install -e ".[bench]"`.

Same work in every contender:
- the same model: a random initialization (`--seed`) of the SmolLM-135M shape (the SmolLM2-135M
  architecture: 30 layers, hidden size 576, GQA 9/3 heads, tied embeddings, vocabulary 49,152,
  raised to the tokenizer's when that is larger), written once as a Hugging Face folder with
  `model.hf_checkpoint.save_hf_checkpoint` and loaded by both: TRL through
  `AutoModelForCausalLM` (what `DPOTrainer(model=path)` does), prefixdpo with
  `model.hf_checkpoint.load_weights`; or any Hugging Face folder with `--model`;
- the same pairs, in the same order: the first N usable pairs of the data (default: the
  HH-RLHF helpful-base test slice shipped in assets/; pairs whose chosen and rejected prompts
  differ are left out, since TRL's format has one prompt per pair), given to TRL as
  prompt/chosen/rejected text (or messages) and tokenized by each trainer its own way;
- the same optimizer steps: B pairs per step in one micro-batch (no gradient accumulation), step
  s taking pairs (s mod N/B) * B ..; TRL's sampler is made sequential for this;
- the same precision (float32 on CPU; on CUDA float32 weights computed in bfloat16: TRL's
  `bf16=True` autocast, prefixdpo's FSDP2 mixed precision), loss (sigmoid, beta 0.1), AdamW
  (same lr, betas, eps, weight decay 0; torch's implementation in both, fused on CUDA),
  constant learning rate without warmup, the same gradient clipping; no activation checkpointing
  in either (TRL's default turns it on: it is turned off here so both do the same work); no
  truncation (TRL `max_length=None`);
- reference log-probs precomputed before training in both (TRL `precompute_ref_log_probs=True`;
  prefixdpo's table as the trainer makes it), so the policy step is what is timed.

prefixdpo is set up by the trainer's own `train.setup.build_training` (model, parallelization,
reference table, optimizer), steps with `Training.step`, and its batches come from the
trainer's loader (`PreferenceLoader.pack` and `build`), each holding exactly its step's pairs.

Timing. Each contender (TRL, and prefixdpo in each `--layouts` layout) runs in its own worker
process, started by this script and driven over a pipe, so that their memory can be measured
apart and none inherits another's allocator state. All are set up first (tokenization, model,
reference pass; not timed), run `--warmup-steps` untimed steps, then R rounds interleave them:
in each round TRL runs K steps, then each prefixdpo layout K steps, while the others wait.
With `--one-at-a-time` (a machine that cannot hold every worker at once), each contender is
set up, runs its R rounds and exits before the next starts: no interleaving, so a drift of the
machine's speed during the run goes into the ratios. A
step's time is a full optimizer step without data loading: for TRL from `on_step_begin` to
`on_step_end` of a `TrainerCallback` (forward, backward, its metrics, clipping, AdamW, scheduler,
zero_grad; the batch is already collated by TRL's `DataCollatorForPreference`); for prefixdpo
one `Training.step` call on a batch collated beforehand. On CUDA both synchronize before
reading the clock.

Memory: the peak during the timed steps of each process, reset at the start of every round
(`measure.PeakMemory`: CUDA's allocated memory, the CPU's resident set). It includes each
process's own libraries, data and weights.

Checks, printed before the times: the step-1 loss is ln 2 in every contender (policy equals
reference); the token ids of each pair's prompt, chosen and rejected sequences in TRL's
processed dataset equal ours (share printed, and the reason for each other pair: BOS, EOS, or
where the prompt/completion boundary is tokenized); the first step's per-pair policy log-probs
equal to `LOGP_RTOL` relative: TRL's (`DPOTrainer.compute_ref_log_probs`, the same forward as
its training step, on the first batch) against ours (`train.forward.batch_sequence_log_probs`)
where the tokens agree, and TRL's forward on OUR token ids for every pair of the first batch,
which compares the models whatever the tokenizations; and the reference log-probs of all pairs
where the tokens agree. A failed check exits with status 1 after the report.

`--tiny` (for CI, well under a minute on 2 cores): 8 pairs, 4 per step, 1 warm-up step and 2
rounds of 1 step, a 2-layer model, and a byte-level BPE tokenizer of 512 ids trained on those
pairs (the SmolLM2 tokenizer's kind, so that the tiny vocabulary covers it).

The script is longer than the project's usual ~500 lines because it is one runnable file: the
data selection shared by all processes, the two workers, the driver and the report.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
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
PROTOCOL = "@@vs_trl@@ "  # prefix of the workers' messages on their stdout
LN2 = math.log(2.0)
# Tolerances: float32 (CPU) / bfloat16 compute (CUDA).
LOSS_ATOL = {"float32": 1e-5, "bfloat16": 5e-2}
LOGP_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}

# The SmolLM-135M architecture (HuggingFaceTB/SmolLM-135M-Instruct config.json; SmolLM2-135M has
# the same shape), so that the default needs no file.
SMOLLM_135M: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=True, vocab_size=49152, max_position_embeddings=2048,
    initializer_range=0.02, attention_bias=False, mlp_bias=False, bos_token_id=1,
    eos_token_id=2)
TINY_MODEL: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling=None, tie_word_embeddings=True, vocab_size=512,
    max_position_embeddings=8192, initializer_range=0.02, attention_bias=False, mlp_bias=False)
TINY = dict(pairs=8, pairs_per_step=4, steps=1, repeats=2, warmup_steps=1)
TINY_VOCAB = 512
END_OF_TEXT = "<|endoftext|>"


# ---- data: the same selection in every process ---------------------------------------------


def read_preferences(files: Sequence[str], fmt: str, max_pairs: int
                     ) -> tuple[list[tuple[int, Preference]], collections.Counter]:
    """The first `max_pairs` (0: all) usable pairs of the files, and why others were left out."""
    out: list[tuple[int, Preference]] = []
    skipped: collections.Counter = collections.Counter()
    index = 0
    for file in files:
        for row in read_rows(file):
            index += 1
            try:
                if row.error is not None:
                    raise RowError(row.location, row.error)
                if fmt == "auto":
                    fmt = detect_format(row.value, row.location)
                preference = parse_record(row.value, row.location, fmt)
            except RowError as e:
                skipped[e.reason.split(";")[0].split(" (")[0]] += 1
                continue
            if preference.kind == IDS:
                raise SystemExit("vs_trl.py: pre-tokenized data cannot be compared: TRL "
                                 "tokenizes text itself; give text or conversational data")
            if len(preference.groups) != 1 or len(preference.pairs) != 1:
                skipped["chosen and rejected prompts differ (TRL has one prompt per pair)"] += 1
                continue
            out.append((index - 1, preference))
            if max_pairs and len(out) >= max_pairs:
                return out, skipped
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
    group = preference.groups[0]
    chosen, rejected = preference.pairs[0]
    if preference.kind == CHAT:
        def messages(ms): return [dict(m) for m in ms]
        return {"prompt": messages(group.prompt), "chosen": messages(group.completions[chosen]),
                "rejected": messages(group.completions[rejected])}
    return {"prompt": group.prompt, "chosen": group.completions[chosen],
            "rejected": group.completions[rejected]}


def our_ids(example: Example) -> tuple[list[int], list[int], list[int]]:
    group = example.groups[0]
    chosen, rejected = example.pairs[0]
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


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- worker side: the pipe -----------------------------------------------------------------


def compute_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


class Channel:
    """A worker's messages to the driver: JSON lines on the original stdout; everything else
    the process prints (libraries included) goes to stderr, the worker's log."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(PROTOCOL + json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def command(self) -> str:
        line = sys.stdin.readline()
        return json.loads(line)["command"] if line else "stop"


def load_spec(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def worker_main(role: str, spec_path: str) -> None:
    channel = Channel()
    try:
        spec = load_spec(spec_path)
        if role == "trl":
            run_trl(spec, channel)
        else:
            run_ours(spec, role, channel)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which stops the run
        channel.send("error", message=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc())
        sys.exit(1)


# ---- worker: TRL ---------------------------------------------------------------------------


def run_trl(spec: dict[str, Any], channel: Channel) -> None:
    started = time.perf_counter()
    import datasets
    import transformers
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    B, k, W = spec["pairs_per_step"], spec["steps"], spec["warmup_steps"]
    total_steps = W + spec["repeats"] * k
    ours_tokenizer = load_tokenizer(spec["tokenizer"])
    preferences, examples, _ = select_pairs(spec["data"], spec["format"], ours_tokenizer,
                                            spec["pairs"], B)
    num_pairs = len(examples)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])

    class SequentialDPOTrainer(DPOTrainer):
        """TRL's trainer with the pairs in order (so every contender's step s holds the same
        pairs), recording each step's loss and batch shape (no synchronization)."""

        losses: list[torch.Tensor] = []
        shapes: list[tuple[int, ...]] = []

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None
                                     else train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.shapes.append(tuple(inputs["input_ids"].shape))
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.detach())
            return loss

    # Activation checkpointing off (TRL's default is on); transformers 5 renamed the field.
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in
                        DPOConfig.__dataclass_fields__ else "gradient_checkpointing": False}
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl"), report_to="none", save_strategy="no",
        disable_tqdm=True, seed=spec["seed"], use_cpu=not cuda, bf16=cuda, fp16=False,
        per_device_train_batch_size=B, gradient_accumulation_steps=1, max_steps=total_steps,
        learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=spec["max_grad_norm"],
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        loss_type=["sigmoid"], beta=spec["beta"], max_length=None, padding_free=False,
        precompute_ref_log_probs=True, precompute_ref_batch_size=B, dataloader_num_workers=0,
        **no_checkpointing)
    dataset = datasets.Dataset.from_list([trl_record(p) for p in preferences])
    trainer_started = time.perf_counter()
    trainer = SequentialDPOTrainer(model=spec["model"], args=args, train_dataset=dataset,
                                   processing_class=tokenizer)
    setup_trainer_s = time.perf_counter() - trainer_started
    processed = trainer.train_dataset

    # Tokens: TRL's processed dataset against ours.
    trl_ids = [(processed[i]["prompt_ids"], processed[i]["chosen_ids"],
                processed[i]["rejected_ids"]) for i in range(num_pairs)]
    reasons = collections.Counter()
    reason_examples: dict[str, str] = {}
    agree = []
    for i, ((tp, tc, tr), (op, oc, orj)) in enumerate(
            zip(trl_ids, (our_ids(e) for e in examples))):
        why = sorted(set(token_differences((tp, tc), (op, oc), ours_tokenizer.bos_id,
                                           ours_tokenizer.eos_id)
                         + token_differences((tp, tr), (op, orj), ours_tokenizer.bos_id,
                                             ours_tokenizer.eos_id)))
        agree.append(not why)
        if why:
            key = "; ".join(why)
            reasons[key] += 1
            if key not in reason_examples:
                trl_seq, our_seq = tp + tc, op + oc
                j = first_difference(trl_seq, our_seq)
                window = slice(max(0, j - 2), j + 3)
                reason_examples[key] = (
                    f"pair {i} (chosen), from token {window.start}: TRL "
                    f"{tokenizer.convert_ids_to_tokens(trl_seq[window])} vs ours "
                    f"{tokenizer.convert_ids_to_tokens(our_seq[window])}")

    # The first step's per-pair policy log-probs, through TRL's own forward (the one its
    # training step runs), on TRL's first batch and on our token ids of the same pairs.
    def first_batch_logps(records: list[dict[str, Any]]) -> list[list[float]]:
        inputs = trainer._prepare_inputs(trainer.data_collator(records))
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
        return [[float(c), float(r)] for c, r in zip(chosen.tolist(), rejected.tolist())]

    first = step_positions(0, num_pairs, B)
    trl_first = first_batch_logps([processed[i] for i in first])
    ours_tokens_first = first_batch_logps([
        dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), our_ids(examples[i])))
        for i in first])
    reference = [[float(processed[i]["ref_chosen_logps"]),
                  float(processed[i]["ref_rejected_logps"])] for i in range(num_pairs)]

    def step_tokens(step: int) -> int:
        """Non-padding tokens of step `step`, checking from its batch's shape that TRL's
        step holds the pairs every contender's does."""
        positions = step_positions(step, num_pairs, B)
        longest = max(len(trl_ids[i][0]) + max(len(trl_ids[i][1]), len(trl_ids[i][2]))
                      for i in positions)
        multiple = trainer.args.pad_to_multiple_of
        expected = (2 * B, round_up(longest, multiple) if isinstance(multiple, int) else longest)
        if tuple(trainer.shapes[step]) != expected:
            raise RuntimeError(f"TRL's step {step} batch has shape {trainer.shapes[step]}, not "
                               f"{expected} of pairs {positions[0]}..{positions[-1]}")
        return sum(2 * len(trl_ids[i][0]) + len(trl_ids[i][1]) + len(trl_ids[i][2])
                   for i in positions)

    model_config = trainer.model.config
    settings = {
        "trl": trl.__version__, "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "accelerate": importlib.import_module("accelerate").__version__,
        "collator": type(trainer.data_collator).__name__,
        "attn_implementation": getattr(model_config, "_attn_implementation", None),
        "model_dtype": str(trainer.model.dtype), "torch_threads": torch.get_num_threads(),
        **{name: _jsonable(getattr(trainer.args, name, "n/a")) for name in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "lr_scheduler_type",
            "warmup_steps", "max_grad_norm", "optim", "bf16", "fp16", "gradient_checkpointing",
            "activation_checkpointing", "beta", "loss_type", "max_length", "truncation_mode",
            "padding_free", "pad_to_multiple_of", "precompute_ref_log_probs",
            "precompute_ref_batch_size", "disable_dropout", "use_liger_kernel",
            "torch_compile")},
    }

    class Rounds(TrainerCallback):
        """Times each optimizer step; after the warm-up and after every K timed steps, reports
        and waits for the driver (the wait is outside any timed step)."""

        def __init__(self):
            self.step_start = 0.0
            self.seconds: list[float] = []
            self.memory = PeakMemory(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = clock(device)

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(clock(device) - self.step_start)
            step = state.global_step  # steps done
            if step == W:
                optimizer = trainer.optimizer
                optimizer = getattr(optimizer, "optimizer", optimizer)
                channel.send(
                    "ready", setup_s=time.perf_counter() - started,
                    trainer_init_s=setup_trainer_s,
                    settings={**settings, "optimizer": _optimizer_settings(optimizer),
                              "scheduler": type(trainer.lr_scheduler).__name__},
                    warmup_losses=[float(x) for x in trainer.losses],
                    num_pairs=num_pairs, agree=agree, reasons=dict(reasons),
                    reason_examples=reason_examples, first_logps=trl_first,
                    ours_tokens_first_logps=ours_tokens_first, reference_logps=reference)
            elif step > W and (step - W) % k == 0:
                done = range(step - k, step)
                channel.send(
                    "round", seconds=self.seconds[-k:], pairs=k * B,
                    tokens=sum(step_tokens(s) for s in done),
                    row_tokens=sum(math.prod(trainer.shapes[s]) for s in done),
                    losses=[float(trainer.losses[s]) for s in done],
                    peak_memory_gib=self.memory.gib())
            else:
                return
            if channel.command() == "run":
                self.memory.reset()

    trainer.add_callback(Rounds())
    trainer.train()
    channel.send("done")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    d = optimizer.defaults
    return {"class": type(optimizer).__name__, "lr": d.get("lr"),
            "betas": list(d.get("betas", ())), "eps": d.get("eps"),
            "weight_decay": sorted({g.get("weight_decay") for g in optimizer.param_groups}),
            "fused": d.get("fused"), "foreach": d.get("foreach")}


# ---- worker: prefixdpo ---------------------------------------------------------------------


def step_batches(examples: list[Example], layout: str, packing_length: str, row_multiple: int,
                 pairs_per_step: int) -> list[Batch]:
    """Each step's micro-batch, holding exactly the step's pairs, collated by the trainer's
    loader: unpacked, a row per document padded to the longest; packed, one row of the step's
    tokens rounded up ("step"), or the step's pairs packed best-fit into rows of a fixed
    length (as many rows in every step: the most any step needs)."""
    steps = [step_positions(s, len(examples), pairs_per_step)
             for s in range(len(examples) // pairs_per_step)]
    tokens = [sum(example_length(examples[p], layout) for p in positions) for positions in steps]
    packed = is_packed(layout)
    length = round_up(max(tokens), row_multiple) if packing_length == "step" \
        else int(packing_length)

    def loader(rows: int) -> PreferenceLoader:
        return PreferenceLoader(examples, layout, rows, shuffle=False, prefetch=0,
                                packing_length=length if packed else 0,
                                pad_multiple=row_multiple)

    rows_per_step = [[positions] if packed and packing_length == "step" else
                     loader(2 * pairs_per_step).pack(positions) for positions in steps]
    collating = loader(max(len(rows) for rows in rows_per_step))
    return [collating.build(rows, round_up(n, row_multiple)
                            if packed and packing_length == "step" else None)
            for rows, n in zip(rows_per_step, tokens)]


def run_ours(spec: dict[str, Any], layout: str, channel: Channel) -> None:
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
    device = env.device
    cuda = device.type == "cuda"
    executor = choose_executor("auto", device)
    B, k, W = spec["pairs_per_step"], spec["steps"], spec["warmup_steps"]
    tokenizer = load_tokenizer(spec["tokenizer"])
    _, examples, _ = select_pairs(spec["data"], spec["format"], tokenizer, spec["pairs"], B)
    num_pairs = len(examples)
    numbering = Numbering(examples)
    model_dir = Path(spec["model"])
    source = ModelSource(ModelConfig.from_file(model_dir), model_dir, None, spec["seed"])
    optim = OptimSection(lr=spec["lr"], weight_decay=0.0, betas=tuple(spec["betas"]),
                         eps=spec["eps"], schedule="constant", warmup_steps=0,
                         max_grad_norm=spec["max_grad_norm"])
    # The trainer's set-up; the reference table of the initial weights is cached in the work
    # folder: the first prefixdpo worker computes it, the next ones load it.
    workdir = Path(spec["workdir"])
    training = build_training(
        source, env, executor,
        train=TrainSection(output_dir=str(workdir / f"ours-{layout}"), micro_batch_size=4,
                           compile=cuda and spec["compile"]),
        optim=optim, loss=LossConfig(type=("sigmoid",), beta=spec["beta"]),
        reference=ReferenceSection(mode="precomputed", cache_dir=str(workdir / "reference")),
        examples=examples)
    model = training.model
    batches = step_batches(examples, layout, spec["packing_length"], executor.row_multiple, B)
    steps = [StepBatches.single_process([batch]) for batch in batches]

    # The first step's per-pair policy log-probs (initial weights), in this layout.
    first = batches[0].to(device)
    with torch.no_grad():
        logps, _ = batch_sequence_log_probs(model, first,
                                            attention_masks(first, source.config, executor))
    reshard(model)
    by_pair = {int(p): [float(logps[c]), float(logps[r])] for p, c, r in zip(
        first.pair_ids.tolist(), first.chosen_sequence.tolist(),
        first.rejected_sequence.tolist())}
    first_logps = [by_pair[i] for i in step_positions(0, num_pairs, B)]
    table = training.reference.table.detach().double().cpu()
    reference_logps = []
    for i, example in enumerate(examples):
        offset = int(numbering.sequence_offsets[i])
        chosen, rejected = example.pairs[0]
        reference_logps.append([float(table[offset + chosen]), float(table[offset + rejected])])

    loss_state = LossState()

    def step(s: int):
        nonlocal loss_state
        start = clock(device)
        result, loss_state = training.step(steps[s % len(steps)], loss_state)
        return result, clock(device) - start, batches[s % len(steps)].input_ids.numel()

    warmup_losses = [step(s)[0].loss for s in range(W)]
    settings = {
        "layout": layout,
        "packing": (spec["packing_length"] if is_packed(layout) else "none")
        + (" (one row per step, its tokens rounded up)" if is_packed(layout)
           and spec["packing_length"] == "step" else ""),
        "row_multiple": executor.row_multiple, "compiled_layers": cuda and spec["compile"],
        "attention": "FlexAttention" if executor.name == "flex" else
        f"{executor.name} executor (scaled_dot_product_attention)",
        "mixed_precision": "bfloat16 compute, float32 parameters" if cuda else "none (float32)",
        "reference": "precomputed table (train.setup.build_training)",
        "optimizer": _optimizer_settings(training.optimizer), "loss": "sigmoid",
        "beta": spec["beta"], "max_grad_norm": optim.max_grad_norm,
        "torch_threads": torch.get_num_threads(), "grad_accum": 1,
    }
    channel.send("ready", setup_s=time.perf_counter() - started, settings=settings,
                 warmup_losses=warmup_losses, num_pairs=num_pairs, first_logps=first_logps,
                 reference_logps=reference_logps)
    s = W
    memory = PeakMemory(device)
    while channel.command() == "run":
        memory.reset()
        graphs_before = compile_counts()["graphs"]
        seconds, pairs, tokens, row_tokens, losses = [], 0, 0, 0, []
        for _ in range(k):
            result, dt, cells = step(s)
            s += 1
            seconds.append(dt)
            pairs += result.num_pairs
            tokens += result.num_tokens
            row_tokens += cells
            losses.append(result.loss)
        channel.send("round", seconds=seconds, pairs=pairs, tokens=tokens,
                     row_tokens=row_tokens, losses=losses, peak_memory_gib=memory.gib(),
                     graphs_compiled=compile_counts()["graphs"] - graphs_before)
    channel.send("done")


# ---- driver --------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """One contender's process, driven over its stdin / stdout."""

    def __init__(self, name: str, role: str, spec_path: Path, workdir: Path):
        self.name = name
        self.log_path = workdir / f"{role.replace('+', '_')}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        for name_ in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name_, None)  # each worker is a process group of its own
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", role, str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env, cwd=ROOT)

    def receive(self) -> dict[str, Any]:
        while True:
            line = self.process.stdout.readline()
            if not line:
                code = self.process.wait()
                raise WorkerError(f"{self.name} worker exited ({code}) without a reply; its "
                                  f"log ends:\n{self.log_tail()}")
            if line.startswith(PROTOCOL):
                message = json.loads(line[len(PROTOCOL):])
                if message["event"] == "error":
                    raise WorkerError(f"{self.name} worker failed: {message['message']}\n"
                                      f"{message['traceback']}\nits log ends:\n"
                                      f"{self.log_tail()}")
                return message

    def send(self, command: str) -> None:
        self.process.stdin.write(json.dumps({"command": command}) + "\n")
        self.process.stdin.flush()

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def train_tiny_tokenizer(preferences: Sequence[Preference], out: Path) -> Path:
    """A byte-level BPE (GPT-2's kind, as SmolLM2's) of TINY_VOCAB ids trained on the pairs."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = []
    for p in preferences:
        group = p.groups[0]
        for text in (group.prompt, *group.completions):
            texts.append(text if isinstance(text, str) else
                         " ".join(m["content"] for m in text))
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


def prepare_model(args: argparse.Namespace, tokenizer: Tokenizer, tokenizer_dir: Path,
                  workdir: Path) -> tuple[Path, ModelConfig, str]:
    """The model folder both trainers load, its config and a description."""
    if args.model:
        model_dir = Path(args.model)
        config = ModelConfig.from_file(model_dir)
        return model_dir, config, f"{model_dir} ({config.num_params / 1e6:.1f}M parameters)"
    from prefixdpo.model.hf_checkpoint import save_hf_checkpoint
    from prefixdpo.model.transformer import build_model

    fields = dict(TINY_MODEL if args.tiny else SMOLLM_135M)
    fields["vocab_size"] = max(fields["vocab_size"] if not args.tiny else 0,
                               tokenizer.vocab_size)
    config = ModelConfig.from_hf_dict(fields, source="tiny preset" if args.tiny
                                      else "SmolLM-135M shape")
    model = build_model(config, "cpu", seed=args.seed)
    model_dir = workdir / "model"
    save_hf_checkpoint(model.state_dict(), config, model_dir, tokenizer_dir=tokenizer_dir)
    name = "tiny (2 layers, hidden size 64)" if args.tiny else \
        "SmolLM-135M shape (30 layers, hidden size 576, 9/3 heads, tied embeddings)"
    return model_dir, config, (f"{name}, vocabulary {config.vocab_size}, random init (seed "
                               f"{args.seed}), {config.num_params / 1e6:.1f}M parameters")


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
    p.add_argument("--worker", nargs=2, metavar=("ROLE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    cuda = args.device == "cuda"
    defaults = dict(TINY) if args.tiny else dict(
        pairs=None, pairs_per_step=8, steps=4, repeats=3, warmup_steps=3 if cuda else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    for layout in args.layouts:
        if layout not in LAYOUTS:
            p.error(f"--layouts: unknown layout {layout!r}; expected some of {LAYOUTS}")
    if args.packing_length != "step" and not args.packing_length.isdigit():
        p.error("--packing-length: 'step' or a number of tokens")
    if min(args.pairs_per_step, args.steps, args.repeats) < 1 or args.warmup_steps < 1:
        p.error("--pairs-per-step, --steps, --repeats and --warmup-steps must be >= 1 (the "
                "first, untimed step is the one whose numbers are checked)")
    if args.pairs is None:
        args.pairs = args.pairs_per_step * (args.warmup_steps + args.repeats * args.steps)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return {}
    missing = missing_packages()
    if missing:
        print(f"vs_trl.py needs {', '.join(missing)} (optional, not installed): "
              f"{INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        return drive(args, Path(tmp))


def drive(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cuda = args.device == "cuda"
    dtype = compute_dtype(args.device)
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
    model_dir, config, model_note = prepare_model(args, tokenizer, tokenizer_dir, workdir)
    largest = max(max(max(ids) for ids in our_ids(e)) for e in examples)
    if largest >= config.vocab_size:
        raise SystemExit(f"vs_trl.py: token id {largest} >= the model's vocab_size "
                         f"{config.vocab_size}: use a tokenizer the model covers")
    num_pairs, B, k, R, W = (len(examples), args.pairs_per_step, args.steps, args.repeats,
                             args.warmup_steps)
    spec = {"device": args.device, "data": [str(f) for f in files], "format": args.format,
            "pairs": num_pairs, "pairs_per_step": B, "steps": k, "repeats": R,
            "warmup_steps": W, "model": str(model_dir), "tokenizer": str(tokenizer_dir),
            "workdir": str(workdir), "lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8,
            "max_grad_norm": 1.0, "beta": 0.1, "seed": args.seed,
            "packing_length": args.packing_length, "compile": args.compile}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    paired_tokens = sum(e.num_paired_tokens for e in examples)
    shared_tokens = sum(e.num_shared_tokens for e in examples)

    env_info = environment(torch.device("cuda" if cuda else "cpu"))
    print(f"prefixdpo vs TRL DPOTrainer, {env_info['date']}, commit {env_info['commit']}"
          f"{' (uncommitted changes)' if env_info['uncommitted_changes'] else ''}")
    print(f"device: {args.device} ({env_info['device']}), torch {torch.__version__}, "
          f"compute {dtype}")
    print(f"model: {model_note}")
    print(f"tokenizer: {tokenizer_note}")
    print(f"data: {', '.join(map(str, files))}: {num_pairs} pairs"
          + (f" ({sum(skipped.values())} rows left out: "
             + "; ".join(f"{n} {why}" for why, n in skipped.most_common()) + ")"
             if skipped else ""))
    print(f"work: {B} pairs per optimizer step (one micro-batch), {W} warm-up step(s), then "
          f"{R} rounds x {k} timed steps per contender, "
          f"{'one contender at a time' if args.one_at_a_time else 'interleaved'}; step s "
          f"takes pairs (s mod {num_pairs // B}) x {B} ..; token ratio of the pairs (paired / shared, our "
          f"tokens): {paired_tokens / shared_tokens:.3f}")
    print(f"same in both: {dtype}, sigmoid loss beta {spec['beta']}, AdamW lr {args.lr} "
          f"betas {tuple(spec['betas'])} eps {spec['eps']} weight decay 0, constant lr without "
          f"warmup, max grad norm {spec['max_grad_norm']}, reference log-probs precomputed, "
          "no activation checkpointing, no truncation, no gradient accumulation")

    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    roles = [("TRL", "trl")] + [(f"prefixdpo {layout}", layout) for layout in args.layouts]
    rounds: dict[str, list[dict]] = {name: [] for name, _ in roles}

    def run_round(name: str, r: int) -> None:
        workers[name].send("run")
        rounds[name].append(message := workers[name].receive())
        print(f"round {r + 1}/{R}: {name}: {np.mean(message['seconds']):.3f} s/step", flush=True)

    def stop(name: str) -> None:
        workers[name].send("stop")
        workers[name].receive()
        workers[name].process.wait(timeout=120)

    try:
        if args.one_at_a_time:
            # Each contender alone: set up, every round, exit. The first prefixdpo layout
            # computes the reference table the others load.
            for name, role in [*roles[1:], roles[0]]:
                print(f"setting up {name} (not timed) ...", flush=True)
                workers[name] = Worker(name, role, spec_path, workdir)
                ready[name] = workers[name].receive()
                print(f"  {name} ready after {ready[name]['setup_s']:.1f} s", flush=True)
                for r in range(R):
                    run_round(name, r)
                stop(name)
            ready = {name: ready[name] for name, _ in roles}  # the report's order
        else:
            # Set-up is not timed, so it overlaps: TRL with the first prefixdpo worker, which
            # computes the reference table; the other prefixdpo workers then load it.
            print(f"setting up {', '.join(name for name, _ in roles)} (not timed) ...",
                  flush=True)
            for name, role in roles[:2]:
                workers[name] = Worker(name, role, spec_path, workdir)
            for i, (name, _) in enumerate([roles[1], roles[0], *roles[2:]]):
                ready[name] = workers[name].receive()
                print(f"  {name} ready after {ready[name]['setup_s']:.1f} s", flush=True)
                if i == 0:  # the table exists
                    for other, role in roles[2:]:
                        workers[other] = Worker(other, role, spec_path, workdir)
            for r in range(R):
                for name, _ in roles:
                    run_round(name, r)
            for name, _ in roles:
                stop(name)
    except WorkerError as e:
        raise SystemExit(f"vs_trl.py: {e}") from None
    finally:
        for worker in workers.values():
            worker.close()

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
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if mask is None or mask[i]:
            out += [abs(u - v) / max(abs(v), 1e-12) for u, v in zip(x, y)]
    return out


def analyze(args, dtype, ready, rounds, env_info, spec, model_note, tokenizer_note, files,
            skipped, paired_tokens, shared_tokens) -> dict[str, Any]:
    trl_ready = ready["TRL"]
    ours_names = [name for name in ready if name != "TRL"]
    B, num_pairs = spec["pairs_per_step"], trl_ready["num_pairs"]
    failed: list[str] = []
    loss_atol, logp_rtol = LOSS_ATOL[dtype], LOGP_RTOL[dtype]

    print("\nsettings:")
    for name, message in ready.items():
        print(f"  {name}: " + ", ".join(f"{key}={value}" for key, value in
                                        message["settings"].items()))

    # ---- checks
    print("\nchecks:")
    agree = trl_ready["agree"]
    share = sum(agree) / len(agree)
    print(f"  token ids (prompt, chosen, rejected) identical in TRL's processed dataset and "
          f"ours: {sum(agree)}/{len(agree)} pairs ({share:.1%})")
    for reason, count in sorted(trl_ready["reasons"].items(), key=lambda kv: -kv[1]):
        print(f"    {count} pairs: {reason}\n      e.g. {trl_ready['reason_examples'][reason]}")
    step1 = {"TRL": trl_ready["warmup_losses"][0]}
    step1.update({name: ready[name]["warmup_losses"][0] for name in ours_names})
    print(f"  step-1 loss (policy = reference, expected ln 2 = {LN2:.6f}, tolerance "
          f"{loss_atol:g}):")
    for name, loss in step1.items():
        ok = abs(loss - LN2) <= loss_atol
        print(f"    {name}: {loss:.7f} (|loss - ln 2| = {abs(loss - LN2):.2e}) "
              f"{'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(f"{name} step-1 loss {loss:.7f} != ln 2")
    first = list(range(B))
    first_agree = [agree[i] for i in first]
    logp_checks: dict[str, Any] = {}
    print(f"  first-step policy log-probs, relative difference to TRL (tolerance "
          f"{logp_rtol:g}):")
    for name in ours_names:
        ours = ready[name]["first_logps"]
        same = relative_differences(trl_ready["ours_tokens_first_logps"], ours)
        own = relative_differences(trl_ready["first_logps"], ours, first_agree)
        ref = relative_differences(trl_ready["reference_logps"], ready[name]["reference_logps"],
                                   agree)
        logp_checks[name] = {
            "same_tokens": {"pairs": B, "max_rel_diff": max(same)},
            "own_tokens_where_agree": {"pairs": sum(first_agree),
                                       "max_rel_diff": max(own) if own else None},
            "reference_where_agree": {"pairs": sum(agree), "max_rel_diff": max(ref) if ref
                                      else None}}
        for label, values, pairs in (
                ("TRL's forward on our token ids (first batch)", same, B),
                ("each trainer's own tokens, pairs that agree (first batch)", own,
                 sum(first_agree)),
                ("reference log-probs, pairs that agree (all)", ref, sum(agree))):
            if not values:
                print(f"    {name}: {label}: no pairs")
                continue
            ok = max(values) <= logp_rtol
            print(f"    {name}: {label}: {pairs} pairs, max {max(values):.2e} "
                  f"{'ok' if ok else 'FAILED'}")
            if not ok:
                failed.append(f"{name}: {label}: {max(values):.2e} > {logp_rtol:g}")

    # Not a check (AdamW's first updates amplify rounding differences), but shows that the
    # trainings stay together: every step's loss against TRL's, on the same pairs.
    def all_losses(name: str) -> list[float]:
        return ready[name]["warmup_losses"] + [x for m in rounds[name] for x in m["losses"]]

    loss_gaps = {name: max(abs(a - b) for a, b in zip(all_losses(name), all_losses("TRL")))
                 for name in ours_names}
    print(f"  loss of every step ({len(all_losses('TRL'))}) against TRL's, max |difference| "
          "(information): " + ", ".join(f"{name} {gap:.2e}" for name, gap in loss_gaps.items()))

    # ---- timings
    contenders: dict[str, dict] = {}
    for name, messages in rounds.items():
        seconds = [s for m in messages for s in m["seconds"]]
        pairs = sum(m["pairs"] for m in messages)
        tokens = sum(m["tokens"] for m in messages)
        row_tokens = sum(m["row_tokens"] for m in messages)
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
    trl_result = contenders["TRL"]
    for name, c in contenders.items():
        c["speedup_vs_trl"] = c["pairs_per_s"] / trl_result["pairs_per_s"]
        c["round_speedup_vs_trl"] = [t / s for s, t in zip(c["round_s_per_step"],
                                                            trl_result["round_s_per_step"])]
        c["memory_vs_trl"] = c["peak_memory_gib"] / trl_result["peak_memory_gib"]
    memory = "peak GiB" if args.device == "cuda" else "peak RSS GiB"
    print(f"\ntimed: {spec['repeats']} rounds x {spec['steps']} steps per contender "
          f"({memory}: the peak of the timed steps, each contender in its own process)")
    header = (f"{'contender':<26}{'s/step':>9}{'median':>9}{'pairs/s':>9}{'tokens/s':>10}"
              f"{'tok/step':>9}{'pad':>7}{memory:>13}{'x TRL':>7}{'rounds x TRL':>16}")
    print(header)
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
        recompiled = {name: c["graphs_compiled_in_timed_steps"] for name, c in
                      contenders.items() if c["graphs_compiled_in_timed_steps"]}
        print("prefixdpo graphs compiled during the timed steps: " + (", ".join(
            f"{name} {count}" for name, count in recompiled.items()) if recompiled else
            "none"))
    if failed:
        print("\nFAILED checks:\n  " + "\n  ".join(failed))
    return {"environment": {**env_info, **{key: trl_ready["settings"][key] for key in (
                "trl", "transformers", "accelerate", "datasets")}},
            "args": {key: value for key, value in vars(args).items() if key != "worker"},
            "model": model_note, "tokenizer": tokenizer_note,
            "data": {"files": [str(f) for f in files], "num_pairs": num_pairs,
                     "skipped": dict(skipped), "paired_tokens": paired_tokens,
                     "shared_tokens": shared_tokens,
                     "token_ratio": paired_tokens / shared_tokens},
            "settings": {"compute_dtype": dtype, **{key: spec[key] for key in (
                "pairs_per_step", "steps", "repeats", "warmup_steps", "lr", "betas", "eps",
                "max_grad_norm", "beta", "seed", "packing_length")}},
            "checks": {"token_agreement_share": share, "agreeing_pairs": sum(agree),
                       "pairs": len(agree), "disagreement_reasons": trl_ready["reasons"],
                       "disagreement_examples": trl_ready["reason_examples"],
                       "step1_loss": step1, "loss_tolerance": loss_atol,
                       "logp_tolerance": logp_rtol, "logps": logp_checks,
                       "max_loss_difference_to_trl": loss_gaps},
            "contenders": contenders, "failed_checks": failed}


if __name__ == "__main__":
    main()

"""Does a real model learn, and how fast: prefixdpo's trainer and TRL's DPOTrainer, one config.

    python benchmarks/learning_vs_trl.py --config configs/smollm2-135m-hh-rlhf.toml \
        [--model.path=DIR --section.key=value ...] [--out DIR] [--json FILE] [--only ours|trl]
    python benchmarks/learning_vs_trl.py --config configs/smollm2-135m-hh-rlhf.toml --tiny

Needs TRL, an optional extra: `pip install -e ".[bench]"`. Both trainers run one after the other
on this machine's CPU in float32: prefixdpo as `train.py` in a subprocess, TRL in this process on
the same training and held-out pairs (as the trainer resolves them) with the same settings. How
each is set up and timed, and what still differs: BENCHMARKS.md, "A whole run against TRL"; the
differences are also printed before the table. `--tiny` (CI): a 2-layer random model with a
byte-level tokenizer trained on the first rows (vs_trl.py's), 12 pairs, 2 steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from measure import ROOT
from vs_trl import (dpo_config, exit_without_trl, first_difference, missing_packages,
                    prepare_model, quiet_environment, read_preferences, recording_trainer,
                    step_clock, train_tiny_tokenizer, trl_record, trl_settings)

from prefixdpo.data.dataset import chat_template_override
from prefixdpo.data.example import Example
from prefixdpo.data.formats import (IDS, TEXT, Preference, PreferenceGroup, detect_format,
                                    parse_record, rename_columns)
from prefixdpo.data.loader import PreferenceLoader
from prefixdpo.data.reading import read_rows
from prefixdpo.data.tokenizer import load_tokenizer
from prefixdpo.train.build import ModelSource, RunData, load_run_data, tokenizer_for
from prefixdpo.train.config import Config, load_config

LN2 = math.log(2.0)
TINY_OVERRIDES = ["--data.max_examples=12", "--data.eval_fraction=0.25", "--train.steps=2",
                  "--train.log_every=1", "--data.max_length=256", "--data.max_prompt_length=192",
                  "--data.packing_length=1024"]


def run_overrides(user: Sequence[str], out: Path) -> list[str]:
    """The user's overrides, then the ones this benchmark needs (those win)."""
    forced = [f"--train.output_dir={out / 'ours'}", "--train.eval_on_start=true",
              "--checkpoint.export_hf=false", "--train.device=cpu"]
    if not any(o.startswith("--reference.cache_dir=") for o in user):
        forced.append(f"--reference.cache_dir={out / 'reference-cache'}")
    return [*user, *forced]


def check_supported(config: Config, source: ModelSource) -> None:
    loss = config.loss
    if loss.type != ("sigmoid",) or loss.weights not in ((), (1.0,)) or loss.rpo_alpha:
        raise SystemExit("learning_vs_trl.py compares the sigmoid DPO loss alone (loss.type = "
                         f"'sigmoid', no weights or rpo_alpha); the config has {list(loss.type)}")
    if config.lora.rank:
        raise SystemExit("learning_vs_trl.py compares full fine-tuning: set lora.rank = 0")
    if config.reference.mode not in ("precomputed", "live"):
        raise SystemExit(f"reference.mode = {config.reference.mode!r}: the comparison needs the "
                         "initial model as the reference")
    if source.checkpoint_dir is None:
        raise SystemExit("TRL loads a Hugging Face folder: set model.path, not model.config")


def source_preferences(path: str, config: Config, fmt: str,
                       indices: set[int]) -> dict[int, Preference]:
    """The parsed rows of `path` at `indices` (Example.index: position among all rows read)."""
    found: dict[int, Preference] = {}
    for index, row in enumerate(read_rows(path, config.data.split)):
        if index in indices and row.error is None:
            value = rename_columns(row.value, config.data.columns, row.location)
            fmt = fmt or detect_format(value, row.location)
            found[index] = parse_record(value, row.location, fmt, config.data.pairing)
        if len(found) == len(indices):
            break
    return found


def trl_records(examples: Sequence[Example], preferences: dict[int, Preference],
                decode: Callable[[list[int]], str], bos_id: int | None
                ) -> tuple[list[dict[str, Any]], collections.Counter]:
    """One TRL row (prompt, chosen, rejected) per pair of the examples, and notes on the rows
    that differ from the plain text. TRL 1.16 has no max_prompt_length: a text prompt our
    tokenization cut is given as the text of the tokens kept (`decode`)."""
    records, notes = [], collections.Counter()
    for example in examples:
        preference = preferences[example.index]
        if preference.kind == IDS:
            raise SystemExit("pre-tokenized data cannot be compared: TRL tokenizes text itself")
        where = [(g, c) for g, group in enumerate(preference.groups)
                 for c in range(len(group.completions))]
        for chosen, rejected in example.pairs:
            (gc, cc), (gr, cr) = where[chosen], where[rejected]
            a, b = preference.groups[gc], preference.groups[gr]
            prompt, chosen_text, rejected_text = a.prompt, a.completions[cc], b.completions[cr]
            if gc != gr:  # TRL has one prompt per pair: the common part, the rest completions
                n = first_difference(a.prompt, b.prompt)
                prompt, chosen_text, rejected_text = (a.prompt[:n], a.prompt[n:] + chosen_text,
                                                      b.prompt[n:] + rejected_text)
                notes["chosen and rejected prompts differ: TRL gets their common start as the "
                      "prompt, the rest as completions"] += 1
            elif example.truncated and preference.kind == TEXT:
                ids = example.groups[gc].prompt.tolist()
                kept = decode(ids[1:] if ids[:1] == [bos_id] else ids)
                if kept != prompt:
                    prompt = kept
                    notes["prompt cut by data.max_prompt_length / max_length: TRL gets the text "
                          "of the prompt tokens ours keeps"] += 1
            elif example.truncated:
                notes["conversational prompt cut by ours, given whole to TRL"] += 1
            records.append(trl_record(Preference(
                preference.location, preference.kind,
                (PreferenceGroup(prompt, (chosen_text, rejected_text)),), ((0, 1),))))
    return records, notes


def step_totals(config: Config, data: RunData) -> list[tuple[int, int]]:
    """(pairs, tokens) of each of the run's steps, from the loader's plan (seeded, so the one
    train.py follows)."""
    t = config.train
    loader = PreferenceLoader(data.train, config.data.layout, t.micro_batch_size, t.grad_accum,
                              seed=t.seed, packing_length=data.fit.packing_length)
    totals, epoch, step = [], 0, 0
    for _ in range(t.steps):
        if step >= loader.steps_in_epoch(epoch):
            epoch, step = epoch + 1, 0
        totals.append(loader.step_totals(epoch, step))
        step += 1
    return totals


def run_ours(config_path: str, overrides: list[str], out: Path, config: Config,
             data: RunData) -> dict[str, Any]:
    """train.py on a fresh run folder and reference cache. Its training time is the sum of the
    step times it measures: each logged window's pairs (replayed from the loader's plan,
    checked against its tokens) over the window's pairs/s."""
    run_dir, log_path = out / "ours", out / "ours.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out / "reference-cache", ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "train.py"), "--config", config_path, *overrides]
    print(f"\nprefixdpo: {' '.join(command)}\n  (log: {log_path})", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"train.py exited with {code}; its log ends:\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == config.train.steps, evals
    totals = step_totals(config, data)
    seconds, done, mismatch = 0.0, 0, 0.0
    for record in (r for r in records if "pairs_per_s" in r):
        pairs, tokens = (sum(x) for x in zip(*totals[done:record["step"]]))
        seconds += pairs / record["pairs_per_s"]
        mismatch = max(mismatch, abs(pairs / record["pairs_per_s"] * record["tokens_per_s"]
                                     / tokens - 1))
        done = record["step"]
    if done != config.train.steps or mismatch > 1e-3:
        raise SystemExit(f"metrics.jsonl does not match the replayed data plan (logged up to "
                         f"step {done} of {config.train.steps}, timing mismatch {mismatch:.1e})")
    pairs = [p for p, _ in totals]
    return {"wall_s": wall, "train_s": seconds, "train_pairs": sum(pairs),
            "pairs_per_s": sum(pairs) / seconds, "pairs_per_step": [min(pairs), max(pairs)],
            "eval_pairs": sum(len(e.pairs) for e in data.eval),
            **{when: {"accuracy": r["eval/rewards/accuracies"], "loss": r["eval/loss"]}
               for when, r in (("before", evals[0]), ("after", evals[-1]))},
            "log": str(log_path), "metrics": str(run_dir / "metrics.jsonl")}


def lr_scheduler(optim) -> tuple[str, dict[str, float], str]:
    """TRL's (transformers') scheduler for optim.schedule, its kwargs, and what differs."""
    note = ("" if not optim.warmup_steps else
            "warm-up: transformers' lr at step i < W is lr * i / W (its first step has lr 0), "
            "ours lr * (i + 1) / W; after warm-up the schedules are equal")
    if optim.schedule == "constant":
        return ("constant_with_warmup" if optim.warmup_steps else "constant"), {}, note
    if optim.schedule == "cosine" and optim.min_lr_ratio:
        return "cosine_with_min_lr", {"min_lr_rate": optim.min_lr_ratio}, note
    if optim.min_lr_ratio:
        note += "; optim.min_lr_ratio: transformers' linear schedule decays to 0"
    return optim.schedule, {}, note


def run_trl(config: Config, source: ModelSource, data: RunData, out: Path) -> dict[str, Any]:
    """DPOTrainer on the same rows as text, ceil(train pairs / steps) pairs per step, evaluated
    before and after `train()`; its training time is `train_runtime`."""
    started = time.perf_counter()
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecations
    d, t, optim = config.data, config.train, config.optim
    tokenizer_dir = Path(d.tokenizer) if d.tokenizer else source.checkpoint_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if (template := chat_template_override(d)) is not None:
        tokenizer.chat_template = template
    bos_id = load_tokenizer(tokenizer_dir).bos_id

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    rows = source_preferences(d.path, config, data.loaded.format,
                              {e.index for e in data.train} | (
                                  set() if d.eval_path else {e.index for e in data.eval}))
    eval_rows = source_preferences(d.eval_path, config, "" if d.format == "auto" else d.format,
                                   {e.index for e in data.eval}) if d.eval_path else rows
    train_records, notes = trl_records(data.train, rows, decode, bos_id)
    eval_records, eval_notes = trl_records(data.eval, eval_rows, decode, bos_id)
    batch = math.ceil(len(train_records) / t.steps)
    # Held-out batches of a divisor of their count: its metrics are means of batch means.
    eval_batch = max(n for n in range(1, min(len(eval_records), batch) + 1)
                     if len(eval_records) % n == 0)
    scheduler, scheduler_kwargs, schedule_note = lr_scheduler(optim)
    args = dpo_config(
        out / "trl", t.activation_checkpointing, eval_strategy="no", seed=t.seed, use_cpu=True,
        bf16=False, per_device_train_batch_size=batch, per_device_eval_batch_size=eval_batch,
        max_steps=t.steps, logging_steps=t.log_every, learning_rate=optim.lr,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps,
        weight_decay=optim.weight_decay, optim="adamw_torch", lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs, warmup_steps=optim.warmup_steps,
        max_grad_norm=optim.max_grad_norm, beta=config.loss.beta,
        label_smoothing=config.loss.label_smoothing, max_length=d.max_length or None,
        truncation_mode="keep_start")
    trainer = recording_trainer(
        sequential=False, args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(source.checkpoint_dir, dtype=torch.float32),
        train_dataset=datasets.Dataset.from_list(train_records),
        eval_dataset=datasets.Dataset.from_list(eval_records))
    trainer.remove_callback(PrinterCallback)  # its log lines; the table reports
    timer = step_clock(torch.device("cpu"))
    trainer.add_callback(timer)

    def evaluate() -> dict[str, float]:
        trainer.eval_pairs = 0
        metrics = trainer.evaluate()
        return {"accuracy": metrics["eval_rewards/accuracies"], "loss": metrics["eval_loss"],
                "pairs": trainer.eval_pairs}

    print(f"\nTRL: evaluating, training {t.steps} steps of {batch} pairs, evaluating ...",
          flush=True)
    before = evaluate()
    train_s = trainer.train().metrics["train_runtime"]
    after = evaluate()
    wall = time.perf_counter() - started

    def same_ids(processed, examples: Sequence[Example]) -> int:
        ours = [(g.prompt.tolist(), g.completions[0].tolist(), g.completions[1].tolist())
                for e in examples if len(e.groups) == 1 and len(e.pairs) == 1
                for g in e.groups]
        theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in processed]
        return sum(a == b for a, b in zip(ours, theirs)) if len(ours) == len(theirs) else 0

    pairs = [shape[0] // 2 for shape in trainer.shapes]
    return {"wall_s": wall, "train_s": train_s, "step_s": sum(timer.seconds),
            "train_pairs": sum(pairs), "pairs_per_s": sum(pairs) / train_s,
            "pairs_per_s_by_step_times": sum(pairs) / sum(timer.seconds),
            "pairs_per_step": [min(pairs), max(pairs)],
            "eval_pairs": after["pairs"], "eval_pairs_before": before["pairs"],
            "before": before, "after": after, "settings": trl_settings(trainer),
            "rows_given": {"train": len(train_records), "eval": len(eval_records)},
            "rows_kept": {"train": len(trainer.train_dataset), "eval": len(trainer.eval_dataset)},
            "identical_token_ids": {"train": same_ids(trainer.train_dataset, data.train),
                                    "eval": same_ids(trainer.eval_dataset, data.eval)},
            "notes": dict(notes + eval_notes), "schedule_note": schedule_note}


def make_tiny(config_path: str, user: Sequence[str], work: Path) -> list[str]:
    """A tiny random model with a byte-level tokenizer trained on the first rows, as an HF
    folder; the overrides that train on it briefly."""
    config = load_config(config_path, [*TINY_OVERRIDES, *user])
    read, _ = read_preferences([config.data.path], config.data.format, 40)
    tokenizer_dir = train_tiny_tokenizer([p for _, p in read], work / "tokenizer")
    model_dir, _, note = prepare_model(None, True, config.model.init_seed,
                                       load_tokenizer(tokenizer_dir), tokenizer_dir, work)
    print(f"tiny: {note}")
    return [*TINY_OVERRIDES, f"--model.path={model_dir}", '--data.tokenizer=""', *user]


def describe(config: Config, data: RunData, ours: dict | None, trl: dict | None) -> list[str]:
    d, t, o = config.data, config.train, config.optim
    lines = [
        f"model: {config.model.path}; float32 on CPU, {torch.get_num_threads()} threads",
        f"data: {d.path} ({data.loaded.format}), {len(data.train)} training pairs, "
        f"{len(data.eval)} held out (" + (f"{d.eval_path}" if d.eval_path else
                                          f"eval_fraction {d.eval_fraction}, seed {t.seed}") + ")",
        f"truncation: max_length {d.max_length}, max_prompt_length {d.max_prompt_length} "
        f"({d.truncation_mode}); {sum(e.truncated for e in data.train)} training and "
        f"{sum(e.truncated for e in data.eval)} held-out pairs cut",
        f"loss: sigmoid, beta {config.loss.beta}, label_smoothing {config.loss.label_smoothing}; "
        f"reference: the initial model, log-probs precomputed",
        f"optimizer: AdamW lr {o.lr}, betas {tuple(o.betas)}, eps {o.eps}, weight decay "
        f"{o.weight_decay} (matrices / all but norms and biases: the same for these models), "
        f"{o.schedule} schedule, {o.warmup_steps} warm-up steps, min_lr_ratio "
        f"{o.min_lr_ratio}, max_grad_norm {o.max_grad_norm}; {t.steps} optimizer steps",
        f"activation checkpointing: {t.activation_checkpointing} in both"]
    differs = []
    if ours:
        differs.append(f"batches: ours packs whole examples into rows of "
                       f"{data.fit.packing_length or 'unpacked'} tokens ({d.layout}, "
                       f"{t.micro_batch_size} row(s) x {t.grad_accum} micro-batch(es)): "
                       f"{ours['pairs_per_step'][0]}-{ours['pairs_per_step'][1]} pairs per step, "
                       f"{ours['train_pairs']} in all")
    if trl:
        s, same, given, kept = (trl[key] for key in ("settings", "identical_token_ids",
                                                     "rows_given", "rows_kept"))
        differs += [
            f"batches: TRL {s['per_device_train_batch_size']} pairs per step (ceil(train pairs "
            f"/ steps); the last of an epoch smaller), padded: {trl['pairs_per_step'][0]}-"
            f"{trl['pairs_per_step'][1]} per step, {trl['train_pairs']} in all; held-out pairs "
            f"in batches of {s['per_device_eval_batch_size']} (a divisor: its metrics are means "
            "of batch means)",
            f"data order: ours shuffled by seed {t.seed} then packed; TRL's random sampler, "
            f"seed {t.seed}",
            *([trl["schedule_note"]] if trl["schedule_note"] else []),
            f"truncation: TRL max_length {s['max_length']} keep_start (cuts completions as ours "
            "does); it has no max_prompt_length",
            *(f"{count} pair(s): {note}" for note, count in trl["notes"].items()),
            f"tokenization: TRL tokenizes the text itself; identical token ids in "
            f"{same['train']}/{given['train']} training and {same['eval']}/{given['eval']} "
            "held-out pairs",
            *([f"TRL DROPPED pairs (prompt >= max_length): kept {kept} of {given}"]
              if kept != given else [])]
    if ours:
        differs.append("time: ours = the step times train.py measures (loader wait + step); "
                       "wall = the whole train.py process (start-up, data, model, reference "
                       "pass, 2 evaluations, training, final checkpoint)")
    if trl:
        differs.append("time: TRL = train_runtime (its training loop); wall = from importing "
                       "TRL (model, tokenization, reference pass, 2 evaluations, training; no "
                       "checkpoint)")
    return lines + ["differences:"] + [f"  - {x}" for x in differs]


def table(results: dict[str, dict]) -> list[str]:
    lines = [f"{'':<11}{'eval acc before':>16}{'after':>8}{'eval loss before':>18}"
             f"{'after':>9}{'eval pairs':>11}{'wall s':>9}{'train s':>9}{'train pairs':>12}"
             f"{'pairs/s':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<11}{r['before']['accuracy']:>16.3f}{r['after']['accuracy']:>8.3f}"
                     f"{r['before']['loss']:>18.4f}{r['after']['loss']:>9.4f}"
                     f"{r['eval_pairs']:>11}{r['wall_s']:>9.1f}{r['train_s']:>9.1f}"
                     f"{r['train_pairs']:>12}{r['pairs_per_s']:>9.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", help="work folder (OUT/ours, OUT/trl); default: a temporary one")
    parser.add_argument("--json", help="write every setting and figure to this file")
    parser.add_argument("--only", choices=("ours", "trl"))
    parser.add_argument("--tiny", action="store_true", help="CI: a tiny model, 12 pairs, 2 steps")
    args, user = parser.parse_known_args(argv)
    if args.only != "ours":
        exit_without_trl("learning_vs_trl.py", missing_packages())
    quiet_environment()
    with tempfile.TemporaryDirectory(prefix="learning_vs_trl-") as tmp:
        out = Path(args.out).resolve() if args.out else Path(tmp)
        if args.tiny:
            user = make_tiny(args.config, user, Path(tmp))
        overrides = run_overrides(user, out)
        config = load_config(args.config, overrides)
        source = ModelSource.from_section(config.model)
        check_supported(config, source)
        data = load_run_data(config.data, tokenizer_for(config.data, source), config.train.seed,
                             progress=False, max_positions=source.config.max_position_embeddings)
        if not data.eval:
            raise SystemExit("no held-out pairs: set data.eval_fraction or data.eval_path")
        results: dict[str, dict] = {}
        if args.only != "trl":
            results["prefixdpo"] = run_ours(args.config, overrides, out, config, data)
        if args.only != "ours":
            results["TRL"] = run_trl(config, source, data, out)
    settings = describe(config, data, results.get("prefixdpo"), results.get("TRL"))
    print("\nsettings (both):\n  " + "\n  ".join(settings) + "\n\n" + "\n".join(table(results)))
    failed = [f"{name}: eval loss before training {r['before']['loss']:.6f} != ln 2"
              for name, r in results.items() if abs(r["before"]["loss"] - LN2) > 1e-4]
    ratio = None
    if len(results) == 2:
        ours, theirs = results["prefixdpo"], results["TRL"]
        ratio = ours["pairs_per_s"] / theirs["pairs_per_s"]
        print(f"pairs/s ours / TRL: {ratio:.2f} (against TRL's step times alone: "
              f"{ours['pairs_per_s'] / theirs['pairs_per_s_by_step_times']:.2f})")
        if ours["eval_pairs"] != theirs["eval_pairs"]:
            failed.append(f"held-out pairs differ: ours {ours['eval_pairs']}, TRL "
                          f"{theirs['eval_pairs']}")
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": args.config,
              "overrides": overrides, "tiny": args.tiny, "settings": settings,
              "results": results, "pairs_per_s_ratio_ours_over_trl": ratio,
              "failed_checks": failed}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit("checks failed: " + "; ".join(failed))
    return report


if __name__ == "__main__":
    main()

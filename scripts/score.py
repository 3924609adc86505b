"""Score preference pairs with a model: the log-prob of every chosen and rejected completion.

    python scripts/score.py --model DIR --data FILE --out scores.jsonl
        [--layout shared+packed|shared|paired+packed|paired] [--packing-length N|auto]
        [--dtype float32|bfloat16] [--device cpu|cuda] [--batch-size N] [--tokenizer DIR]
        [--reference REF.jsonl] [--beta B] [--format F] [--columns prompt=question,...]
        [--chat-template auto|FILE.jinja] [--split S] [--bad-rows error|skip]

Writes one JSON object per pair, in input order: `index` (the row's position in the file),
`id` (when the row has one), `pair` (its number within the row: rows with ranked completions
give several), `chosen_logp`, `rejected_logp` (sums over the completion's tokens, EOS included)
and `chosen_tokens`, `rejected_tokens`. Rows the data loader refuses stop the run, unless
`--bad-rows skip`: then they are listed on stderr and left out.

This is how reference log-probs are precomputed for other tools, and how a trained model's
reward accuracy on held-out pairs is measured: score the same file with the reference model,
then pass that output as `--reference` when scoring with the trained one. The implicit reward
of a completion is beta * (logp - ref_logp); the accuracy is the share of pairs whose chosen
reward is higher. Without `--reference` the summary gives the share of pairs whose chosen
completion is more likely than the rejected one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from prefixdpo.data.config import BAD_ROWS, FORMATS, LAYOUTS, DataConfig, parse_columns
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.layout import Numbering
from prefixdpo.data.loader import fit_examples
from prefixdpo.data.tokenizer import load_tokenizer
from prefixdpo.model.hf_checkpoint import load_model, resolve_model_dir
from prefixdpo.model.executor import choose_executor
from prefixdpo.train.run_dir import check_output_file, output_error
from prefixdpo.train.scoring import score_sequences

# The flags that set data options, named in messages instead of the config keys.
FLAGS = {"path": "--data", "split": "--split", "format": "--format", "columns": "--columns",
         "chat_template": "--chat-template", "bad_rows": "--bad-rows",
         "max_length": "--max-length", "max_prompt_length": "--max-prompt-length",
         "layout": "--layout", "packing_length": "--packing-length"}

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder or hub id")
    parser.add_argument("--data", required=True, help="preference data file or hub dataset id")
    parser.add_argument("--out", required=True, type=Path, help="output .jsonl")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder (default: the model's)")
    parser.add_argument("--layout", default="shared+packed", choices=LAYOUTS)
    parser.add_argument("--packing-length", default="auto",
                        help="row length of packed layouts: a multiple of 128, or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="data format (default: detected)")
    parser.add_argument("--columns", default="",
                        help="rename data fields first, e.g. prompt=question,chosen=response_j")
    parser.add_argument("--chat-template", default="auto",
                        help="for conversational data: auto (the tokenizer's), a .jinja file, "
                             "or none")
    parser.add_argument("--split", default="train", help="split of folders and hub repos")
    parser.add_argument("--max-length", type=int, default=0, help="truncate as in training")
    parser.add_argument("--max-prompt-length", type=int, default=0)
    parser.add_argument("--bad-rows", default="error", choices=BAD_ROWS)
    parser.add_argument("--reference", type=Path, help="scores of the same data by the reference")
    parser.add_argument("--beta", type=float, default=0.1, help="reward scale for the summary")
    args = parser.parse_args(argv)
    if args.packing_length != "auto":
        try:
            args.packing_length = int(args.packing_length)
        except ValueError:
            parser.error(f"--packing-length {args.packing_length!r}: expected N or auto")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    device = torch.device(args.device)
    check_output_file(args.out, "--out")  # before any work
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    data_config = DataConfig(path=args.data, split=args.split, format=args.format,
                             columns=parse_columns(args.columns),
                             chat_template=args.chat_template, max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length, bad_rows=args.bad_rows,
                             layout=args.layout)
    data = load_preference_data(data_config, tokenizer, names=FLAGS)
    for line in data.skipped:
        print(f"skipped {line}", file=sys.stderr)
    # Scores must be of the sequences as given: refuse rather than cut an example to fit a row.
    examples, report = fit_examples(data.examples, args.layout, args.packing_length, "error",
                                    locations=data.locations, names=FLAGS)
    model = load_model(model_dir, device=device, dtype=getattr(torch, args.dtype)).eval()
    logps, counts = score_sequences(model, examples, layout=args.layout,
                                    packing_length=report.packing_length,
                                    micro_batch_size=args.batch_size, device=device,
                                    executor=choose_executor("auto", device))
    records = pair_records(examples, logps.tolist(), counts.tolist())
    try:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    except OSError as e:
        raise output_error("--out", args.out, e) from None
    print(f"wrote {len(records)} pairs to {args.out}" + (
        f" ({data.num_skipped} rows skipped)" if data.num_skipped else ""))
    print(summary(records, args.reference, args.beta))


def pair_records(examples, logps: list[float], counts: list[int]) -> list[dict]:
    offsets = Numbering(examples).sequence_offsets
    records = []
    for example, first in zip(examples, offsets.tolist()):
        for j, (chosen, rejected) in enumerate(example.pairs):
            record = {"index": example.index}
            if example.id is not None:
                record["id"] = example.id
            record.update(pair=j, chosen_logp=logps[first + chosen],
                          rejected_logp=logps[first + rejected],
                          chosen_tokens=counts[first + chosen],
                          rejected_tokens=counts[first + rejected])
            records.append(record)
    return records


def summary(records: list[dict], reference: Path | None, beta: float) -> str:
    n = len(records)
    if reference is None:
        preferred = sum(r["chosen_logp"] > r["rejected_logp"] for r in records)
        return f"chosen more likely than rejected: {preferred / max(n, 1):.4f} of {n} pairs"
    refs = read_reference(reference)
    missing = [r for r in records if (r["index"], r["pair"]) not in refs]
    if missing:
        raise ValueError(f"{reference}: no score for row {missing[0]['index']} pair "
                         f"{missing[0]['pair']}; score the same data with the reference model")
    margins = []
    for r in records:
        ref = refs[(r["index"], r["pair"])]
        margins.append(beta * ((r["chosen_logp"] - ref["chosen_logp"])
                               - (r["rejected_logp"] - ref["rejected_logp"])))
    accuracy = sum(m > 0 for m in margins) / max(n, 1)
    return (f"reward accuracy {accuracy:.4f}, mean reward margin "
            f"{sum(margins) / max(n, 1):.4f} (beta {beta}) over {n} pairs")


def read_reference(path: Path) -> dict[tuple[int, int], dict]:
    """A previous score.py output, by (row index, pair)."""
    refs = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (int(record["index"]), int(record.get("pair", 0)))
                refs[key] = {k: float(record[k]) for k in ("chosen_logp", "rejected_logp")}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: not a score.py output line ({type(e).__name__}"
                                 f": {e}); --reference takes the output of score.py") from None
    return refs


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""Wall time of data preparation: tokenize and pack a preference dataset, stage by stage.

    python benchmarks/data_prep.py [--data FILE...] [--tokenizer DIR] [--format hh_rlhf]
        [--layout shared+packed] [--packing-length auto] [--micro-batch-size 4] [--json OUT]

Defaults: the whole HH-RLHF test split (its four subsets, 8,552 rows, from
../shared/data/datasets/hh-rlhf) with the Mistral tokenizer shipped in
assets/tokenizers/mistral-7b-v0.1, bad rows skipped (and counted).

What a training run does before its first step, timed once each, in one process:
1. load the tokenizer;
2. `data.dataset.load_preference_data` per file: read (gunzip + JSON), parse, tokenize (one
   `encode_batch` per 2,048 rows), truncate -> Examples;
3. `data.loader.fit_examples`: choose the packing length and pack every example once
   (best-fit decreasing) for the efficiency figure.
Their sum is the headline total. Then, for where the time goes, stage 2 again split into its
parts (read, parse, tokenize + truncate, run by the same functions load_preference_data calls),
and what the loader does later, in its background thread, during training: planning epoch 0
(shuffle + windowed packing) and collating every micro-batch of it into tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent

from prefixdpo.data.config import LAYOUTS, DataConfig
from prefixdpo.data.dataset import BATCH_ROWS, load_preference_data
from prefixdpo.data.encoding import encode_preferences
from prefixdpo.data.example import Example
from prefixdpo.data.formats import detect_format, parse_record
from prefixdpo.data.layout import is_packed
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.data.reading import RowError, read_rows
from prefixdpo.data.tokenizer import load_tokenizer

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "datasets" / "hh-rlhf"
DEFAULT_TOKENIZER = ROOT / "assets" / "tokenizers" / "mistral-7b-v0.1"
_T = TypeVar("_T")


def timed(timings: dict[str, float], name: str, fn: Callable[[], _T]) -> _T:
    start = time.perf_counter()
    value = fn()
    timings[name] = time.perf_counter() - start
    return value


def default_files() -> list[str]:
    files = sorted(str(p) for p in DEFAULT_DATA.glob("*/test.jsonl.gz"))
    if not files:
        raise SystemExit(
            f"the HH-RLHF test split was not found under {DEFAULT_DATA} (expected "
            "<subset>/test.jsonl.gz); pass --data FILE... (a 1,000-row slice ships in "
            "assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz)")
    return files


def staged_load(files: Sequence[str], tokenizer, fmt: str, timings: dict[str, float]
                ) -> list[Example]:
    """load_preference_data's work on every file, one stage at a time (text formats only:
    no chat template, no limits)."""
    rows = timed(timings, "read (gunzip + JSON)",
                 lambda: [row for f in files for row in read_rows(f)])
    fmt = fmt if fmt != "auto" else detect_format(rows[0].value, rows[0].location)

    def parse() -> list:
        parsed = []
        for index, row in enumerate(rows):
            try:
                if row.error is None:
                    parsed.append((index, parse_record(row.value, row.location, fmt)))
            except RowError:
                pass  # counted by the headline pass
        return parsed

    parsed = timed(timings, "parse", parse)

    def tokenize() -> list[Example]:
        out = []
        for start in range(0, len(parsed), BATCH_ROWS):
            out.extend(r for r in encode_preferences(parsed[start:start + BATCH_ROWS],
                                                     tokenizer) if isinstance(r, Example))
        return out

    return timed(timings, "tokenize + truncate (encode_preferences)", tokenize)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", help=f"preference files (default: {DEFAULT_DATA}/"
                   "*/test.jsonl.gz)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--format", default="hh_rlhf")
    p.add_argument("--layout", default="shared+packed", choices=LAYOUTS)
    p.add_argument("--packing-length", default="auto")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch when "
                   "collating")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    files = args.data or default_files()
    if not Path(args.tokenizer).is_dir():
        raise SystemExit(f"--tokenizer {args.tokenizer}: not a folder with tokenizer.json")
    packing_length = args.packing_length if args.packing_length == "auto" \
        else int(args.packing_length)
    logging.getLogger("prefixdpo.data.dataset").setLevel(logging.ERROR)  # skipped rows: counted below

    timings: dict[str, float] = {}
    tokenizer = timed(timings, "load tokenizer", lambda: load_tokenizer(args.tokenizer))

    def load() -> tuple[list[Example], int, int]:
        examples, num_rows, num_skipped = [], 0, 0
        for f in files:
            data = load_preference_data(DataConfig(path=f, format=args.format,
                                                   bad_rows="skip"), tokenizer, progress=False)
            examples += data.examples
            num_rows += data.num_rows
            num_skipped += data.num_skipped
        return examples, num_rows, num_skipped

    examples, num_rows, num_skipped = timed(
        timings, "read + parse + tokenize (load_preference_data)", load)
    fitted, fit = timed(timings, "fit + pack (fit_examples)",
                        lambda: fit_examples(examples, args.layout, packing_length, "truncate"))
    total = sum(timings.values())

    breakdown: dict[str, float] = {}
    staged = staged_load(files, tokenizer, args.format, breakdown)
    if len(staged) != len(examples) or any(
            len(a.groups[0].prompt) != len(b.groups[0].prompt) for a, b in zip(staged, examples)):
        raise SystemExit("the stage-by-stage load does not match load_preference_data")

    later: dict[str, float] = {}
    loader = PreferenceLoader(fitted, args.layout, args.micro_batch_size,
                              packing_length=fit.packing_length, prefetch=0)
    plan = timed(later, "loader: plan epoch 0", lambda: loader.micro_batch_plan(0))
    timed(later, "loader: collate every micro-batch",
          lambda: [loader.build(rows) for rows in plan])

    num_tokens = sum(e.num_shared_tokens if args.layout.startswith("shared")
                     else e.num_paired_tokens for e in fitted)
    print(f"{len(files)} file(s), {num_rows} rows: {len(examples)} examples, {num_skipped} bad "
          f"rows skipped; {num_tokens} tokens in layout {args.layout}")
    print(f"tokenizer: {args.tokenizer}")
    if is_packed(args.layout):
        print(f"packing length {fit.packing_length}, efficiency {fit.efficiency:.2%} "
              f"(non-padding share of packed rows), {fit.num_truncated} examples cut to fit")
    width = max(len(k) for k in [*timings, *breakdown, *later]) + 2
    print("\nbefore the first step")
    for name, seconds in timings.items():
        print(f"  {name:<{width}}{seconds:8.3f} s")
    print(f"  {'total':<{width}}{total:8.3f} s   (target: <= 5 s on 2 cores)")
    print("\nbreakdown of load_preference_data (measured again, stage by stage)")
    for name, seconds in breakdown.items():
        print(f"  {name:<{width}}{seconds:8.3f} s")
    print(f"\nduring training, in the loader's background thread ({len(plan)} micro-batches "
          f"of {args.micro_batch_size} rows)")
    for name, seconds in later.items():
        print(f"  {name:<{width}}{seconds:8.3f} s")
    per_batch = later["loader: collate every micro-batch"] / max(len(plan), 1)
    print(f"  {'per micro-batch':<{width}}{1e3 * per_batch:8.3f} ms")

    report = {"files": files, "tokenizer": args.tokenizer, "layout": args.layout,
              "num_rows": num_rows, "num_examples": len(examples), "num_skipped": num_skipped,
              "num_tokens": num_tokens, "packing_length": fit.packing_length,
              "packing_efficiency": fit.efficiency, "num_truncated": fit.num_truncated,
              "seconds": timings, "total_seconds": total, "breakdown_seconds": breakdown,
              "loader_seconds": later, "micro_batches": len(plan)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

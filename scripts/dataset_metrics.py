"""Token statistics of preference datasets, and what prefix sharing and packing gain on them.

    python scripts/dataset_metrics.py --data FILE... --tokenizer DIR [--name NAME]
        [--split S] [--format F] [--columns prompt=question,...] [--chat-template auto|FILE]
        [--bad-rows skip|error]

Each --data is a file, a folder or a hub dataset repo id, read as training reads it (same
formats, tokenization policy and data.bad_rows, here "skip" by default; no truncation). One block
of lines per file, named after the file (its name without the data suffix; the parent folder is
prepended when several files share that name, as HH-RLHF's */test.jsonl.gz do). With --name,
all files form ONE dataset of that name.

Each block starts with exactly these five lines, per preference pair (a sample):
    NAME: num_samples=...                 pairs
    NAME: num_tokens_chosen_input=...     sum over pairs of len(prompt) + len(chosen) + 1 (EOS)
    NAME: num_tokens_rejected_input=...   the same with the rejected side (and its own prompt)
    NAME: avg_tokens_chosen_input=...
    NAME: avg_tokens_rejected_input=...
where texts count as tokenized WITHOUT special tokens (no BOS). The lines after them describe the
training layout (a prompt's BOS included): rows skipped, groups (a prompt and its completions),
median and 95th percentile group length in the shared layout (prompt once, then every
completion), the median prompt/completion length ratio per group (prompt over mean completion),
token totals when every sequence repeats its prompt (paired) versus prompt once (shared) and
their ratio (the ceiling of prefix sharing's speed-up), and the packing length the trainer
would choose ("auto") with the share of non-padding tokens when examples are packed into rows of
that length by best fit. Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prefixdpo.data.config import BAD_ROWS, FORMATS, DataConfig, parse_columns
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.example import Example
from prefixdpo.data.packing import auto_packing_length, pack_best_fit, packing_efficiency
from prefixdpo.data.reading import data_suffix
from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer

# The flags that set data options, named in messages instead of the config keys.
FLAGS = {"path": "--data", "split": "--split", "format": "--format", "columns": "--columns",
         "chat_template": "--chat-template", "bad_rows": "--bad-rows"}

def dataset_metrics(examples: Sequence[Example], bos_id: int | None,
                    num_skipped: int = 0) -> list[tuple[str, str]]:
    """(metric, formatted value) in print order."""
    def without_bos(prompt: np.ndarray) -> int:
        return len(prompt) - int(bos_id is not None and len(prompt) > 0 and prompt[0] == bos_id)

    chosen_tokens = rejected_tokens = num_pairs = 0
    group_lengths, ratios = [], []
    for example in examples:
        # sequence number -> its length without BOS: prompt + completion (which ends with EOS)
        lengths = [without_bos(g.prompt) + len(c) for g in example.groups for c in g.completions]
        for chosen, rejected in example.pairs:
            chosen_tokens += lengths[chosen]
            rejected_tokens += lengths[rejected]
            num_pairs += 1
        for group in example.groups:
            group_lengths.append(group.num_tokens)
            ratios.append(len(group.prompt) / np.mean([len(c) for c in group.completions]))
    paired = sum(e.num_paired_tokens for e in examples)
    shared = sum(e.num_shared_tokens for e in examples)
    item_lengths = [e.num_shared_tokens for e in examples]  # an example is packed whole
    packing_length = auto_packing_length(item_lengths)
    rows = pack_best_fit(item_lengths, packing_length)
    efficiency = packing_efficiency(item_lengths, len(rows), packing_length)
    return [
        ("num_samples", f"{num_pairs}"),
        ("num_tokens_chosen_input", f"{chosen_tokens}"),
        ("num_tokens_rejected_input", f"{rejected_tokens}"),
        ("avg_tokens_chosen_input", f"{chosen_tokens / num_pairs:.2f}"),
        ("avg_tokens_rejected_input", f"{rejected_tokens / num_pairs:.2f}"),
        ("num_skipped_rows", f"{num_skipped}"),
        ("num_groups", f"{len(group_lengths)}"),
        ("median_group_length", f"{np.median(group_lengths):.1f}"),
        ("p95_group_length", f"{np.percentile(group_lengths, 95):.1f}"),
        ("median_prompt_completion_ratio", f"{np.median(ratios):.3f}"),
        ("num_tokens_paired", f"{paired}"),
        ("num_tokens_shared", f"{shared}"),
        ("paired_shared_ratio", f"{paired / shared:.3f}"),
        ("packing_length", f"{packing_length}"),
        ("packing_num_rows", f"{len(rows)}"),
        ("packing_efficiency", f"{efficiency:.4f}"),
    ]


def dataset_names(paths: Sequence[str]) -> list[str]:
    """Each path's name without its data suffix; with the parent folder where names clash."""
    def stem(path: str) -> str:
        name = Path(path).name
        suffix = data_suffix(name)
        return name[:-len(suffix)] if suffix else name

    counts = Counter(stem(p) for p in paths)
    names = [stem(p) if counts[stem(p)] == 1 else f"{Path(p).parent.name}/{stem(p)}"
             for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def report(name: str, paths: Sequence[str], config: DataConfig, tokenizer: Tokenizer) -> None:
    examples, num_skipped = [], 0
    for path in paths:
        data = load_preference_data(config, tokenizer, path=path, progress=False, names=FLAGS)
        examples += data.examples
        num_skipped += data.num_skipped
    for metric, value in dataset_metrics(examples, tokenizer.bos_id, num_skipped):
        print(f"{name}: {metric}={value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True,
                        help="data files, folders or hub dataset repo ids")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--name", help="report all --data as one dataset of this name")
    parser.add_argument("--split", default="train", help="split of folders and hub repos")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--columns", default="",
                        help="rename data fields first, e.g. prompt=question,chosen=response_j")
    parser.add_argument("--chat-template", default="auto",
                        help="for conversational data: auto (the tokenizer's), a .jinja file, "
                             "or none")
    parser.add_argument("--bad-rows", default="skip", choices=BAD_ROWS)
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        config = DataConfig(split=args.split, format=args.format, bad_rows=args.bad_rows,
                            columns=parse_columns(args.columns),
                            chat_template=args.chat_template)
        if args.name:
            report(args.name, args.data, config, tokenizer)
        else:
            for name, path in zip(dataset_names(args.data), args.data):
                report(name, [path], config, tokenizer)
    except (ValueError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

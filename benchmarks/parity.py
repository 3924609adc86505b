"""Per-sequence log-probs of a real checkpoint: prefixdpo's packed, prefix-shared layout against
transformers running each prompt + completion alone.

    python benchmarks/parity.py --model DIR [--data FILE] [--pairs N] [--longest]
        [--max-length L] [--dtype float64|float32] [--json OUT]

Both read the same Hugging Face folder; the examples are tokenized once, by prefixdpo's data
pipeline (the model's tokenizer), and the same token ids go to both. prefixdpo scores them in
`shared+packed` rows through its CPU executor (`documents`: attention per span); transformers
(eager attention) runs each prompt + completion as its own sequence, and the log-softmax of its
logits is gathered at the completion's tokens and summed. Printed: the largest absolute and
relative difference of the per-sequence sums, and of each pair's chosen - rejected margin.
In float64 the difference is what the kernel's float32 per-token output leaves (about 1e-7 of
each token's log-prob); a wrong mask, position or norm would show as O(1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.layout import Numbering
from prefixdpo.data.loader import fit_examples
from prefixdpo.data.tokenizer import load_tokenizer
from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.model.hf_checkpoint import load_model, resolve_model_dir
from prefixdpo.train.scoring import score_sequences

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "assets" / "data" / "hh-rlhf-helpful-base-test-1000.jsonl.gz"


def transformers_log_probs(model_dir: Path, examples, dtype: torch.dtype) -> list[float]:
    """Each prompt + completion alone, in the dataset's sequence order."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for example in examples:
            for group in example.groups:
                for completion in group.completions:
                    ids = torch.from_numpy(np.concatenate([group.prompt, completion])).long()
                    logits = model(ids[None]).logits[0].to(torch.float64)
                    start = len(group.prompt) - 1  # the last prompt token predicts the first
                    logps = logits[start:-1].log_softmax(-1)
                    out.append(float(logps.gather(1, ids[start + 1:, None]).sum()))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference data file")
    parser.add_argument("--pairs", type=int, default=16, help="the first N examples")
    parser.add_argument("--longest", action="store_true",
                        help="the N examples of the file with the longest sequences instead "
                             "(past a sliding window: Gemma 3's is 512)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="cut prompt + each completion to this many tokens")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    data = load_preference_data(DataConfig(
        path=args.data, max_examples=0 if args.longest else args.pairs,
        max_length=args.max_length, bad_rows="skip"), tokenizer)
    chosen_examples = data.examples
    if args.longest:
        def longest(example) -> int:
            return max(len(g.prompt) + len(c) for g in example.groups for c in g.completions)
        chosen_examples = sorted(chosen_examples, key=longest, reverse=True)[:args.pairs]
        chosen_examples = sorted(chosen_examples, key=lambda e: e.index)
    examples, report = fit_examples(chosen_examples, "shared+packed", "auto", "error")
    numbering = Numbering(examples)

    started = time.perf_counter()
    model = load_model(model_dir, dtype=dtype).eval()
    ours, _ = score_sequences(model, examples, layout="shared+packed",
                              packing_length=report.packing_length, micro_batch_size=2,
                              device=torch.device("cpu"), executor=AttentionExecutor("documents"),
                              progress=False)
    ours_s = time.perf_counter() - started
    del model
    started = time.perf_counter()
    theirs = torch.tensor(transformers_log_probs(model_dir, examples, dtype), dtype=torch.float64)
    theirs_s = time.perf_counter() - started

    difference = (ours - theirs).abs()
    offsets = Numbering(examples).sequence_offsets.tolist()
    pairs = [(first + c, first + r) for e, first in zip(examples, offsets) for c, r in e.pairs]
    chosen, rejected = (torch.tensor(side) for side in zip(*pairs))
    margin_difference = ((ours[chosen] - ours[rejected]) - (theirs[chosen] - theirs[rejected]))
    figures = {
        "model": str(model_dir), "dtype": args.dtype, "pairs": len(pairs),
        "sequences": numbering.num_sequences,
        "completion_tokens": int(sum(len(c) for e in examples for g in e.groups
                                     for c in g.completions)),
        "longest_sequence": max(len(g.prompt) + len(c) for e in examples for g in e.groups
                                for c in g.completions),
        "packing_length": report.packing_length,
        "max_abs_difference": float(difference.max()),
        "max_rel_difference": float((difference / theirs.abs()).max()),
        "max_margin_difference": float(margin_difference.abs().max()),
        "mean_abs_logp": float(theirs.abs().mean()),
        "prefixdpo_s": round(ours_s, 1), "transformers_s": round(theirs_s, 1),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()

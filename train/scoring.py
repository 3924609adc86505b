"""Scoring: the log-prob of every sequence of a dataset under a model, no gradient.

Used to precompute reference log-probs before training and by `scripts/score.py`. Each rank
scores its share of the micro-batches; the results are summed across ranks, so every rank ends
with the whole table, in the dataset's sequence numbering (`data.layout.Numbering`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from prefixdpo.data.example import Example
from prefixdpo.data.layout import Numbering, document_lengths, is_packed, is_shared
from prefixdpo.data.loader import PreferenceLoader
from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.train.forward import (attention_masks, batch_sequence_log_probs,
                                     sequence_and_prefix_log_probs)
from prefixdpo.train.parallelize import reshard


@torch.no_grad()
def score_sequences(model: torch.nn.Module, examples: Sequence[Example], *, layout: str,
                    packing_length: int, micro_batch_size: int, device: torch.device,
                    executor: AttentionExecutor, rank: int = 0, world_size: int = 1,
                    progress: bool = True, shared_prefix: bool = False) -> tuple[torch.Tensor, ...]:
    """(log-prob sums float64 `[num_sequences]`, token counts int64 `[num_sequences]`), and
    with `shared_prefix` (LD-DPO) a third: float64 `[num_pairs, 2]`, each pair's chosen and
    rejected sums over their first min(n_chosen, n_rejected) tokens, by pair number.
    In unpacked layouts a micro-batch grows to the rows of the largest example if needed."""
    if not is_packed(layout):
        micro_batch_size = max(micro_batch_size, max(
            len(document_lengths(e, is_shared(layout))) for e in examples))
    loader = PreferenceLoader(examples, layout, micro_batch_size, world_size=world_size,
                              rank=rank, packing_length=packing_length, shuffle=False,
                              pad_multiple=executor.row_multiple,
                              pin_memory=device.type == "cuda")
    numbering = Numbering(examples)
    num_sequences = numbering.num_sequences
    logps = torch.zeros(num_sequences, dtype=torch.float64, device=device)
    counts = torch.zeros(num_sequences, dtype=torch.int64, device=device)
    shared = torch.zeros(numbering.num_pairs if shared_prefix else 0, 2, dtype=torch.float64,
                         device=device)
    total = -(-len(loader.micro_batch_plan(0)) // world_size)
    for batch in tqdm(loader.one_pass(), total=total, desc="scoring", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        batch = batch.to(device, non_blocking=True)
        masks = attention_masks(batch, model.config, executor)
        if shared_prefix:
            sums, pair_sums = sequence_and_prefix_log_probs(model, batch, masks, True)
            shared.index_add_(0, batch.pair_ids, pair_sums.double())
            num_tokens = batch.sequence_num_tokens
        else:
            sums, num_tokens = batch_sequence_log_probs(model, batch, masks)
        logps.index_add_(0, batch.sequence_ids, sums.double())
        counts.index_add_(0, batch.sequence_ids, num_tokens)
    reshard(model)
    if world_size > 1:
        dist.all_reduce(logps)
        dist.all_reduce(counts)
        if shared_prefix:
            dist.all_reduce(shared)
    return (logps, counts, shared) if shared_prefix else (logps, counts)

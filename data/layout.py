"""Turning examples into rows of tokens: the prefix-shared group layout and the paired one.

A *document* is a prompt followed by one or more completions (DESIGN section 2):

    tokens     p_0 .. p_{P-1} | c1_0 .. c1_{C1-1} | c2_0 .. c2_{C2-1}
    positions  0   .. P-1     | P    .. P+C1-1    | P    .. P+C2-1
    segment    0              | 1                 | 2

In the shared layouts one document holds a whole group; in the paired layouts every sequence is
its own document, the prompt repeated (TRL's layout). Rows hold one document (unpacked) or
several (packed), each with its own document id; padding has document id -1, so it is never seen
by a real token.

Targets: the token at index i of a completion is predicted by the hidden state of its
predecessor, index i-1 in the row, except the completion's first token, predicted by the last
prompt token, which all completions of a group share. No token is duplicated. A `Batch` lists
for each target its flat index `row * L + predecessor` in the `[B * L]` grid of hidden states,
its token id, and the slot of the sequence it belongs to, so a sequence's log-prob is a sum over
its targets.

What the host knows while collating, it records as plain values (`num_tokens`,
`sequence_num_tokens`), so that nothing in the training step reads a device tensor back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from prefixdpo.data.example import Example, Group

PADDING_DOCUMENT = -1


def is_shared(layout: str) -> bool:
    return layout.startswith("shared")


def is_packed(layout: str) -> bool:
    return layout.endswith("+packed")


def document_lengths(example: Example, shared: bool) -> list[int]:
    """Token count of each document the example becomes."""
    if shared:
        return [g.num_tokens for g in example.groups]
    return [len(g.prompt) + len(c) for g in example.groups for c in g.completions]


@dataclass
class Batch:
    """One micro-batch of rows, ready for the model and the loss.

    Row tensors are `[B, L]`; target tensors `[T]`; sequence tensors `[S]`; pair tensors `[N]`.
    `to` and `pin_memory` move the tensors; `num_tokens` is a host int, readable without a
    device sync.
    """

    input_ids: Tensor           # int64 [B, L]
    positions: Tensor           # int64 [B, L]
    segment_ids: Tensor         # int32 [B, L]; 0 = prompt, k = k-th completion of the document
    document_ids: Tensor        # int32 [B, L]; -1 = padding
    target_index: Tensor        # int64 [T]; flat index of the predecessor in [B * L]
    target_ids: Tensor          # int64 [T]
    target_sequence: Tensor     # int64 [T]; sequence slot 0..S-1
    sequence_ids: Tensor        # int64 [S]; dataset-wide sequence number (reference lookup)
    sequence_num_tokens: Tensor  # int64 [S]; targets of each sequence (its completion's length)
    chosen_sequence: Tensor     # int64 [N]; slot of each pair's chosen sequence
    rejected_sequence: Tensor   # int64 [N]
    pair_ids: Tensor            # int64 [N]; dataset-wide pair number (output order)
    num_tokens: int             # non-padding tokens, counted while collating

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: fn(v) if isinstance(v, Tensor) else v
                        for name, v in values.items()})


class Numbering:
    """Dataset-wide numbers of sequences and pairs: example i owns sequences
    `sequence_offsets[i] ..` and pairs `pair_offsets[i] ..`, in the order of the examples list."""

    def __init__(self, examples: Sequence[Example]):
        self.sequence_offsets = np.concatenate(
            [[0], np.cumsum([e.num_sequences for e in examples])]).astype(np.int64)
        self.pair_offsets = np.concatenate(
            [[0], np.cumsum([len(e.pairs) for e in examples])]).astype(np.int64)

    @property
    def num_sequences(self) -> int:
        return int(self.sequence_offsets[-1])

    @property
    def num_pairs(self) -> int:
        return int(self.pair_offsets[-1])


class _RowBuilder:
    """Accumulates the documents of a micro-batch into flat per-row arrays."""

    def __init__(self, num_rows: int, row_length: int):
        self.row_length = row_length
        shape = (num_rows, row_length)
        self.tokens = np.zeros(shape, np.int64)
        self.positions = np.zeros(shape, np.int64)
        self.segments = np.zeros(shape, np.int32)
        self.documents = np.full(shape, PADDING_DOCUMENT, np.int32)
        self.fill = [0] * num_rows
        self.num_documents = [0] * num_rows
        self.target_index: list[np.ndarray] = []
        self.target_ids: list[np.ndarray] = []
        self.target_sequence: list[np.ndarray] = []

    def add_document(self, row: int, prompt: np.ndarray,
                     completions: Sequence[np.ndarray], slots: Sequence[int]) -> None:
        start = self.fill[row]
        p = len(prompt)
        end = start + p + sum(len(c) for c in completions)
        assert end <= self.row_length, "document does not fit its row"
        self.tokens[row, start:start + p] = prompt
        self.positions[row, start:start + p] = np.arange(p)
        self.documents[row, start:end] = self.num_documents[row]
        offset = start + p
        base = row * self.row_length
        for segment, (completion, slot) in enumerate(zip(completions, slots), start=1):
            c = len(completion)
            self.tokens[row, offset:offset + c] = completion
            self.positions[row, offset:offset + c] = np.arange(p, p + c)
            self.segments[row, offset:offset + c] = segment
            # Predecessors: the last prompt token, then the completion's own tokens.
            predecessors = np.arange(offset - 1, offset + c - 1)
            predecessors[0] = start + p - 1
            self.target_index.append(base + predecessors)
            self.target_ids.append(completion)
            self.target_sequence.append(np.full(c, slot, np.int64))
            offset += c
        self.fill[row] = end
        self.num_documents[row] += 1


def collate(rows: Sequence[Sequence[int]], examples: Sequence[Example], numbering: Numbering,
            layout: str, row_length: int) -> Batch:
    """Build a Batch. `rows[r]` lists the positions (in `examples`) of the examples placed in
    row r; in unpacked layouts a row holds one document, so an example spanning several
    documents is listed in several consecutive rows (each taking its next document)."""
    shared = is_shared(layout)
    builder = _RowBuilder(len(rows), row_length)
    sequence_ids: list[int] = []
    sequence_num_tokens: list[int] = []
    chosen, rejected, pair_ids = [], [], []
    slot_of: dict[int, int] = {}          # dataset-wide sequence number -> slot
    next_document: dict[int, int] = {}    # unpacked: which document of an example comes next
    for r, row in enumerate(rows):
        for position in row:
            example = examples[position]
            first_sequence = int(numbering.sequence_offsets[position])
            docs = _documents(example, shared)
            if not is_packed(layout):
                k = next_document.get(position, 0)
                next_document[position] = k + 1
                docs = docs[k:k + 1]
            for prompt, completions, numbers in docs:
                slots = []
                for n, completion in zip(numbers, completions):
                    slot_of[first_sequence + n] = len(sequence_ids)
                    slots.append(len(sequence_ids))
                    sequence_ids.append(first_sequence + n)
                    sequence_num_tokens.append(len(completion))
                builder.add_document(r, prompt, completions, slots)
    # Pairs, once every document of their examples is placed.
    seen: set[int] = set()
    for row in rows:
        for position in row:
            if position in seen:
                continue
            seen.add(position)
            first_sequence = int(numbering.sequence_offsets[position])
            first_pair = int(numbering.pair_offsets[position])
            for j, (c, r) in enumerate(examples[position].pairs):
                chosen.append(slot_of[first_sequence + c])
                rejected.append(slot_of[first_sequence + r])
                pair_ids.append(first_pair + j)

    def cat(parts: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts \
            else torch.zeros(0, dtype=torch.int64)

    def ints(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int64)

    target_sequence = cat(builder.target_sequence)
    # The kernels index with these without reading them back (no device sync), so they are
    # right by construction; checked here, on the host, where it is cheap.
    assert np.array_equal(np.bincount(target_sequence.numpy(), minlength=len(sequence_ids)),
                          sequence_num_tokens), "targets and sequence lengths disagree"
    return Batch(
        input_ids=torch.from_numpy(builder.tokens),
        positions=torch.from_numpy(builder.positions),
        segment_ids=torch.from_numpy(builder.segments),
        document_ids=torch.from_numpy(builder.documents),
        target_index=cat(builder.target_index),
        target_ids=cat(builder.target_ids),
        target_sequence=target_sequence,
        sequence_ids=ints(sequence_ids),
        sequence_num_tokens=ints(sequence_num_tokens),
        chosen_sequence=ints(chosen),
        rejected_sequence=ints(rejected),
        pair_ids=ints(pair_ids),
        num_tokens=int(np.count_nonzero(builder.documents != PADDING_DOCUMENT)),
    )


def _documents(example: Example, shared: bool
               ) -> list[tuple[np.ndarray, list[np.ndarray], list[int]]]:
    """(prompt, completions, sequence numbers) of each document of an example."""
    docs = []
    number = 0
    for group in example.groups:
        n = len(group.completions)
        numbers = list(range(number, number + n))
        if shared:
            docs.append((group.prompt, list(group.completions), numbers))
        else:
            docs.extend((group.prompt, [c], [k]) for c, k in zip(group.completions, numbers))
        number += n
    return docs


def fit_to_length(example: Example, length: int, shared: bool) -> Example | None:
    """The example with its completions cut (keeping their start) so that all its documents
    fit in one row of `length` tokens, or None when even one token per completion does not fit.
    The policy: cap every completion at the largest common length m that fits, so long
    completions lose tokens first and short ones are untouched."""

    def total(m: int) -> int:
        t = 0
        for g in example.groups:
            capped = sum(min(len(c), m) for c in g.completions)
            t += (len(g.prompt) + capped) if shared else \
                len(g.prompt) * len(g.completions) + capped
        return t

    longest = max(len(c) for g in example.groups for c in g.completions)
    if total(longest) <= length:
        return example
    if total(1) > length:
        return None
    lo, hi = 1, longest  # total(lo) fits, total(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= length else (lo, mid)
    groups = tuple(Group(g.prompt, tuple(c[:lo] for c in g.completions)) for g in example.groups)
    return Example(example.index, groups, example.pairs, example.id, truncated=True)

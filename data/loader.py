"""The training loader: deterministic, sharded across ranks, resumable mid-epoch, prefetching.

Each epoch is planned from `(seed, epoch)` alone:
1. the examples are shuffled;
2. packed layouts: windows of `PACK_WINDOW` shuffled examples are packed best-fit-decreasing
   into rows of `packing_length`, then the rows are shuffled; unpacked layouts: each example
   takes one row per document, in shuffled order;
3. rows are cut into micro-batches of `micro_batch_size` rows, never splitting an example (so a
   pair's chosen and rejected sequences always meet in one micro-batch). With a token budget
   instead (`PreferenceLoader.with_token_budget`, for benchmarks that compare layouts at equal
   work), a packed micro-batch takes budget // packing_length rows and an unpacked one as many
   whole examples as fit the budget once padded (an example alone may exceed it).

Optimizer step s uses micro-batches `s*A*W .. (s+1)*A*W - 1` (A = grad_accum, W = world size);
rank r takes `s*A*W + a*W + r` for a < A. So the data of a step does not depend on how it is
split into ranks and micro-batches, and every rank runs the same number of micro-batches: the
last step of an epoch is completed with empty micro-batches (all padding, no pairs), which is
also why nothing is dropped. The loss is normalized by the number of pairs the step really has.
Since the plan is the same on every rank, each rank counts the whole step's pairs and tokens on
the host (`StepBatches`), with no collective and no device read before the forward passes.

The position (epoch, step) is the state; resuming from it replays the plan and continues with
exactly the remaining batches. Batches are built in a background thread a few steps ahead.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from prefixdpo.data.config import option, setting
from prefixdpo.data.example import Example, fingerprint
from prefixdpo.data.layout import (Batch, Numbering, collate, document_lengths, fit_to_length, is_packed,
                         is_shared)
from prefixdpo.data.packing import BLOCK, auto_packing_length, pack_best_fit, packing_efficiency, round_up

logger = logging.getLogger(__name__)

PACK_WINDOW = 8192  # examples packed together: large enough to pack tightly, small enough to mix

Rows = list[list[int]]  # rows of example positions


def example_length(example: Example, layout: str) -> int:
    """Tokens the example occupies in a row of a packed layout (all its documents)."""
    return sum(document_lengths(example, is_shared(layout)))


@dataclass
class FitReport:
    packing_length: int
    num_truncated: int       # examples whose completions were cut to fit a row
    efficiency: float        # non-padding fraction of packed rows (one packing of all data)


def positions_needed(example: Example) -> int:
    """The longest prompt + completion of an example: the positions the model sees."""
    return max(len(g.prompt) + max(len(c) for c in g.completions) for g in example.groups)


def fit_examples(examples: Sequence[Example], layout: str, packing_length: int | str,
                 overlong: str, max_positions: int = 0,
                 locations: Mapping[int, str] | None = None,
                 names: Mapping[str, str] | None = None) -> tuple[list[Example], FitReport]:
    """Resolve `packing_length` ("auto" or a multiple of 128) for a packed layout and make
    every example fit one row: cut by `fit_to_length`'s policy (overlong="truncate"), or refuse
    with an error naming the example (overlong="error"). With `max_positions` (the model's
    max_position_embeddings), "auto" never picks a longer row, and an explicit longer one is
    warned about. `locations` ("file:line" by Example.index) name examples in errors; `names`
    a script's flags for the options they suggest (data.config.option)."""
    if not examples:
        raise ValueError("no examples to train on")
    lengths = [example_length(e, layout) for e in examples]
    if not is_packed(layout):
        if packing_length != "auto":
            logger.warning("%s = %s is ignored: layout %r does not pack rows (each row is "
                           "padded to the longest of its micro-batch)",
                           option("packing_length", names), packing_length, layout)
        return list(examples), FitReport(0, 0, 1.0)
    limit = max(BLOCK, max_positions // BLOCK * BLOCK) if max_positions else 0
    if packing_length == "auto":
        # One absurdly long row (a 50 MB record) must not size every row of the run: only
        # examples whose positions stay within the model's context do (a shared row holds a
        # prompt once and its completions side by side, so it may be longer than that).
        within = [n for e, n in zip(examples, lengths) if positions_needed(e) <= max_positions] \
            if max_positions else lengths
        length = auto_packing_length(within) if within else limit
    else:
        length = int(packing_length)
        if max_positions and length > max_positions:
            logger.warning("data.packing_length = %d is longer than the model's "
                           "max_position_embeddings = %d: rows that long run positions past "
                           "what the model was trained on", length, max_positions)
    fitted, num_truncated = [], 0
    for example, n in zip(examples, lengths):
        # With "auto", an example beyond the model's positions is cut to them (or refused).
        beyond = packing_length == "auto" and max_positions and \
            positions_needed(example) > max_positions
        fit = min(length, limit) if beyond else length
        if n > fit:
            where = (locations or {}).get(example.index) or f"example {example.index}"
            where += f" (id {example.id})" if example.id else ""
            cut = fit_to_length(example, fit, is_shared(layout)) \
                if overlong == "truncate" else None
            if cut is None:
                packing, max_length = option("packing_length", names), option("max_length", names)
                hint = (f"its prompts alone do not fit: raise {packing} or set "
                        f"{option('max_prompt_length', names)}" if overlong == "truncate" else
                        f"raise {packing} or set {max_length}" + (
                            "" if names is not None and "overlong" not in names else
                            f", or set {setting('overlong', 'truncate', names)}"))
                if beyond:
                    what = ("set data.max_prompt_length or data.max_length to cut it when read"
                            if overlong == "truncate" else "set data.max_length to cut long "
                            "examples when read, or data.overlong = 'truncate'")
                    raise ValueError(
                        f"{where} needs {n} tokens in layout {layout!r}, more than the model's "
                        f"max_position_embeddings = {max_positions} (data.packing_length = "
                        f"'auto' stops at {fit}); {what}")
                raise ValueError(f"{where} needs {n} tokens in layout {layout!r}, more than "
                                 f"{packing} = {length}; {hint}")
            example, num_truncated = cut, num_truncated + 1
        fitted.append(example)
    fitted_lengths = [example_length(e, layout) for e in fitted]
    rows = pack_best_fit(fitted_lengths, length)
    return fitted, FitReport(length, num_truncated,
                             packing_efficiency(fitted_lengths, len(rows), length))


@dataclass(frozen=True, eq=False)
class StepBatches(Sequence[Batch]):
    """This rank's micro-batches of one optimizer step, and the totals of the whole step over
    all ranks (what the loss is normalized by), known on the host from the loader's plan."""

    batches: list[Batch]
    num_pairs: int       # pairs in the step, all ranks
    num_tokens: int      # non-padding tokens in the step, all ranks

    @classmethod
    def single_process(cls, batches: Sequence[Batch]) -> StepBatches:
        """A step run by one process alone: its totals are those of its own micro-batches."""
        batches = list(batches)
        return cls(batches, sum(b.num_pairs for b in batches),
                   sum(b.num_tokens for b in batches))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


class PreferenceLoader:
    def __init__(self, examples: Sequence[Example], layout: str, micro_batch_size: int,
                 grad_accum: int = 1, world_size: int = 1, rank: int = 0, seed: int = 0,
                 packing_length: int = 0, pad_multiple: int = BLOCK, shuffle: bool = True,
                 prefetch: int = 2, pin_memory: bool = False, micro_batch_tokens: int = 0):
        """`micro_batch_tokens`: see `with_token_budget`."""
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be >= 1")
        self.examples = list(examples)
        self.layout = layout
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.packing_length = packing_length
        self.pad_multiple = pad_multiple
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.micro_batch_tokens = micro_batch_tokens
        self.numbering = Numbering(self.examples)
        self.num_documents = [len(document_lengths(e, is_shared(layout))) for e in self.examples]
        self.lengths = [example_length(e, layout) for e in self.examples]
        self.pair_counts = [len(e.pairs) for e in self.examples]
        if is_packed(layout):
            if packing_length <= 0 or max(self.lengths, default=0) > packing_length:
                raise ValueError(f"examples must fit packing_length={packing_length}; "
                                 "run fit_examples first")
        elif max(self.num_documents, default=0) > micro_batch_size:
            raise ValueError(
                f"an example needs {max(self.num_documents)} rows in layout {layout!r} but a "
                f"micro-batch has {micro_batch_size}: raise train.micro_batch_size")
        self.longest_document = [max(document_lengths(e, is_shared(layout)))
                                 for e in self.examples]
        self.epoch = 0
        self.step = 0  # steps of the current epoch already consumed
        # The consumer's epoch and the prefetcher's next one.
        self.micro_batch_plan = functools.lru_cache(maxsize=2)(self._plan)

    @classmethod
    def with_token_budget(cls, examples: Sequence[Example], layout: str,
                          micro_batch_tokens: int, **options) -> PreferenceLoader:
        """A loader whose micro-batches hold about `micro_batch_tokens` tokens, padding
        included, rather than a fixed number of rows: packed layouts take
        micro_batch_tokens // packing_length rows of packing_length; unpacked ones, in the
        shuffled order, as many whole examples as fit once padded to their longest row
        rounded up to `pad_multiple` (an example that exceeds the budget alone gets its own).
        The other options are the constructor's."""
        if is_packed(layout):
            rows = micro_batch_tokens // options.get("packing_length", 0)
            if rows < 1:
                raise ValueError(f"a token budget of {micro_batch_tokens} holds no packed row of "
                                 f"{options.get('packing_length', 0)} tokens")
            return cls(examples, layout, rows, **options)
        rows = max(len(document_lengths(e, is_shared(layout))) for e in examples)
        return cls(examples, layout, rows, micro_batch_tokens=micro_batch_tokens, **options)

    # ---- the plan -------------------------------------------------------------------------

    def pack(self, positions: Sequence[int]) -> Rows:
        """Rows holding the examples at `positions`, laid out as the plan lays them out: in a
        packed layout best-fit-decreasing into rows of `packing_length`; unpacked, one row
        per document, in the given order."""
        if is_packed(self.layout):
            bins = pack_best_fit([self.lengths[i] for i in positions], self.packing_length)
            return [[int(positions[j]) for j in b] for b in bins]
        return [[int(i)] for i in positions for _ in range(self.num_documents[i])]

    def _plan(self, epoch: int) -> list[Rows]:
        """All micro-batches of an epoch, as rows of example positions."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.examples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        size = self.micro_batch_size
        if is_packed(self.layout):
            rows: Rows = []
            for start in range(0, n, PACK_WINDOW):
                rows.extend(self.pack(order[start:start + PACK_WINDOW]))
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            return [rows[i:i + size] for i in range(0, len(rows), size)]
        micro: list[Rows] = []
        current: Rows = []
        longest = 0
        for i in order.tolist():
            rows = self.pack([i])
            if self.micro_batch_tokens:
                longest_after = max(longest, self.longest_document[i])
                full = (len(current) + len(rows)) * round_up(longest_after, self.pad_multiple) \
                    > self.micro_batch_tokens
            else:
                full = len(current) + len(rows) > size
            if current and full:
                micro.append(current)
                current, longest = [], 0
            current.extend(rows)
            longest = max(longest, self.longest_document[i])
        if current:
            micro.append(current)
        return micro

    @property
    def num_rows(self) -> int:
        """Rows of one epoch (packed: as packed for epoch 0; unpacked: one per document)."""
        return sum(len(rows) for rows in self.micro_batch_plan(0))

    @property
    def row_length(self) -> int:
        """The longest a micro-batch's rows can be: packed, `packing_length`; unpacked, the
        longest document rounded up to `pad_multiple`."""
        if is_packed(self.layout):
            return self.packing_length
        longest = max((n for e in self.examples
                       for n in document_lengths(e, is_shared(self.layout))), default=1)
        return round_up(longest, self.pad_multiple)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of an epoch (packed layouts: it varies a little with the packing)."""
        per_step = self.grad_accum * self.world_size
        return math.ceil(len(self.micro_batch_plan(epoch)) / per_step)

    def step_rows(self, epoch: int, step: int) -> list[Rows]:
        """This rank's micro-batches of one step (empty lists where the epoch ran out)."""
        plan = self.micro_batch_plan(epoch)
        base = step * self.grad_accum * self.world_size
        indices = [base + a * self.world_size + self.rank for a in range(self.grad_accum)]
        return [plan[i] if i < len(plan) else [] for i in indices]

    def step_totals(self, epoch: int, step: int) -> tuple[int, int]:
        """(pairs, non-padding tokens) of one whole step, all ranks, counted from the plan:
        an example lies in one micro-batch (in unpacked layouts listed once per document row)
        and fills `self.lengths[i]` tokens of it."""
        per_step = self.grad_accum * self.world_size
        num_pairs = num_tokens = 0
        for rows in self.micro_batch_plan(epoch)[step * per_step:(step + 1) * per_step]:
            for i in {i for row in rows for i in row}:
                num_pairs += self.pair_counts[i]
                num_tokens += self.lengths[i]
        return num_pairs, num_tokens

    def step_batches(self, epoch: int, step: int) -> StepBatches:
        """This rank's collated micro-batches of one step, with the step's totals."""
        return StepBatches([self.build(rows) for rows in self.step_rows(epoch, step)],
                           *self.step_totals(epoch, step))

    def build(self, rows: Rows, length: int | None = None) -> Batch:
        """Collate one micro-batch, padded to `micro_batch_size` rows (with a token budget,
        unpacked: its own rows, at least one) of a fixed length (packed) or of the longest row
        rounded up to `pad_multiple` (unpacked); or of `length`, which the rows must fit (a
        benchmark that puts one step's pairs in one row of their own length)."""
        count = max(len(rows), 1) if self.micro_batch_tokens else self.micro_batch_size
        rows = rows + [[] for _ in range(count - len(rows))]
        if length is None and is_packed(self.layout):
            length = self.packing_length
        elif length is None:
            longest = max((self.longest_document[row[0]] for row in rows if row), default=1)
            length = round_up(longest, self.pad_multiple)
        batch = collate(rows, self.examples, self.numbering, self.layout, length)
        return batch.pin_memory() if self.pin_memory else batch

    # ---- iteration and state --------------------------------------------------------------

    def __iter__(self) -> Iterator[StepBatches]:
        """Endless: each item is this rank's `grad_accum` micro-batches of the next step."""
        start = (self.epoch, self.step)

        def produce() -> Iterator[tuple[int, int, StepBatches]]:
            epoch, step = start
            while True:
                if step >= self.steps_in_epoch(epoch):
                    epoch, step = epoch + 1, 0
                yield epoch, step, self.step_batches(epoch, step)
                step += 1

        for epoch, step, batches in _prefetched(produce(), self.prefetch):
            self.epoch, self.step = epoch, step + 1
            yield batches

    def one_pass(self) -> Iterator[Batch]:
        """Every example once, in order, this rank's share: for evaluation and scoring. All
        ranks yield the same number of micro-batches (the last ones may be empty)."""
        plan = self.micro_batch_plan(0)
        per_rank = math.ceil(len(plan) / self.world_size)
        indices = (i * self.world_size + self.rank for i in range(per_rank))
        yield from _prefetched((self.build(plan[i] if i < len(plan) else []) for i in indices),
                               self.prefetch)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        return fingerprint(self.examples)

    def state_dict(self) -> dict[str, int | str]:
        """The position: `step` steps of `epoch` consumed. The plan itself is derived from the
        data and the settings, which are recorded so that a resume can check them."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "steps_in_epoch": self.steps_in_epoch(self.epoch), "layout": self.layout,
                "packing_length": self.packing_length, "data": self.data_fingerprint}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"cannot resume: the checkpoint's data seed is {state['seed']}, "
                             f"the config's {self.seed}")
        for key, now in (("layout", self.layout), ("packing_length", self.packing_length)):
            if state[key] != now:
                raise ValueError(f"cannot resume exactly: data.{key} was {state[key]!r} in the "
                                 f"checkpoint's run and is {now!r} now")
        if state["data"] != self.data_fingerprint:
            raise ValueError(
                "cannot resume exactly: the training examples differ from the checkpoint's "
                "(data.path, the tokenizer, truncation, max_examples or the evaluation hold-out "
                "changed); use the run's settings, or another train.output_dir")
        if state["steps_in_epoch"] != self.steps_in_epoch(state["epoch"]):
            raise ValueError(
                "cannot resume exactly: the data plan changed since the checkpoint "
                f"({state['steps_in_epoch']} steps in epoch {state['epoch']} then, "
                f"{self.steps_in_epoch(state['epoch'])} now); keep the data, layout, packing "
                "length and global batch (micro_batch_size x grad_accum x ranks) of the run")
        self.epoch, self.step = state["epoch"], state["step"]


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Run `items` in a background thread, up to `depth` ahead. Errors surface in the caller."""
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as e:  # handed to the consumer, re-raised there
            buffer.put(e)

    thread = threading.Thread(target=work, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # Closing the consumer (or leaving its loop) stops and joins the worker, so no thread
        # is left building batches while the process shuts down.
        stop.set()
        thread.join()

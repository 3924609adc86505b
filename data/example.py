"""A tokenized preference example: the unit every layout is built from.

One example holds one or more prefix-shared groups (a prompt and its completions) and the
preference pairs among its sequences. Sequences are numbered group by group, completion by
completion: for the usual DPO pair that is one group `(prompt, (chosen, rejected))` and
`pairs == ((0, 1),)`. A pair whose chosen and rejected prompts differ becomes two groups of one
completion each, so each side is computed with its own prompt. K ranked completions of one prompt
are one group of K with several pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Group:
    prompt: np.ndarray                  # int32 [P], P >= 1
    completions: tuple[np.ndarray, ...]  # int32 [C_k], C_k >= 1; end with EOS unless cut

    @property
    def num_tokens(self) -> int:
        """Tokens in the shared layout: the prompt once, then every completion."""
        return len(self.prompt) + sum(len(c) for c in self.completions)


@dataclass(frozen=True)
class Example:
    index: int                          # position in the source, 0-based (output order)
    groups: tuple[Group, ...]
    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected) sequence numbers
    id: str | None = None               # the row's own id, when it has one
    truncated: bool = False             # some prompt or completion was cut to fit

    @property
    def num_sequences(self) -> int:
        return sum(len(g.completions) for g in self.groups)

    @property
    def num_shared_tokens(self) -> int:
        return sum(g.num_tokens for g in self.groups)

    @property
    def num_paired_tokens(self) -> int:
        """Tokens when every sequence repeats its prompt (the unshared layouts)."""
        return sum(len(g.prompt) * len(g.completions) + sum(len(c) for c in g.completions)
                   for g in self.groups)


def fingerprint(examples: Sequence[Example]) -> str:
    """A digest of every token of every sequence, and of how they are grouped: two lists of
    examples share it only if they would train on exactly the same sequences."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.array([len(e.groups)], np.int64).tobytes())
        for g in e.groups:
            lengths = [len(g.prompt)] + [len(c) for c in g.completions]
            h.update(np.array([len(g.completions), *lengths], np.int64).tobytes())
            h.update(np.ascontiguousarray(g.prompt, np.int32).tobytes())
            for c in g.completions:
                h.update(np.ascontiguousarray(c, np.int32).tobytes())
    return h.hexdigest()

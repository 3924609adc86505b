"""Cutting a prompt and its completions to the configured lengths (TRL's semantics).

1. `max_prompt_length` cuts the prompt: `keep_end` (the default) keeps its last tokens,
   `keep_start` its first ones.
2. `max_length` bounds prompt + each completion. If the prompt alone leaves no room for one
   completion token, it is first cut to `max_length - 1` by the same mode; then every completion
   keeps its first `max_length - len(prompt)` tokens (so at least 1).

One difference from TRL: `keep_end` keeps a leading BOS (the model was trained with it at
position 0) and takes the remaining budget from the prompt's end. A cut completion loses its EOS,
as in TRL. 0 means no limit. Truncation is reported, never silent: the caller marks the example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from prefixdpo.data.config import TRUNCATION_MODES, option


def check_limits(max_length: int, max_prompt_length: int, mode: str,
                 names: Mapping[str, str] | None = None) -> None:
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"{option('truncation_mode', names)} = {mode!r}; expected one of: "
                         f"{', '.join(TRUNCATION_MODES)}")
    if max_length == 1:
        raise ValueError(f"{option('max_length', names)} = 1 leaves no room for a prompt token "
                         "and a completion token; use >= 2 (0 = no limit)")
    if max_length < 0 or max_prompt_length < 0:
        raise ValueError(f"{option('max_length', names)} and "
                         f"{option('max_prompt_length', names)} must be >= 0 (0 = no limit)")


def cut_prompt(prompt: np.ndarray, length: int, mode: str, bos_id: int | None) -> np.ndarray:
    """The prompt cut to `length` >= 1 tokens (unchanged when it is not longer)."""
    assert length >= 1
    if len(prompt) <= length:
        return prompt
    if mode == "keep_start":
        return prompt[:length]
    if bos_id is not None and prompt[0] == bos_id:
        return np.concatenate([prompt[:1], prompt[len(prompt) - (length - 1):]])
    return prompt[len(prompt) - length:]


def truncate_group(prompt: np.ndarray, completions: Sequence[np.ndarray], *, max_length: int,
                   max_prompt_length: int, mode: str = "keep_end",
                   bos_id: int | None = None) -> tuple[np.ndarray, list[np.ndarray], bool]:
    """(prompt, completions, whether anything was cut) under the limits above."""
    new_prompt = prompt
    if max_prompt_length:
        new_prompt = cut_prompt(new_prompt, max_prompt_length, mode, bos_id)
    new_completions = list(completions)
    if max_length:
        new_prompt = cut_prompt(new_prompt, max_length - 1, mode, bos_id)
        room = max_length - len(new_prompt)  # >= 1
        new_completions = [c[:room] for c in new_completions]
    truncated = len(new_prompt) < len(prompt) or any(
        len(new) < len(old) for new, old in zip(new_completions, completions))
    return new_prompt, new_completions, truncated

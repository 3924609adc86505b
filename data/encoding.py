"""Parsed preferences -> tokenized `Example`s: tokenization policy, then truncation.

The policy itself (a completion's ids are what follows the prompt's in the whole text; BOS
and EOS) is the tokenizer's, see
data/tokenizer.py; conversations are first turned into prompt and completion text by the chat
template (data/chat_template.py). All texts of a batch of rows are encoded in one
`encode_batch` call (identical texts once), which is what makes this fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefixdpo.data.chat_template import ChatTemplate, ChatTemplateBudgetError, ChatTemplateError
from prefixdpo.data.example import Example, Group
from prefixdpo.data.formats import CHAT, IDS, TEXT, Preference
from prefixdpo.data.reading import RowError
from prefixdpo.data.tokenizer import Tokenizer
from prefixdpo.data.truncation import truncate_group

_IDS_FIELDS = ("chosen_input_ids", "rejected_input_ids")


def encode_preferences(preferences: Sequence[tuple[int, Preference]], tokenizer: Tokenizer, *,
                       chat_template: ChatTemplate | None = None, max_length: int = 0,
                       max_prompt_length: int = 0, truncation_mode: str = "keep_end"
                       ) -> list[Example | RowError]:
    """One Example (or the RowError saying why not) per (index, preference), in order."""
    slots: dict[str, int] = {}  # text -> its position in the batch to encode

    def slot(text: str) -> int:
        return slots.setdefault(text, len(slots))

    # Per row: [(prompt ref, [completion refs])] per group, where a prompt ref is a text slot
    # (int), a completion ref a pair of slots (the completion alone, prompt+completion), and
    # for pre-tokenized rows either is the ids themselves (tuple).
    plans: list[list[tuple] | RowError] = []
    for _, preference in preferences:
        try:
            plans.append(_plan(preference, slot, chat_template))
        except RowError as e:
            plans.append(e)
    encoded = tokenizer.encode(list(slots))

    results: list[Example | RowError] = []
    for (index, preference), plan in zip(preferences, plans):
        if isinstance(plan, RowError):
            results.append(plan)
            continue
        try:
            groups, truncated = [], False
            for prompt_ref, completion_refs in plan:
                prompt, completions = _arrays(preference, prompt_ref, completion_refs,
                                              encoded, tokenizer)
                prompt, completions, cut = truncate_group(
                    prompt, completions, max_length=max_length,
                    max_prompt_length=max_prompt_length, mode=truncation_mode,
                    bos_id=tokenizer.bos_id)
                groups.append(Group(prompt, tuple(completions)))
                truncated |= cut
            results.append(Example(index, tuple(groups), preference.pairs, preference.id,
                                   truncated))
        except RowError as e:
            results.append(e)
    return results


def _plan(preference: Preference, slot, chat_template: ChatTemplate | None) -> list[tuple]:
    plan = []
    for group in preference.groups:
        if preference.kind == TEXT:
            plan.append(_text_refs(group.prompt, group.completions, slot))
        elif preference.kind == CHAT:
            if chat_template is None:
                raise ValueError("conversational data needs a chat template")
            try:
                prompt_text, texts = chat_template.split(group.prompt, group.completions)
            except ChatTemplateBudgetError as e:  # the template's fault: stop, not skip
                raise ValueError(f"{preference.location}: {e}") from None
            except ChatTemplateError as e:
                raise RowError(preference.location, str(e)) from None
            plan.append(_text_refs(prompt_text, texts, slot))
        else:
            assert preference.kind == IDS, preference.kind
            plan.append((group.prompt, list(group.completions)))
    return plan


def _text_refs(prompt: str, completions: Sequence[str], slot) -> tuple:
    return slot(prompt), [(slot(c), slot(prompt + c)) for c in completions]


def _arrays(preference: Preference, prompt_ref, completion_refs, encoded: list[list[int]],
            tokenizer: Tokenizer) -> tuple[np.ndarray, list[np.ndarray]]:
    if preference.kind == IDS:  # used as given
        for field, ids in (("prompt_input_ids", prompt_ref),
                           *zip(_IDS_FIELDS, completion_refs)):
            top = max(ids)
            if top >= tokenizer.vocab_size:
                raise RowError(preference.location,
                               f"field {field!r}: token id {top} is outside the tokenizer's "
                               f"vocabulary ({tokenizer.vocab_size} ids); was the data "
                               "tokenized with another tokenizer?")
        return (np.array(prompt_ref, dtype=np.int32),
                [np.array(c, dtype=np.int32) for c in completion_refs])
    prompt = tokenizer.prompt_ids(encoded[prompt_ref])
    if len(prompt) == 0:
        raise RowError(preference.location,
                       "field 'prompt': the prompt is empty and the tokenizer adds no BOS token, "
                       "so the first completion token has nothing to be predicted from; give a "
                       "non-empty prompt")
    prompt_text = encoded[prompt_ref]
    return prompt, [tokenizer.completion_after(prompt_text, encoded[whole], encoded[alone])
                    for alone, whole in completion_refs]

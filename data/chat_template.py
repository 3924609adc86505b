"""Chat templates (the jinja `chat_template` of tokenizer_config.json), rendered safely.

Templates come with checkpoints and datasets, so they are untrusted code: they render in
jinja2's `ImmutableSandboxedEnvironment`, set up as Hugging Face transformers does
(`trim_blocks`, `lstrip_blocks`, the loop-controls extension, a `tojson` filter, and the
`raise_exception` / `strftime_now` helpers), so the same template gives the same text.

For preference data a conversation is split into a prompt and a completion by rendering twice:
the prompt messages with the generation prompt (`add_generation_prompt=True`), then the prompt
plus the completion messages without it. The completion text is what the second rendering adds
after the first, which must be a prefix of it (else the template cannot be split this way and we
say so). Trailing whitespace after the completion's final end-of-sequence token text is dropped
(Mistral's template emits `</s> `), so a completion ends with exactly one EOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]  # {"role": ..., "content": ...} and whatever else a template reads


class ChatTemplateError(ValueError):
    """The template failed to compile, refused the messages, or cannot be split."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's version: jinja's own tojson escapes HTML characters, which templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template with the tokenizer's special-token strings bound to it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None],
                 eos_token: str | None = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None
        self.source = source
        # bos_token, eos_token, ... as the template expects them (HF passes these names).
        self._variables = dict(special_tokens)
        self._eos_token = eos_token if eos_token is not None else special_tokens.get("eos_token")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:  # e.g. content not a str
            raise ChatTemplateError(f"the chat template failed on the messages "
                                    f"({type(e).__name__}: {e})") from None

    def split(self, prompt: Sequence[Message],
              completions: Sequence[Sequence[Message]]) -> tuple[str, list[str]]:
        """(prompt text, completion texts): the prompt rendered with the generation prompt, and
        for each completion what rendering prompt + completion adds after it."""
        prompt_text = self.render(prompt, add_generation_prompt=True)
        texts = []
        for completion in completions:
            full_text = self.render([*prompt, *completion], add_generation_prompt=False)
            if not full_text.startswith(prompt_text):
                raise ChatTemplateError(
                    "the chat template does not render the prompt (with its generation prompt) "
                    "as a prefix of prompt + completion, so the completion cannot be cut off "
                    "it; use another template (data.chat_template) or pre-tokenized data. The "
                    f"prompt renders as ...{prompt_text[-60:]!r}, prompt + completion as "
                    f"...{full_text[max(0, len(prompt_text) - 60):len(prompt_text) + 20]!r}")
            text = full_text[len(prompt_text):]
            stripped = text.rstrip()
            if self._eos_token and stripped.endswith(self._eos_token):
                text = stripped
            if not text.strip():
                raise ChatTemplateError("the chat template renders nothing for the completion")
            texts.append(text)
        return prompt_text, texts

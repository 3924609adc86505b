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

A hostile (or broken) template must not take the process down: each rendering runs under budgets
for call nesting (a recursive macro), output size (`'x' * 100000 * 100000`, checked on `*` and on
the text produced) and time (nested `range(100000)` loops, checked on every call, every 1024th
step of each loop and every piece of output). Exceeding one raises `ChatTemplateBudgetError`,
one line naming the template.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]  # {"role": ..., "content": ...} and whatever else a template reads


MAX_CALL_DEPTH = 50          # calls (macros included) running inside one another
MIN_OUTPUT_CHARS = 1 << 20   # output budget: this, plus OUTPUT_FACTOR x the messages' text
OUTPUT_FACTOR = 10
TIME_BUDGET_S = 10.0         # per rendering; real templates take milliseconds


# The names datasets give a reply's reasoning. As transformers does, a message carrying one of
# them gets `reasoning_content` (what Qwen3's templates read) and `thinking` (gpt-oss's) too.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Any) -> Any:
    if not isinstance(message, Mapping):
        return message
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None),
                     None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplateError(ValueError):
    """The template failed to compile, refused the messages, or cannot be split."""


class ChatTemplateBudgetError(ChatTemplateError):
    """The template ran past a budget: a problem of the template, not of one row."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's version: jinja's own tojson escapes HTML characters, which templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Budget:
    """What one rendering may still use; checked from the environment's hooks."""

    def __init__(self, origin: str, max_chars: int, seconds: float) -> None:
        self.origin, self.max_chars = origin, max_chars
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.depth = 0

    def fail(self, what: str) -> ChatTemplateBudgetError:
        return ChatTemplateBudgetError(f"{self.origin}: {what}; fix the template or give "
                                       "another one")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.fail(f"rendering took longer than {self.seconds:g} s (a loop too long)")

    def check_size(self, num_chars: int) -> None:
        if num_chars > self.max_chars:
            raise self.fail(f"the output would exceed {self.max_chars} characters")


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every call, `*`, `**` and loop step checked against `budget`."""

    intercepted_binops = frozenset({"*", "**"})
    budget: _Budget | None = None

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = __self.budget
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.check_time()
        if budget.depth >= MAX_CALL_DEPTH:
            raise budget.fail(f"calls nested deeper than {MAX_CALL_DEPTH} (a recursive macro?)")
        budget.depth += 1
        try:
            return super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1

    def call_binop(self, context, operator_: str, left, right):
        budget = self.budget
        if budget is not None:
            if operator_ == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        budget.check_size(len(seq) * times)
            elif operator_ == "**" and isinstance(right, int) and abs(right) > 1000 and \
                    isinstance(left, int) and abs(left) > 1:
                raise budget.fail(f"an integer power too large ({left} ** {right})")
        return {"*": operator.mul, "**": operator.pow}[operator_](left, right)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Every {% for %} iterates through _timed(...): nested loops over anything (ranges,
        # long strings) run into the time budget, not only loops that call or output.
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name(_TIMED, "load", lineno=loop.lineno), [loop.iter],
                                   [], None, None, lineno=loop.lineno)
        tree.set_environment(self)
        return tree

    def _timed(self, iterable: Any) -> Iterator[Any]:
        for i, item in enumerate(iterable):
            if i % 1024 == 0 and self.budget is not None:
                self.budget.check_time()
            yield item


_TIMED = "_timed_iteration"  # the global _parse wraps loop iterables in


def _environment() -> _BudgetedEnvironment:
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals[_TIMED] = env._timed
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template with the tokenizer's special-token strings bound to it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None],
                 eos_token: str | None = None, *, origin: str = "the chat template",
                 time_budget: float = TIME_BUDGET_S) -> None:
        self._environment = _environment()
        # Where the template comes from, named in its errors ("the chat template in
        # <folder>/tokenizer_config.json"); given by whoever knows (data/dataset.py).
        self.origin = origin
        try:
            self._template = self._environment.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ChatTemplateError(f"{origin} does not compile: {e}{line}") from None
        self.source = source
        self.time_budget = time_budget
        # bos_token, eos_token, ... as the template expects them (HF passes these names).
        self._variables = dict(special_tokens)
        self._eos_token = eos_token if eos_token is not None else special_tokens.get("eos_token")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        text_size = sum(len(str(m.get("content", ""))) for m in messages
                        if isinstance(m, Mapping))
        budget = _Budget(self.origin, MIN_OUTPUT_CHARS + OUTPUT_FACTOR * text_size,
                         self.time_budget)
        self._environment.budget = budget
        try:
            pieces, size = [], 0
            for piece in self._template.generate(
                    messages=[_alias_reasoning(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    tools=None, documents=None, **self._variables):
                size += len(piece)
                budget.check_size(size)
                budget.check_time()
                pieces.append(piece)
            return "".join(pieces)
        except ChatTemplateBudgetError:
            raise
        except RecursionError:
            raise budget.fail("Python's recursion limit was reached") from None
        except MemoryError:
            raise budget.fail("out of memory") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
            # e.g. content that is not a str
            raise ChatTemplateError(f"the chat template failed on the messages "
                                    f"({type(e).__name__}: {e})") from None
        finally:
            self._environment.budget = None

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

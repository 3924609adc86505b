"""Loading a preference dataset: read -> parse (format) -> tokenize -> truncate -> Examples.

`load_preference_data(config, tokenizer)` is the entry point. Rows are processed in batches
(one `encode_batch` call each) and in input order; `Example.index` is the row's position among
all rows read, skipped ones included, so results can be written back in input order.

Bad rows (malformed JSON, missing fields, wrong types, empty completions, identical chosen and
rejected, ...) stop loading with a ValueError naming `file:line` and the field, unless
`data.bad_rows = "skip"`: then they are skipped, counted, listed in `PreferenceData.skipped`
and summarized in a logged warning. Problems of the whole dataset (unknown format, no chat
template for conversational data) always stop loading.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from data.chat_template import ChatTemplate
from data.config import DataConfig
from data.encoding import encode_preferences
from data.example import Example
from data.formats import CHAT, detect_format, parse_record
from data.reading import RowError, read_rows
from data.tokenizer import Tokenizer
from data.truncation import check_limits

logger = logging.getLogger(__name__)

BATCH_ROWS = 2048  # rows tokenized per encode_batch call
NUM_LISTED = 5     # skipped rows shown in summaries
_T = TypeVar("_T")


@dataclass
class PreferenceData:
    examples: list[Example]
    num_rows: int              # rows read, skipped ones included
    num_skipped: int
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", in input order
    num_truncated: int = 0     # examples with some prompt or completion cut
    format: str = ""           # the data format used (named or detected)

    def summary(self, num_listed: int = NUM_LISTED) -> str:
        lines = [f"{len(self.examples)} examples from {self.num_rows} rows ({self.format}); "
                 f"{self.num_skipped} rows skipped, {self.num_truncated} examples truncated"]
        lines += [f"  skipped {s}" for s in self.skipped[:num_listed]]
        if self.num_skipped > num_listed:
            lines.append(f"  ... and {self.num_skipped - num_listed} more")
        return "\n".join(lines)


def load_preference_data(config: DataConfig, tokenizer: Tokenizer, path: str | None = None,
                         progress: bool = True) -> PreferenceData:
    """The examples of `path` (default: config.path), tokenized and truncated per `config`."""
    path = config.path if path is None else path
    if not path:
        raise ValueError("data.path is empty: give a .jsonl / .json / .parquet file, a folder "
                         "of them, or a Hugging Face dataset repo id")
    check_limits(config.max_length, config.max_prompt_length, config.truncation_mode)
    fmt = None if config.format == "auto" else config.format
    template: ChatTemplate | None = None
    examples: list[Example] = []
    rejected: list[tuple[int, str]] = []  # (row index, "location: reason")
    num_rows = 0

    def reject(index: int, error: RowError) -> None:
        if config.bad_rows == "error":
            raise ValueError(f"{error}. To skip bad rows instead, set data.bad_rows = \"skip\" "
                             "(they are counted and listed)") from None
        rejected.append((index, str(error)))

    rows = read_rows(path, config.split)
    batch_rows = min(BATCH_ROWS, config.max_examples or BATCH_ROWS)  # read no more than needed
    with tqdm(desc=f"loading {Path(path).name or path}", unit=" rows",
              disable=not progress) as bar:
        for batch in _batches(rows, batch_rows):
            parsed = []
            for index, row in enumerate(batch, start=num_rows):
                try:
                    if row.error is not None:
                        raise RowError(row.location, row.error)
                    if fmt is None:  # the first decodable row decides
                        fmt = detect_format(row.value, row.location)
                    parsed.append((index, parse_record(row.value, row.location, fmt,
                                                       config.pairing)))
                except RowError as e:
                    reject(index, e)
            num_rows += len(batch)
            if template is None and any(p.kind == CHAT for _, p in parsed):
                template = _chat_template(config, tokenizer)
            for (index, _), result in zip(parsed, encode_preferences(
                    parsed, tokenizer, chat_template=template, max_length=config.max_length,
                    max_prompt_length=config.max_prompt_length,
                    truncation_mode=config.truncation_mode)):
                if isinstance(result, RowError):
                    reject(index, result)
                else:
                    examples.append(result)
            bar.update(len(batch))
            if config.max_examples and len(examples) >= config.max_examples:
                # Keep the first N; rows after the last kept one count as not read.
                examples = examples[:config.max_examples]
                num_rows = examples[-1].index + 1
                rejected = [r for r in rejected if r[0] < num_rows]
                break
    if not examples:
        raise ValueError(f"{path}: no usable rows ({num_rows} read, {len(rejected)} skipped"
                         + (f"; first: {rejected[0][1]}" if rejected else "") + ")")
    rejected.sort()
    data = PreferenceData(examples=examples, num_rows=num_rows, num_skipped=len(rejected),
                          skipped=[message for _, message in rejected],
                          num_truncated=sum(e.truncated for e in examples), format=fmt or "")
    if data.num_skipped:
        logger.warning("%s: %s", path, data.summary())
    return data


def _chat_template(config: DataConfig, tokenizer: Tokenizer) -> ChatTemplate:
    """The template for conversational data, per data.chat_template."""
    if config.chat_template == "none":
        raise ValueError("the data is conversational but data.chat_template = 'none'; set it "
                         "to 'auto' (the tokenizer's template) or to a .jinja file")
    return tokenizer.compile_chat_template(chat_template_override(config))


def chat_template_override(config: DataConfig) -> str | None:
    """The template text data.chat_template gives in place of the tokenizer's (a .jinja file
    or the text itself), or None for "auto" / "none"."""
    setting = config.chat_template
    if setting in ("auto", "none"):
        return None
    if Path(setting).is_file():
        return Path(setting).read_text(encoding="utf-8")
    if "{{" in setting or "{%" in setting:
        return setting
    raise ValueError(f"data.chat_template = {setting!r}: no such file; expected 'auto', "
                     "'none', a .jinja file or the template text itself")


def _batches(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch

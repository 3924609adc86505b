"""Loading a preference dataset: read -> parse (format) -> tokenize -> truncate -> Examples.

`load_preference_data(config, tokenizer)` is the entry point. Rows are processed in batches
(one `encode_batch` call each) and in input order; `Example.index` is the row's position among
all rows read, skipped ones included, so results can be written back in input order.

The format ("auto") is that of the first row, among the first DETECT_ROWS, whose format can be
told: a bad first row (`"chosen": null`) is then reported, or skipped, as the bad row it is.
`data.columns` renames fields before anything else. Bad rows (malformed JSON, missing fields,
wrong types, empty completions, identical chosen and rejected, ...) stop loading with a
ValueError naming `file:line` and the field, unless `data.bad_rows = "skip"`: then they are
skipped, counted, listed in `PreferenceData.skipped` and in a logged warning (the counts are
the caller's to print, once, with `summary()`). Problems of the whole dataset (unknown or
unpaired format, no chat template for conversational data, a chat template past its budgets)
always stop loading. Scripts pass `names` so that messages name their flags.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from prefixdpo.data.chat_template import ChatTemplate
from prefixdpo.data.config import DataConfig, option, setting
from prefixdpo.data.encoding import encode_preferences
from prefixdpo.data.example import Example
from prefixdpo.data.formats import (CHAT, detect_format, guess_format, parse_record,
                                    rename_columns)
from prefixdpo.data.reading import Row, RowError, read_rows
from prefixdpo.data.tokenizer import Tokenizer
from prefixdpo.data.truncation import check_limits

logger = logging.getLogger(__name__)

BATCH_ROWS = 2048  # rows tokenized per encode_batch call
NUM_LISTED = 5     # skipped rows shown in summaries
DETECT_ROWS = 100  # rows looked at for one whose format can be told


@dataclass
class PreferenceData:
    examples: list[Example]
    num_rows: int              # rows read, skipped ones included
    num_skipped: int
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", in input order
    num_truncated: int = 0     # examples with some prompt or completion cut
    format: str = ""           # the data format used (named or detected)
    # Where each example came from ("file:line" or "file[i]"), by Example.index.
    locations: dict[int, str] = field(default_factory=dict)
    # Fields that shape no text (OpenAI rows' input.tools), with the number of rows having them.
    unused: dict[str, int] = field(default_factory=dict)

    def summary(self, num_listed: int = NUM_LISTED) -> str:
        lines = [f"{len(self.examples)} examples from {self.num_rows} rows ({self.format}); "
                 f"{self.num_skipped} rows skipped, {self.num_truncated} examples truncated"]
        return "\n".join(lines + self.skipped_summary(num_listed).splitlines()[1:])

    def skipped_summary(self, num_listed: int = NUM_LISTED) -> str:
        """How many rows were skipped, and the first `num_listed` of them with the reason."""
        lines = [f"{self.num_skipped} rows skipped of {self.num_rows} read"]
        lines += [f"  skipped {s}" for s in self.skipped[:num_listed]]
        if self.num_skipped > num_listed:
            lines.append(f"  ... and {self.num_skipped - num_listed} more")
        return "\n".join(lines)


def load_preference_data(config: DataConfig, tokenizer: Tokenizer, path: str | None = None,
                         progress: bool = True,
                         names: Mapping[str, str] | None = None) -> PreferenceData:
    """The examples of `path` (default: config.path), tokenized and truncated per `config`.
    `names` give a script's flags for the options its messages name (data.config.option)."""
    path = config.path if path is None else path
    if not path:
        raise ValueError(f"{option('path', names)} is empty: give a .jsonl / .json / .parquet "
                         "file, a folder of them, or a Hugging Face dataset repo id")
    check_limits(config.max_length, config.max_prompt_length, config.truncation_mode, names)
    fmt = None if config.format == "auto" else config.format
    template: ChatTemplate | None = None
    examples: list[Example] = []
    rejected: list[tuple[int, str]] = []  # (row index, "location: reason")
    locations: dict[int, str] = {}
    unused: Counter[str] = Counter()
    num_rows = 0

    def reject(index: int, error: RowError) -> None:
        if config.bad_rows == "error":
            raise ValueError(f"{error}. To skip bad rows instead, set "
                             f"{setting('bad_rows', 'skip', names)} (they are counted and "
                             "listed)") from None
        rejected.append((index, str(error)))

    rows = read_rows(path, config.split, names=names)
    if fmt is None:
        fmt, rows = _detect_format(rows, config.columns, names)
    with tqdm(desc=f"loading {Path(path).name or path}", unit=" rows",
              disable=not progress) as bar:
        while True:
            # A row gives at most one example: with max_examples, read no row past the last
            # one kept, so the rows counted are the rows used.
            size = BATCH_ROWS if not config.max_examples else \
                min(BATCH_ROWS, config.max_examples - len(examples))
            batch = list(itertools.islice(rows, size))
            if not batch:
                break
            parsed = []
            for index, row in enumerate(batch, start=num_rows):
                try:
                    if row.error is not None:
                        raise RowError(row.location, row.error)
                    value = rename_columns(row.value, config.columns, row.location, names)
                    if fmt is None:  # no row of the look-ahead could be decoded
                        fmt = detect_format(value, row.location, names)
                    parsed.append((index, parse_record(value, row.location, fmt,
                                                       config.pairing)))
                    unused.update(parsed[-1][1].unused)
                    locations[index] = row.location
                except RowError as e:
                    reject(index, e)
            num_rows += len(batch)
            if template is None and any(p.kind == CHAT for _, p in parsed):
                template = _chat_template(config, tokenizer, names)
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
                break
    if not examples:
        raise ValueError(f"{path}: no usable rows ({num_rows} read, {len(rejected)} skipped"
                         + (f"; first: {rejected[0][1]}" if rejected else "") + ")")
    rejected.sort()
    data = PreferenceData(examples=examples, num_rows=num_rows, num_skipped=len(rejected),
                          skipped=[message for _, message in rejected],
                          num_truncated=sum(e.truncated for e in examples), format=fmt or "",
                          locations={e.index: locations[e.index] for e in examples},
                          unused=dict(unused))
    if data.num_skipped:
        # Only the skipped rows: the counts are the caller's to report (summary()), once.
        logger.warning("%s: %s", path, data.skipped_summary())
    if unused:
        fields = ", ".join(f"{name} ({count} rows)" for name, count in sorted(unused.items()))
        logger.warning("%s: not used: %s; the prompt is rendered from input.messages alone "
                       "(the chat template gets no tools)", path, fields)
    return data


def _detect_format(rows: Iterator[Row], columns: Mapping[str, str],
                   names: Mapping[str, str] | None) -> tuple[str | None, Iterator[Row]]:
    """The format of the first row among the first DETECT_ROWS whose format can be told (a bad
    first row is then reported as the bad row it is), and the rows, none consumed. When none
    can be told, the format the first one's keys point to (`guess_format`: every row has the
    same wrong type); None when none of them could be decoded; a ValueError when none of them
    has a known format."""
    seen: list[Row] = []
    first_error: ValueError | None = None
    guess = None  # the format the first readable row's keys point to
    for row in itertools.islice(rows, DETECT_ROWS):
        seen.append(row)
        if row.error is not None:
            continue
        try:
            value = rename_columns(row.value, columns, row.location, names)
            return detect_format(value, row.location, names), itertools.chain(seen, rows)
        except ValueError as e:  # a RowError from renaming too
            first_error = first_error or e
            guess = guess or (guess_format(value) if not isinstance(e, RowError) else None)
    if guess is not None:  # every row of the same wrong type: the first is reported as such
        return guess, itertools.chain(seen, rows)
    if first_error is not None:
        raise ValueError(f"{first_error}" + (f" (none of the first {len(seen)} rows has a "
                                            "known format)" if len(seen) > 1 else "")) from None
    return None, itertools.chain(seen, rows)


def _chat_template(config: DataConfig, tokenizer: Tokenizer,
                   names: Mapping[str, str] | None = None) -> ChatTemplate:
    """The template for conversational data, per data.chat_template."""
    name = option("chat_template", names)
    if config.chat_template == "none":
        none = setting("chat_template", "none", names)
        raise ValueError(f"the data is conversational but {none}; set it to 'auto' (the "
                         "tokenizer's template) or to a .jinja file")
    override = chat_template_override(config, names)
    if override is None and tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name}: the tokenizer has no chat_template (in "
                         "tokenizer_config.json or chat_template.jinja), and the data is "
                         f"conversational; set {name} to a .jinja file")
    origin = (f"the chat template in {config.chat_template} ({name})"
              if Path(config.chat_template).is_file() else f"the chat template given by {name}")
    return tokenizer.compile_chat_template(override, origin)


def chat_template_override(config: DataConfig,
                           names: Mapping[str, str] | None = None) -> str | None:
    """The template text data.chat_template gives in place of the tokenizer's (a .jinja file
    or the text itself), or None for "auto" / "none"."""
    setting_ = config.chat_template
    if setting_ in ("auto", "none"):
        return None
    if Path(setting_).is_file():
        return Path(setting_).read_text(encoding="utf-8")
    if "{{" in setting_ or "{%" in setting_:
        return setting_
    raise ValueError(f"{option('chat_template', names)} = {setting_!r}: no such file; expected "
                     "'auto', 'none', a .jinja file or the template text itself")

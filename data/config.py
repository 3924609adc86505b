"""The `[data]` section of a training config: where preference data comes from, how it is
tokenized and truncated, and how it is laid out into rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

FORMATS = ("auto", "standard", "conversational", "hh_rlhf", "pretokenized", "ranked")
TRUNCATION_MODES = ("keep_end", "keep_start")
PAIRINGS = ("all", "best_vs_rest", "best_vs_worst")
LAYOUTS = ("shared+packed", "shared", "paired+packed", "paired")
OVERLONG_POLICIES = ("truncate", "error")
BAD_ROWS = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    # A local .jsonl / .json / .jsonl.gz / .parquet file, or a Hugging Face dataset repo id.
    path: str = ""
    split: str = "train"                 # split of a hub dataset
    format: str = "auto"                 # one of FORMATS; auto-detected from the first row
    tokenizer: str = ""                  # folder with tokenizer.json; "" = the model's folder
    # Chat template for conversational data: "auto" uses the tokenizer's (tokenizer_config.json
    # or chat_template.jinja); a .jinja file path or the template text itself; "none" refuses
    # conversational data rather than guess a format.
    chat_template: str = "auto"
    max_length: int = 0                  # prompt + one completion, in tokens; 0 = no limit
    max_prompt_length: int = 0           # 0 = no limit
    truncation_mode: str = "keep_end"    # how prompts are cut: keep_end | keep_start
    bad_rows: str = "error"              # error | skip (skipped rows are counted and listed)
    pairing: str = "all"                 # ranked completions -> pairs: all | best_vs_rest | best_vs_worst
    max_examples: int = 0                # use the first N examples only; 0 = all
    layout: str = "shared+packed"        # one of LAYOUTS
    packing_length: int | str = "auto"   # row length for packed layouts (a multiple of 128)
    overlong: str = "truncate"           # an example longer than packing_length: truncate | error
    # Held-out evaluation data: a separate file, or a fraction of `path` held out by seed.
    eval_path: str = ""
    eval_fraction: float = 0.0
    # Fields renamed before the format is detected, {field the formats read = the data's own
    # name}, e.g. {prompt = "question", chosen = "response_j", rejected = "response_k"}.
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, allowed in (("format", FORMATS), ("truncation_mode", TRUNCATION_MODES),
                              ("pairing", PAIRINGS), ("layout", LAYOUTS),
                              ("overlong", OVERLONG_POLICIES), ("bad_rows", BAD_ROWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} = {getattr(self, name)!r}; "
                                 f"expected one of: {', '.join(allowed)}")
        for name in ("max_length", "max_prompt_length", "max_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0 (0 = no limit)")
        if self.packing_length != "auto" and (
                not isinstance(self.packing_length, int) or self.packing_length <= 0
                or self.packing_length % 128):
            raise ValueError(f"data.packing_length = {self.packing_length!r}; expected 'auto' or "
                             "a positive multiple of 128")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction = {self.eval_fraction}; expected 0 <= f < 1")
        if not isinstance(self.columns, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v
                for k, v in self.columns.items()):
            raise ValueError(f"data.columns = {self.columns!r}; expected a table of field "
                             "names, e.g. {prompt = \"question\", chosen = \"response_j\"}")


def option(key: str, names: Mapping[str, str] | None = None) -> str:
    """How messages name a data option: `data.<key>` as in a training config, or the flag a
    script gives for it (`names`: option -> flag, e.g. {"bad_rows": "--bad-rows"})."""
    return (names or {}).get(key, f"data.{key}")


def parse_columns(text: str) -> dict[str, str]:
    """A script's `--columns prompt=question,chosen=response_j` as data.columns."""
    columns = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, sep, source = (part.strip() for part in item.partition("="))
        if not (sep and target and source):
            raise ValueError(f"--columns {text!r}: expected field=column pairs separated by "
                             "commas, e.g. prompt=question,chosen=response_j")
        columns[target] = source
    return columns


def setting(key: str, value: str, names: Mapping[str, str] | None = None) -> str:
    """`data.bad_rows = "skip"` in a config, `--bad-rows skip` for a script's flag."""
    name = option(key, names)
    return f"{name} {value}" if name.startswith("-") else f'{name} = "{value}"'

"""Preference data formats: one record (a JSON object) -> a `Preference`, before tokenization.
Unpaired data (KTO-style rows with one completion and a true/false `label`) is refused: DPO
needs a chosen and a rejected completion of one prompt.

Formats (names as in `data.format`; "auto" picks one from the first record whose format can be
told, see data/dataset.py). `data.columns` renames fields first (`rename_columns`), for data
whose fields have other names (stack-exchange-paired's question/response_j/response_k):

- standard:      {"prompt": str, "chosen": str, "rejected": str}
- conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, where a
                 message is {"role": ..., "content": str} (a single message object is accepted
                 for chosen/rejected); or without "prompt", "chosen"/"rejected" holding whole
                 conversations (a plain-text "prompt" beside whole conversations, as in
                 argilla's Capybara and UltraFeedback sets, is ignored; beside replies only,
                 it is the user's message). Then each side's prompt is everything before its final assistant
                 message(s), which are the completion; for the usual data both prompts are equal
                 (the longest common message prefix) and shared. LLaMA-Factory's sharegpt form
                 {"conversations": [{"from", "value"}...], "chosen": {...}, "rejected": {...},
                 "system"?: str} is read as conversational too, and so is OpenAI's preference
                 fine-tuning form {"input": {"messages": [...]}, "preferred_output":
                 [assistant message], "non_preferred_output": [assistant message]}.
- hh_rlhf:       {"chosen": str, "rejected": str}, whole transcripts
                 "\\n\\nHuman: ...\\n\\nAssistant: ..."; each side's prompt is its text through
                 the LAST "\\n\\nAssistant:", the completion the rest.
- pretokenized:  {"prompt_input_ids": [int], "chosen_input_ids": [int],
                 "rejected_input_ids": [int]}, used as given (no BOS or EOS added later).
- ranked:        {"prompt": str | [messages], "completions": [str | [messages]],
                 "scores": [number]} (higher is better) or "ranks": [int] (1 is best, lower is
                 better). UltraFeedback-style completions are accepted too: objects with
                 "response" (or "text"/"content") and "overall_score" (or "score", or "rank"),
                 and "instruction" as the prompt's key. `data.pairing` makes the pairs: all
                 (every ordered pair with a strictly better score), best_vs_rest or
                 best_vs_worst (first best/worst on ties); completions in no pair are dropped.

When the two sides of a pair have different prompts (17 of the 8,552 HH-RLHF test pairs do), the
row becomes two groups of one completion each: each side keeps its own prompt. An "id" (or
"prompt_id") field becomes the example's id.

Bad records raise `RowError` naming the location and the field: missing field, wrong type, empty
(or whitespace-only) completion, identical chosen and rejected, text that is not valid Unicode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefixdpo.data.config import FORMATS, PAIRINGS, option, setting
from prefixdpo.data.reading import RowError

TEXT, CHAT, IDS = "text", "chat", "ids"  # what a Preference's prompts/completions hold
HH_ASSISTANT = "\n\nAssistant:"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
_NEEDS = {
    "standard": "standard rows need 'prompt', 'chosen' and 'rejected' strings",
    "conversational": "conversational rows need 'chosen' and 'rejected' message lists, and "
                      "optionally 'prompt'",
    "openai": "OpenAI preference rows need 'input' ({\"messages\": [...]}), "
              "'preferred_output' and 'non_preferred_output'",
    "hh_rlhf": "HH-RLHF rows need 'chosen' and 'rejected' transcripts",
    "pretokenized": "pre-tokenized rows need 'prompt_input_ids', 'chosen_input_ids' and "
                    "'rejected_input_ids'",
    "ranked": "ranked rows need 'prompt', 'completions' and 'scores' or 'ranks'",
}
_KNOWN = ", ".join(f for f in FORMATS if f != "auto")


@dataclass(frozen=True)
class PreferenceGroup:
    prompt: Any                   # str (TEXT), tuple of messages (CHAT), tuple of ids (IDS)
    completions: tuple[Any, ...]  # the same kind as the prompt


@dataclass(frozen=True)
class Preference:
    """A parsed record: groups as in `data.example.Example`, still text (or messages, or ids)."""
    location: str
    kind: str                           # TEXT | CHAT | IDS
    groups: tuple[PreferenceGroup, ...]
    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected) sequence numbers
    id: str | None = None
    unused: tuple[str, ...] = ()        # fields of the record that shape no text ("input.tools")


def detect_format(record: Any, location: str, names: Mapping[str, str] | None = None) -> str:
    """The format of a record, by its keys and value types. `names` name the options in the
    message (see data.config.option)."""
    if not isinstance(record, dict):
        raise ValueError(f"{location}: expected a JSON object, found {_type(record)}; cannot "
                         "tell the data format")
    keys = set(record)
    fmt = guess_format(record)
    # Text formats are told by their values too: a string prompt, a transcript.
    chosen = record.get("chosen")
    if fmt in ("pretokenized", "ranked", "conversational") or (
            fmt == "standard" and isinstance(chosen, str) and isinstance(record["prompt"], str)
    ) or (fmt == "hh_rlhf" and isinstance(chosen, str) and HH_ASSISTANT in chosen):
        return fmt
    fields = ", ".join(sorted(map(str, keys))) or "none"
    if isinstance(record.get("label"), bool) and ("messages" in keys or "completion" in keys):
        raise ValueError(f"{location}: this looks like unpaired (KTO-style) data: one completion "
                         f"per row with a true/false 'label' (fields: {fields}). DPO needs "
                         "pairs: a chosen and a rejected completion of the same prompt; pair "
                         "good and bad completions of each prompt into 'prompt', 'chosen' and "
                         "'rejected' fields first")
    columns = option("columns", names)
    rename = setting("columns", "prompt=question,chosen=response_j,rejected=response_k", names) \
        if columns.startswith("-") else (f"{columns} = {{prompt = \"question\", chosen = "
                                         "\"response_j\", rejected = \"response_k\"}")
    raise ValueError(f"{location}: cannot tell the data format (fields: {fields}); supported "
                     f"formats: {_KNOWN} (see data/formats.py). If the fields only have other "
                     f"names, rename them, e.g. {rename}; or name the format with "
                     f"{option('format', names)}")


def guess_format(record: Any) -> str | None:
    """The format a record's keys alone point to, whatever their values' types (None when
    they point to none): for data in which no record's format can be told, because every
    record has the same wrong type (a parquet column of int prompts), so that the first one is
    reported as the bad row it is, as it would be among good ones."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"} <= keys:
        return "pretokenized"
    if "completions" in keys:
        return "ranked"
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "conversational"  # OpenAI's preference fine-tuning form
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys or isinstance(record["chosen"], (list, dict)) or \
                isinstance(record.get("prompt"), list):
            return "conversational"
        return "standard" if "prompt" in keys else "hh_rlhf"
    return None


def rename_columns(record: Any, columns: Mapping[str, str], location: str,
                   names: Mapping[str, str] | None = None) -> Any:
    """A record with fields renamed per data.columns ({name the formats read: the data's own
    name}); a renamed field replaces one of the same name."""
    if not columns or not isinstance(record, dict):
        return record
    missing = [source for source in columns.values() if source not in record]
    if missing:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise RowError(location, f"missing field {missing[0]!r} (named in "
                                 f"{option('columns', names)}; this row has: {have})")
    sources = set(columns.values())
    renamed = {k: v for k, v in record.items() if k not in sources}
    renamed.update((target, record[source]) for target, source in columns.items())
    return renamed


def parse_record(record: Any, location: str, fmt: str, pairing: str = "all") -> Preference:
    """One record of format `fmt` -> Preference; RowError when the record is bad."""
    if not isinstance(record, dict):
        raise RowError(location, f"expected a JSON object, found {_type(record)}")
    if fmt == "ranked":
        return _parse_ranked(record, location, pairing)
    if fmt not in _PARSERS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of: {_KNOWN}")
    return _PARSERS[fmt](record, location)


# -- the formats -----------------------------------------------------------------------------


def _parse_standard(record: dict, location: str) -> Preference:
    fmt = "standard"
    prompt = _string(_get(record, "prompt", fmt, location), "prompt", location)
    chosen = _completion_text(_get(record, "chosen", fmt, location), "chosen", location)
    rejected = _completion_text(_get(record, "rejected", fmt, location), "rejected", location)
    return _pair(record, location, TEXT, (prompt, chosen), (prompt, rejected))


def _parse_hh_rlhf(record: dict, location: str) -> Preference:
    fmt = "hh_rlhf"
    sides = []
    for field in ("chosen", "rejected"):
        text = _string(_get(record, field, fmt, location), field, location)
        cut = text.rfind(HH_ASSISTANT)
        if cut < 0:
            raise RowError(location, f"field {field!r}: no {HH_ASSISTANT!r} in the transcript "
                                     "(HH-RLHF rows are '\\n\\nHuman: ...\\n\\nAssistant: ...'); "
                                     "is the data format right?")
        cut += len(HH_ASSISTANT)
        sides.append((text[:cut], _completion_text(text[cut:], field, location)))
    return _pair(record, location, TEXT, sides[0], sides[1])


def _parse_conversational(record: dict, location: str) -> Preference:
    fmt = "conversational"
    if "conversations" in record:
        return _parse_sharegpt(record, location)
    if "preferred_output" in record or "input" in record and "chosen" not in record:
        return _parse_openai(record, location)
    chosen = _messages(_get(record, "chosen", fmt, location), "chosen", location, single=True)
    rejected = _messages(_get(record, "rejected", fmt, location), "rejected", location,
                         single=True)
    prompt_value = record.get("prompt")
    if isinstance(prompt_value, str) and chosen[0].get("role") != "assistant":
        # Whole conversations plus a plain-text copy of the last user turn (argilla's Capybara
        # and UltraFeedback sets): the conversations are authoritative.
        prompt_value = None
    elif isinstance(prompt_value, str):
        if rejected[0].get("role") != "assistant":
            raise RowError(location, "field 'rejected' is a whole conversation but 'chosen' "
                                     "only a reply; give both as whole conversations, or both "
                                     "as replies to 'prompt'")
        prompt_value = [{"role": "user", "content": prompt_value}]
    if prompt_value is not None:
        prompt = _messages(prompt_value, "prompt", location)
        _check_reply(chosen, "chosen", location)
        _check_reply(rejected, "rejected", location)
        return _pair(record, location, CHAT, (prompt, chosen), (prompt, rejected))
    return _pair(record, location, CHAT, _split_conversation(chosen, "chosen", location),
                 _split_conversation(rejected, "rejected", location))


def _parse_sharegpt(record: dict, location: str) -> Preference:
    """LLaMA-Factory's form: {from, value} messages; chosen/rejected one message each."""
    fmt = "conversational"
    turns = _get(record, "conversations", fmt, location)
    if not isinstance(turns, list) or not turns:
        raise RowError(location, "field 'conversations': expected a non-empty list of "
                                 "{from, value} messages")
    prompt = [_sharegpt_message(m, f"conversations[{i}]", location) for i, m in enumerate(turns)]
    system = record.get("system")
    if system:
        prompt.insert(0, {"role": "system", "content": _string(system, "system", location)})
    sides = []
    for field in ("chosen", "rejected"):
        reply = _sharegpt_message(_get(record, field, fmt, location), field, location)
        _check_reply((reply,), field, location)
        sides.append((tuple(prompt), (reply,)))
    return _pair(record, location, CHAT, sides[0], sides[1])


def _parse_openai(record: dict, location: str) -> Preference:
    """OpenAI's preference fine-tuning form: {"input": {"messages": [...]}, "preferred_output":
    [assistant message], "non_preferred_output": [assistant message]}."""
    fmt = "openai"
    given = _get(record, "input", fmt, location)
    if not isinstance(given, dict) or "messages" not in given:
        raise RowError(location, "field 'input': expected an object with 'messages' (a list "
                                 f"of {{role, content}} messages), found {_type(given)}")
    prompt = _messages(given["messages"], "input.messages", location)
    sides = []
    for field in ("preferred_output", "non_preferred_output"):
        reply = _messages(_get(record, field, fmt, location), field, location, single=True)
        _check_reply(reply, field, location)
        sides.append((prompt, reply))
    preference = _pair(record, location, CHAT, sides[0], sides[1],
                       names=("preferred_output", "non_preferred_output"))
    # input.tools and the like: the chat template renders the messages alone.
    unused = tuple(f"input.{key}" for key in given if key != "messages" and given[key])
    return dataclasses.replace(preference, unused=unused) if unused else preference


def _parse_pretokenized(record: dict, location: str) -> Preference:
    fmt = "pretokenized"
    prompt = _ids(_get(record, "prompt_input_ids", fmt, location), "prompt_input_ids", location)
    chosen = _ids(_get(record, "chosen_input_ids", fmt, location), "chosen_input_ids", location)
    rejected = _ids(_get(record, "rejected_input_ids", fmt, location), "rejected_input_ids",
                    location)
    return _pair(record, location, IDS, (prompt, chosen), (prompt, rejected),
                 names=("chosen_input_ids", "rejected_input_ids"))


def _parse_ranked(record: dict, location: str, pairing: str) -> Preference:
    fmt = "ranked"
    if pairing not in PAIRINGS:
        raise ValueError(f"data.pairing = {pairing!r}; expected one of: {', '.join(PAIRINGS)}")
    prompt_key = "instruction" if "prompt" not in record and "instruction" in record else "prompt"
    prompt_value = _get(record, prompt_key, fmt, location)
    kind = CHAT if isinstance(prompt_value, list) else TEXT
    prompt = (_messages(prompt_value, prompt_key, location) if kind == CHAT
              else _string(prompt_value, prompt_key, location))
    items = _get(record, "completions", fmt, location)
    if not isinstance(items, list) or len(items) < 2:
        raise RowError(location, "field 'completions': expected a list of at least 2 "
                                 f"completions, found {_type(items)}")
    texts, item_scores = [], []
    for i, item in enumerate(items):
        field = f"completions[{i}]"
        score = None
        if isinstance(item, dict):  # UltraFeedback-style object
            key = next((k for k in ("response", "text", "content") if k in item), None)
            if key is None:
                raise RowError(location, f"field {field!r}: a completion object needs "
                                         "'response' (or 'text'/'content')")
            score_key = next((k for k in ("overall_score", "score") if k in item), None)
            if score_key is not None:
                score = _number(item[score_key], f"{field}.{score_key}", location)
            elif "rank" in item:
                score = -_number(item["rank"], f"{field}.rank", location)
            field, item = f"{field}.{key}", item[key]
        if kind == CHAT:
            reply = ({"role": "assistant", "content": item},) if isinstance(item, str) \
                else _messages(item, field, location)
            _check_reply(reply, field, location)
            texts.append(reply)
        else:
            texts.append(_completion_text(item, field, location))
        item_scores.append(score)
    scores = _scores(record, item_scores, location)
    pairs = rank_pairs(scores, pairing)
    if not pairs:
        raise RowError(location, "all completions have the same score: no preference pair; "
                                 "drop the row")
    for a, b in pairs:
        if texts[a] == texts[b]:
            raise RowError(location, f"fields 'completions[{a}]' and 'completions[{b}]' are "
                                     "identical but scored differently; fix or drop the row")
    # Completions in no pair would be computed for nothing: keep only the paired ones.
    used = sorted({i for pair in pairs for i in pair})
    number = {old: new for new, old in enumerate(used)}
    group = PreferenceGroup(prompt, tuple(texts[i] for i in used))
    return Preference(location, kind, (group,),
                      tuple((number[a], number[b]) for a, b in pairs), _row_id(record))


def _scores(record: dict, item_scores: list, location: str) -> list[float]:
    if all(s is not None for s in item_scores):
        return item_scores
    if any(s is not None for s in item_scores):
        raise RowError(location, "some completion objects carry a score and some do not")
    for key, sign in (("scores", 1.0), ("ranks", -1.0)):  # rank 1 is best: score = -rank
        if key in record:
            values = record[key]
            if not isinstance(values, list) or len(values) != len(item_scores):
                found = f"a list of {len(values)}" if isinstance(values, list) else _type(values)
                raise RowError(location, f"field {key!r}: expected a list of "
                                         f"{len(item_scores)} numbers (one per completion), "
                                         f"found {found}")
            return [sign * _number(v, f"{key}[{i}]", location) for i, v in enumerate(values)]
    raise RowError(location, "missing field 'scores' or 'ranks' (one per completion; higher "
                             "scores are better, rank 1 is best)")


def rank_pairs(scores: Sequence[float], pairing: str) -> list[tuple[int, int]]:
    """(better, worse) completion pairs from scores (higher is better)."""
    k = len(scores)
    if pairing == "all":
        return [(i, j) for i in range(k) for j in range(k) if scores[i] > scores[j]]
    best = max(range(k), key=lambda i: scores[i])   # the first best on ties
    if pairing == "best_vs_rest":
        return [(best, j) for j in range(k) if scores[j] < scores[best]]
    assert pairing == "best_vs_worst", pairing
    worst = min(range(k), key=lambda i: scores[i])  # the first worst on ties
    return [(best, worst)] if scores[best] > scores[worst] else []


_PARSERS = {"standard": _parse_standard, "conversational": _parse_conversational,
            "hh_rlhf": _parse_hh_rlhf, "pretokenized": _parse_pretokenized}


# -- building blocks -------------------------------------------------------------------------


def _pair(record: dict, location: str, kind: str, chosen: tuple, rejected: tuple,
          names: tuple[str, str] = ("chosen", "rejected")) -> Preference:
    """A (prompt, completion) pair of sides -> one shared group, or two when prompts differ."""
    (chosen_prompt, chosen_completion), (rejected_prompt, rejected_completion) = chosen, rejected
    if chosen_prompt == rejected_prompt:
        if chosen_completion == rejected_completion:
            raise RowError(location, f"fields {names[0]!r} and {names[1]!r} are identical (no "
                                     "preference to learn from); fix or drop the row")
        groups = (PreferenceGroup(chosen_prompt, (chosen_completion, rejected_completion)),)
    else:  # never substitute one side's prompt for the other's
        groups = (PreferenceGroup(chosen_prompt, (chosen_completion,)),
                  PreferenceGroup(rejected_prompt, (rejected_completion,)))
    return Preference(location, kind, groups, ((0, 1),), _row_id(record))


def _row_id(record: dict) -> str | None:
    for key in ("id", "prompt_id"):
        if record.get(key) is not None:
            return str(record[key])
    return None


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _get(record: Mapping, key: str, fmt: str, location: str) -> Any:
    if key not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise RowError(location, f"missing field {key!r} ({_NEEDS[fmt]}; this row has: {have})")
    return record[key]


def _string(value: Any, field: str, location: str) -> str:
    if not isinstance(value, str):
        raise RowError(location, f"field {field!r}: expected a string, found {_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a "\ud83d"-style JSON escape
        raise RowError(location, f"field {field!r}: text is not valid Unicode (character "
                                 f"{e.start} is a lone surrogate); fix the source's "
                                 "encoding") from None
    return value


def _completion_text(value: Any, field: str, location: str) -> str:
    text = _string(value, field, location)
    if not text.strip():
        raise RowError(location, f"field {field!r}: the completion is empty; fix or drop the row")
    return text


def _messages(value: Any, field: str, location: str,
              single: bool = False) -> tuple[dict, ...]:
    if single and isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(location, f"field {field!r}: expected a non-empty list of "
                                 f"{{role, content}} messages, found {_type(value)}")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(location, f"field '{field}[{i}]': expected a message object "
                                     f"{{role, content}}, found {_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise RowError(location, f"field '{field}[{i}]': missing {key!r} (messages are "
                                         "{\"role\": ..., \"content\": ...})")
            _string(message[key], f"{field}[{i}].{key}", location)
    return tuple(value)


def _sharegpt_message(value: Any, field: str, location: str) -> dict:
    if not isinstance(value, dict) or "from" not in value or "value" not in value:
        raise RowError(location, f"field {field!r}: expected a {{from, value}} message, "
                                 f"found {_type(value)}")
    role = _SHAREGPT_ROLES.get(value["from"])
    if role is None:
        raise RowError(location, f"field '{field}.from': unsupported role {value['from']!r} "
                                 f"(expected one of: {', '.join(_SHAREGPT_ROLES)})")
    return {"role": role, "content": _string(value["value"], f"{field}.value", location)}


def _check_reply(messages: Sequence[dict], field: str, location: str) -> None:
    """A completion: ends with a non-empty assistant message."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(location, f"field {field!r}: a completion must end with an assistant "
                                 f"message, found role {last['role']!r}")
    if not last["content"].strip():
        raise RowError(location, f"field {field!r}: the completion is empty; fix or drop the row")


def _split_conversation(messages: tuple[dict, ...], field: str,
                        location: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """(prompt, completion): the completion is the final run of assistant messages."""
    _check_reply(messages, field, location)
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    if start == 0:
        raise RowError(location, f"field {field!r}: no prompt messages before the final "
                                 "assistant message(s)")
    return messages[:start], messages[start:]


def _ids(value: Any, field: str, location: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise RowError(location, f"field {field!r}: expected a non-empty list of token ids, "
                                 f"found {_type(value)}")
    for i, token in enumerate(value):
        if type(token) is not int or token < 0:  # bool is an int subclass: refused too
            raise RowError(location, f"field '{field}[{i}]': expected a token id (an integer "
                                     f">= 0), found {token!r}")
    return tuple(value)


def _number(value: Any, field: str, location: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise RowError(location, f"field {field!r}: expected a finite number, found {value!r}")
    return float(value)

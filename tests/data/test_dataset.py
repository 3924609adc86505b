"""load_preference_data end to end: ids checked by hand with the ASCII tokenizer (id = character
code, BOS = 1, EOS = 2), bad rows, skipping, truncation, and the real HH-RLHF test split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.formats import detect_format, parse_record
from prefixdpo.data.reading import RowError, read_rows
from prefixdpo.data.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ASSETS = Path(__file__).resolve().parents[2] / "assets"
HH_FILES = sorted((SHARED / "datasets" / "hh-rlhf").glob("*/test.jsonl.gz"))


def ascii_ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(FIXTURES / "ascii_bos")


@pytest.fixture(scope="module")
def tok_nobos() -> Tokenizer:
    return Tokenizer.from_folder(FIXTURES / "ascii_nobos")


def write(tmp_path: Path, records, name: str = "d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def load(path: str, tokenizer: Tokenizer, **config):
    return load_preference_data(DataConfig(path=path, **config), tokenizer, progress=False)


def as_lists(example):
    return [(g.prompt.tolist(), [c.tolist() for c in g.completions]) for g in example.groups]


def test_standard_rows(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "Q", "chosen": "ab", "rejected": "c", "id": "r0"},
                            {"prompt": "", "chosen": "x", "rejected": "y</s>"}])
    data = load(path, tok)
    assert (data.num_rows, data.num_skipped, data.num_truncated, data.format) == \
        (2, 0, 0, "standard")
    first, second = data.examples
    assert (first.index, first.id, first.pairs, second.index, second.id) == \
        (0, "r0", ((0, 1),), 1, None)
    assert as_lists(first) == [([1, 81], [[97, 98, 2], [99, 2]])]
    # An empty prompt is just BOS; a completion ending with the EOS text gets no second EOS.
    assert as_lists(second) == [([1], [[120, 2], [121, 2]])]
    assert all(a.dtype == np.int32 for g in first.groups for a in (g.prompt, *g.completions))


def test_hh_rows_with_different_prompts_become_two_groups(tmp_path, tok):
    path = write(tmp_path, [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                             "rejected": "\n\nHuman: c\n\nAssistant: d"}])
    example, = load(path, tok).examples
    assert as_lists(example) == [([1, *ascii_ids("\n\nHuman: a\n\nAssistant:")], [[32, 98, 2]]),
                                 ([1, *ascii_ids("\n\nHuman: c\n\nAssistant:")], [[32, 100, 2]])]
    assert example.pairs == ((0, 1),)
    assert example.num_shared_tokens == example.num_paired_tokens == 2 * (1 + 22 + 3)


def test_conversational_rows_through_the_chat_template(tmp_path, tok):
    user = {"role": "user", "content": "hi"}
    path = write(tmp_path, [{"prompt": [user], "chosen": [{"role": "assistant", "content": "ok"}],
                             "rejected": [{"role": "assistant", "content": "no"}]}])
    example, = load(path, tok).examples
    # The template writes "<s>" (one BOS) and "</s> " after each reply (one EOS, space dropped).
    assert as_lists(example) == [([1, *ascii_ids("[INST] hi [/INST]")],
                                  [[*ascii_ids("ok"), 2], [*ascii_ids("no"), 2]])]


def test_chat_template_settings(tmp_path, tok, tok_nobos):
    path = write(tmp_path, [{"chosen": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "ok"}],
                             "rejected": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "no"}]}])
    with pytest.raises(ValueError, match=r"has no chat_template.*data.chat_template"):
        load(path, tok_nobos)
    with pytest.raises(ValueError, match=r'conversational but data.chat_template = "none"'):
        load(path, tok, chat_template="none")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}<{{ m.role[0] }}>{{ m.content }}{% endfor %}"
                     "{% if add_generation_prompt %}<gen>{% endif %}")
    with pytest.raises(ValueError, match=r"d.jsonl:1: the chat template does not render the "
                                         r"prompt .* as a prefix"):
        load(path, tok, chat_template=str(jinja))
    inline = "{% for m in messages %}{{ m.content }}|{% endfor %}"
    example, = load(path, tok, chat_template=inline).examples
    assert as_lists(example) == [([1, *ascii_ids("hi|")], [[*ascii_ids("ok|"), 2],
                                                           [*ascii_ids("no|"), 2]])]
    with pytest.raises(ValueError, match=r"data.chat_template = 'absent.jinja': no such file"):
        load(path, tok, chat_template="absent.jinja")


def test_template_refusal_is_a_bad_row(tmp_path, tok):
    good = {"prompt": [{"role": "user", "content": "hi"}],
            "chosen": {"role": "assistant", "content": "ok"},
            "rejected": {"role": "assistant", "content": "no"}}
    bad = dict(good, prompt=[{"role": "system", "content": "be brief"}])
    path = write(tmp_path, [good, bad])
    with pytest.raises(ValueError, match=r"d.jsonl:2: the chat template refused the messages: "
                                         r"Conversation roles must alternate"):
        load(path, tok)
    data = load(path, tok, bad_rows="skip")
    assert len(data.examples) == 1 and data.skipped[0].startswith(f"{path}:2: the chat template")


def test_pretokenized_rows_are_used_as_given(tmp_path, tok):
    path = write(tmp_path, [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7],
                             "rejected_input_ids": [8, 9]},
                            {"prompt_input_ids": [5], "chosen_input_ids": [128],
                             "rejected_input_ids": [8]}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'chosen_input_ids': token id 128 is "
                                         r"outside the tokenizer's vocabulary \(128 ids\)"):
        load(path, tok)
    data = load(path, tok, bad_rows="skip")
    assert as_lists(data.examples[0]) == [([5, 6], [[7], [8, 9]])]


def test_ranked_rows(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "Q", "completions": ["a", "b", "c"],
                             "scores": [1, 3, 2]}])
    example, = load(path, tok).examples
    assert as_lists(example) == [([1, 81], [[97, 2], [98, 2], [99, 2]])]
    assert example.pairs == ((1, 0), (1, 2), (2, 0))
    example, = load(path, tok, pairing="best_vs_worst").examples
    # Only the best ("b") and the worst ("a") stay, in their original order.
    assert as_lists(example) == [([1, 81], [[97, 2], [98, 2]])] and example.pairs == ((1, 0),)


BAD_ROWS = [
    ('{"prompt": "Q", "chosen": "a", ', "malformed JSON at column"),
    ({"prompt": "Q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "Q", "chosen": 5, "rejected": "b"}, "field 'chosen': expected a string"),
    ({"prompt": "Q", "chosen": "a", "rejected": ""}, "field 'rejected': the completion is empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"},
     "fields 'chosen' and 'rejected' are identical"),
    ([1, 2], "expected a JSON object, found a list"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_a_bad_row_stops_loading_with_its_location(tmp_path, tok, bad, reason):
    path = write(tmp_path, [{"prompt": "Q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(ValueError) as info:
        load(path, tok)
    message = str(info.value)
    assert message.startswith(f"{path}:2: {reason}")
    assert 'data.bad_rows = "skip"' in message


def test_text_that_is_not_utf8_is_a_bad_row(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n'
                     b'{"prompt": "Q", "chosen": "\xff", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid UTF-8"):
        load(str(path), tok)


def test_skip_mode_counts_lists_and_logs_every_bad_row(tmp_path, tok, caplog):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    path = write(tmp_path, [BAD_ROWS[0][0], good] + [bad for bad, _ in BAD_ROWS[1:]] + [good])
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.dataset"):
        data = load(path, tok, bad_rows="skip")
    assert [e.index for e in data.examples] == [1, 7]  # source positions: gaps where skipped
    assert (data.num_rows, data.num_skipped) == (8, 6)
    assert [s.split(": ", 1)[0] for s in data.skipped] == \
        [f"{path}:{line}" for line in (1, 3, 4, 5, 6, 7)]
    assert [s.split(": ", 1)[1] for s in data.skipped][1:] == \
        [parse_error for parse_error in (_reason(b) for b, _ in BAD_ROWS[1:])]
    assert "6 rows skipped" in caplog.text and f"skipped {path}:1: malformed JSON" in caplog.text
    assert "... and 1 more" in caplog.text


def _reason(record) -> str:
    try:
        parse_record(record, "x", "standard")
    except RowError as e:
        return e.reason
    raise AssertionError(f"{record} parsed")


def test_format_named_or_unknown(tmp_path, tok):
    path = write(tmp_path, [{"question": "q", "response_j": "a", "response_k": "b"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: cannot tell the data format"):
        load(path, tok, bad_rows="skip")  # a dataset-level problem: never skipped
    path = write(tmp_path, [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: missing field 'prompt'"):
        load(path, tok, format="standard")


def test_empty_prompt_without_bos_and_no_usable_rows(tmp_path, tok_nobos):
    path = write(tmp_path, [{"prompt": "", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'prompt': the prompt is empty and "
                                         r"the tokenizer adds no BOS"):
        load(path, tok_nobos)
    with pytest.raises(ValueError, match=r"d.jsonl: no usable rows \(1 read, 1 skipped; first: "):
        load(path, tok_nobos, bad_rows="skip")


def test_truncation_is_applied_and_counted(tmp_path, tok):
    path = write(tmp_path, [{"prompt": "abcdef", "chosen": "xyz", "rejected": "w"},
                            {"prompt": "a", "chosen": "b", "rejected": "c"}])
    data = load(path, tok, max_length=6, max_prompt_length=4)
    long, short = data.examples
    # Prompt [1, a..f] -> max_prompt_length 4 keeps BOS + "def"; completions get 6 - 4 = 2.
    assert as_lists(long) == [([1, 100, 101, 102], [[120, 121], [119, 2]])] and long.truncated
    assert as_lists(short) == [([1, 97], [[98, 2], [99, 2]])] and not short.truncated
    assert data.num_truncated == 1
    data = load(path, tok, max_length=3, truncation_mode="keep_start")
    assert as_lists(data.examples[0]) == [([1, 97], [[120], [119]])]


def test_max_examples_and_path_override(tmp_path, tok):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": str(i)} for i in range(5)]
    path = write(tmp_path, rows[:2] + ["{oops"] + rows[2:])
    data = load(path, tok, max_examples=3, bad_rows="skip")
    assert [e.index for e in data.examples] == [0, 1, 3]
    assert (data.num_rows, data.num_skipped) == (4, 1)
    data = load(path, tok, max_examples=2, bad_rows="skip")
    assert (data.num_rows, data.num_skipped) == (2, 0)  # the bad row was not reached
    other = write(tmp_path, rows[:1], "eval.jsonl")
    data = load_preference_data(DataConfig(path=path), tok, path=other, progress=False)
    assert data.num_rows == 1
    with pytest.raises(ValueError, match=r"data.path is empty"):
        load_preference_data(DataConfig(), tok, progress=False)


@pytest.mark.skipif(not HH_FILES, reason="the HH-RLHF test split is not available")
def test_hh_rlhf_test_split_rows():
    """8,552 rows: 17 pairs have different prompts (two groups), 11 have an empty completion and
    36 identical chosen and rejected transcripts. Parsing only, so it stays fast."""
    num_rows = num_two_groups = 0
    reasons = []
    for file in HH_FILES:
        for row in read_rows(str(file)):
            num_rows += 1
            try:
                preference = parse_record(row.value, row.location,
                                          detect_format(row.value, row.location))
                num_two_groups += len(preference.groups) == 2
            except RowError as e:
                reasons.append(e.reason)
    assert num_rows == 8552 and num_two_groups == 17
    assert sum("the completion is empty" in r for r in reasons) == 11
    assert sum("are identical" in r for r in reasons) == 36 and len(reasons) == 47


def test_hh_rlhf_with_the_mistral_tokenizer():
    """On the HH-RLHF slice and the Mistral tokenizer shipped in assets/."""
    tok = Tokenizer.from_folder(ASSETS / "tokenizers" / "mistral-7b-v0.1")
    file = ASSETS / "data" / "hh-rlhf-helpful-base-test-1000.jsonl.gz"
    data = load(str(file), tok, bad_rows="skip", max_examples=300)
    first = next(iter(read_rows(str(file)))).value
    cut = first["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    group, = data.examples[0].groups
    prompt_ids, whole, alone = tok.encode([first["chosen"][:cut], first["chosen"],
                                           first["chosen"][cut:]])
    assert group.prompt.tolist() == [1, *prompt_ids]
    # The completion is what follows the prompt in the whole transcript's ids: no "▁" piece
    # of its own in front, as encoding " I ..." alone gives with SentencePiece.
    assert whole[:len(prompt_ids)] == prompt_ids
    assert group.completions[0].tolist() == [*whole[len(prompt_ids):], 2]
    assert alone[1:] == whole[len(prompt_ids):] and tok.decode(alone[:1]) == ""
    assert len(data.examples) == 300 and all(
        e.groups[0].completions[0][-1] == 2 and e.groups[0].prompt[0] == 1 for e in data.examples)


def test_a_template_past_its_budget_stops_loading_naming_it(tmp_path, tok):
    """The template's fault, not a row's: never skipped (each row would hit it again)."""
    user = {"role": "user", "content": "hi"}
    path = write(tmp_path, [{"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}])
    jinja = tmp_path / "loop.jinja"
    jinja.write_text("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(ValueError, match=rf"^{path}:1: the chat template in {jinja} "
                                         r"\(data.chat_template\): calls nested deeper than 50"):
        load(path, tok, chat_template=str(jinja), bad_rows="skip")
    with pytest.raises(ValueError, match=rf"{path}:1: the chat template in .*ascii_bos/"
                                         r"tokenizer_config.json: calls"):
        tok_loop = Tokenizer.from_folder(FIXTURES / "ascii_bos")
        tok_loop.chat_template = jinja.read_text()
        load(path, tok_loop)


class _Bar:
    """Stands in for tqdm: records what the loading bar counts."""
    counted: list[int] = []

    def __init__(self, *args, **kwargs) -> None:
        _Bar.counted = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        _Bar.counted.append(n)


def test_max_examples_reads_and_counts_only_the_rows_used(tmp_path, tok, monkeypatch, caplog):
    """As in the demo (400 of 1,000 rows wanted, one bad row among them): the rows read and
    counted by the loading bar are the rows used, not a second whole batch read and then cut;
    the counts are printed once, by summary(), and the warning lists the skipped rows only."""
    import prefixdpo.data.dataset as dataset_module

    rows = [{"prompt": "Q", "chosen": "a", "rejected": str(i)} for i in range(12)]
    rows[2] = {"prompt": "Q", "chosen": "a", "rejected": ""}
    path = write(tmp_path, rows)
    monkeypatch.setattr(dataset_module, "tqdm", _Bar)
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.dataset"):
        loaded = load_preference_data(DataConfig(path=path, max_examples=4, bad_rows="skip"),
                                      tok, progress=True)
    assert [e.index for e in loaded.examples] == [0, 1, 3, 4]
    assert (loaded.num_rows, loaded.num_skipped, sum(_Bar.counted)) == (5, 1, 5)
    assert _Bar.counted == [4, 1]
    assert loaded.summary().splitlines()[0].startswith("4 examples from 5 rows (standard)")
    assert "examples from" not in caplog.text
    assert f"1 rows skipped of 5 read\n  skipped {path}:3: field 'rejected'" in caplog.text


def test_rows_that_python_cannot_parse_are_skippable(tmp_path, tok):
    """Before: a RecursionError traceback, or Python's int_max_str_digits advice without file
    or line, and neither skipped by bad_rows = "skip"."""
    good = {"prompt": "Q", "chosen": "ab", "rejected": "c"}
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "b", "rejected": "c"}'
    long_int = '{"prompt": "a", "id": ' + "7" * 5000 + ', "chosen": "b", "rejected": "c"}'
    path = write(tmp_path, [deep, good, long_int, good])
    data = load(path, tok, bad_rows="skip")
    assert (data.num_rows, data.num_skipped, len(data.examples)) == (4, 2, 2)
    assert data.skipped[0].startswith(f"{path}:1: JSON nested too deeply")
    assert data.skipped[1].startswith(f"{path}:3: JSON that Python cannot read")
    with pytest.raises(ValueError, match=rf"^{path}:1: JSON nested too deeply.*data.bad_rows"):
        load(path, tok)


@pytest.mark.parametrize("where", ["data.chat_template", "chat_template.jinja",
                                   "tokenizer_config.json"])
def test_a_template_that_does_not_compile_names_its_file(tmp_path, where):
    """Before: 'the chat template does not compile: ...', naming no file."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / "ascii_bos", folder)
    broken = "{% for m in messages %}{{ m.content }}"  # no endfor
    user = {"role": "user", "content": "hi"}
    path = write(tmp_path, [{"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}])
    settings = {}
    if where == "data.chat_template":
        (tmp_path / "t.jinja").write_text(broken)
        settings["chat_template"] = str(tmp_path / "t.jinja")
        expected = f"the chat template in {tmp_path / 't.jinja'} (data.chat_template)"
    elif where == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(broken)
        expected = f"the chat template in {folder / 'chat_template.jinja'}"
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                                  "chat_template": broken}))
        expected = f"the chat template in {folder / 'tokenizer_config.json'}"
    with pytest.raises(ValueError) as error:
        load(path, Tokenizer.from_folder(folder), **settings)
    assert str(error.value).startswith(f"{expected} does not compile: "), str(error.value)
    assert "(line 1)" in str(error.value) and "\n" not in str(error.value)


def test_openai_rows_with_tools_say_the_tools_are_not_used(tmp_path, tok, caplog):
    """Before: the rows trained with their tools dropped, without a word."""
    user = {"role": "user", "content": "weather?"}
    row = {"input": {"messages": [user], "tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {}}}]},
           "preferred_output": [{"role": "assistant", "content": "sunny"}],
           "non_preferred_output": [{"role": "assistant", "content": "no idea"}]}
    plain = {**row, "input": {"messages": [user]}}
    path = write(tmp_path, [row, plain, row])
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data"):
        data = load(path, tok, chat_template=template)
    assert len(data.examples) == 3 and data.unused == {"input.tools": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{path}: not used: input.tools (2 rows); the prompt is rendered from "
                        "input.messages alone (the chat template gets no tools)"]

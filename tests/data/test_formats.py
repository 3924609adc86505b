"""Parsing records of every format, auto-detection, ranked pairings and bad records."""

from __future__ import annotations

import pytest

from prefixdpo.data.formats import (CHAT, IDS, TEXT, Preference, PreferenceGroup, detect_format,
                          parse_record, rank_pairs, rename_columns)
from prefixdpo.data.reading import RowError

LOC = "d.jsonl:7"
U = {"role": "user", "content": "hi"}
A1 = {"role": "assistant", "content": "good"}
A2 = {"role": "assistant", "content": "bad"}


def parse(record, fmt=None, pairing="all") -> Preference:
    return parse_record(record, LOC, fmt or detect_format(record, LOC), pairing)


def test_standard():
    p = parse({"prompt": "Q", "chosen": "good", "rejected": "bad", "id": 12})
    assert p == Preference(LOC, TEXT, (PreferenceGroup("Q", ("good", "bad")),), ((0, 1),), "12")


def test_hh_rlhf_splits_at_the_last_assistant_turn():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    p = parse({"chosen": prompt + " good", "rejected": prompt + " bad"})
    assert p.kind == TEXT and p.id is None
    assert p.groups == (PreferenceGroup(prompt, (" good", " bad")),) and p.pairs == ((0, 1),)


def test_hh_rlhf_with_different_prompts_becomes_two_groups():
    p = parse({"chosen": "\n\nHuman: a\n\nAssistant: good",
               "rejected": "\n\nHuman: b\n\nAssistant: bad"})
    assert p.groups == (PreferenceGroup("\n\nHuman: a\n\nAssistant:", (" good",)),
                        PreferenceGroup("\n\nHuman: b\n\nAssistant:", (" bad",)))
    assert p.pairs == ((0, 1),)


def test_conversational_with_explicit_prompt_and_single_message_completions():
    p = parse({"prompt": [U], "chosen": [A1], "rejected": A2, "prompt_id": "x9"})
    assert p == Preference(LOC, CHAT, (PreferenceGroup((U,), ((A1,), (A2,))),), ((0, 1),), "x9")


def test_conversational_implicit_prompt():
    history = [U, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"}]
    p = parse({"chosen": history + [A1], "rejected": history + [A2]})
    assert p.groups == (PreferenceGroup(tuple(history), ((A1,), (A2,))),)
    # Different histories: each side keeps its own prompt.
    other = [{"role": "user", "content": "other"}]
    p = parse({"chosen": history + [A1], "rejected": other + [A2]})
    assert p.groups == (PreferenceGroup(tuple(history), ((A1,),)),
                        PreferenceGroup(tuple(other), ((A2,),)))


def test_conversational_with_a_plain_text_prompt():
    """argilla's Capybara rows: whole conversations plus a text copy of the last user turn,
    which is ignored; beside replies only, a text prompt is the user's message."""
    history = [U, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"}]
    p = parse({"prompt": "more", "chosen": history + [A1], "rejected": history + [A2]})
    assert p.groups == (PreferenceGroup(tuple(history), ((A1,), (A2,))),)
    p = parse({"prompt": "hi", "chosen": [A1], "rejected": [A2]}, fmt="conversational")
    assert p.groups == (PreferenceGroup((U,), ((A1,), (A2,))),)


def test_sharegpt_conversations():
    p = parse({"conversations": [{"from": "human", "value": "hi"}], "system": "be kind",
               "chosen": {"from": "gpt", "value": "good"},
               "rejected": {"from": "gpt", "value": "bad"}})
    system = {"role": "system", "content": "be kind"}
    assert p.kind == CHAT
    assert p.groups == (PreferenceGroup((system, U), ((A1,), (A2,))),)


def test_pretokenized():
    p = parse({"prompt_input_ids": [1, 5], "chosen_input_ids": [7, 2],
               "rejected_input_ids": [8, 2]})
    assert p == Preference(LOC, IDS, (PreferenceGroup((1, 5), ((7, 2), (8, 2))),), ((0, 1),))


@pytest.mark.parametrize("pairing, pairs", [
    ("all", [(0, 1), (0, 3), (2, 0), (2, 1), (2, 3), (3, 1)]),
    ("best_vs_rest", [(2, 0), (2, 1), (2, 3)]),
    ("best_vs_worst", [(2, 1)])])
def test_rank_pairs(pairing, pairs):
    assert rank_pairs([2.0, 0.0, 5.0, 1.0], pairing) == pairs


def test_rank_pairs_ties():
    assert rank_pairs([1, 1, 0], "all") == [(0, 2), (1, 2)]
    assert rank_pairs([1, 1, 0], "best_vs_rest") == [(0, 2)]
    assert rank_pairs([1, 1], "best_vs_worst") == []


def test_ranked_scores_ranks_and_dropped_completions():
    p = parse({"prompt": "Q", "completions": ["a", "b", "c"], "scores": [0.5, 0.9, 0.1]})
    assert p.groups == (PreferenceGroup("Q", ("a", "b", "c")),)
    assert p.pairs == ((0, 2), (1, 0), (1, 2))
    p = parse({"prompt": "Q", "completions": ["a", "b", "c"], "ranks": [2, 1, 3]},
              pairing="best_vs_worst")
    # Only the best ("b") and the worst ("c") are kept, renumbered 0 and 1.
    assert p.groups == (PreferenceGroup("Q", ("b", "c")),) and p.pairs == ((0, 1),)


def test_ranked_ultrafeedback_objects_and_chat_prompt():
    record = {"instruction": "Q", "completions": [
        {"model": "m1", "response": "a", "overall_score": 3.5},
        {"model": "m2", "response": "b", "overall_score": 7}]}
    p = parse(record)
    assert p.kind == TEXT and p.groups == (PreferenceGroup("Q", ("a", "b")),)
    assert p.pairs == ((1, 0),)
    p = parse({"prompt": [U], "completions": ["good", [A2]], "scores": [1, 0]})
    assert p.kind == CHAT and p.groups == (PreferenceGroup((U,), ((A1,), (A2,))),)


@pytest.mark.parametrize("record, fmt", [
    ({"prompt": "Q", "chosen": "a", "rejected": "b"}, "standard"),
    ({"prompt": [U], "chosen": [A1], "rejected": [A2]}, "conversational"),
    ({"chosen": [U, A1], "rejected": [U, A2]}, "conversational"),
    ({"conversations": [], "chosen": {}, "rejected": {}}, "conversational"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "hh_rlhf"),
    ({"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []},
     "pretokenized"),
    ({"prompt": "Q", "completions": [], "scores": []}, "ranked"),
    ({"input": {"messages": [U]}, "preferred_output": [A1], "non_preferred_output": [A2]},
     "conversational")])
def test_detect_format(record, fmt):
    assert detect_format(record, LOC) == fmt


@pytest.mark.parametrize("record", [{"question": "q", "response_j": "a", "response_k": "b"},
                                    {"chosen": "a", "rejected": "b"}])
def test_unknown_format_names_the_row_and_what_to_do(record):
    with pytest.raises(ValueError, match=r"^d.jsonl:7: cannot tell the data format \(fields: "
                                         r".*rename them, e.g. data.columns = .*data.format$"):
        detect_format(record, LOC)
    with pytest.raises(ValueError, match=r"^d.jsonl:7: expected a JSON object, found a list"):
        detect_format([1, 2], LOC)


@pytest.mark.parametrize("record, fmt, message", [
    ({"prompt": "Q", "chosen": "a"}, "standard",
     r"missing field 'rejected' \(standard rows need .*this row has: chosen, prompt\)"),
    ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "standard",
     r"field 'chosen': expected a string, found a list"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "standard",
     r"field 'prompt': expected a string, found a number"),
    ({"prompt": "Q", "chosen": "a", "rejected": "  \n"}, "standard",
     r"field 'rejected': the completion is empty"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "standard",
     r"fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "chosen": "a\ud83d", "rejected": "b"}, "standard",
     r"field 'chosen': text is not valid Unicode"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"},
     "hh_rlhf", r"field 'chosen': the completion is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns"}, "hh_rlhf",
     r"field 'rejected': no '\\n\\nAssistant:' in the transcript"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
     "hh_rlhf", r"fields 'chosen' and 'rejected' are identical"),
    ({"prompt": [U], "chosen": [{"role": "assistant"}], "rejected": [A2]}, "conversational",
     r"field 'chosen\[0\]': missing 'content'"),
    ({"prompt": [U], "chosen": [A1], "rejected": [U]}, "conversational",
     r"field 'rejected': a completion must end with an assistant message"),
    ({"chosen": [A1], "rejected": [U, A2]}, "conversational",
     r"field 'chosen': no prompt messages before the final assistant"),
    ({"chosen": [U, {"role": "assistant", "content": " "}], "rejected": [U, A2]},
     "conversational", r"field 'chosen': the completion is empty"),
    ({"prompt_input_ids": [1], "chosen_input_ids": [3, True], "rejected_input_ids": [4]},
     "pretokenized", r"field 'chosen_input_ids\[1\]': expected a token id"),
    ({"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [4]},
     "pretokenized", r"field 'chosen_input_ids': expected a non-empty list"),
    ({"prompt": "Q", "completions": ["a", "b"]}, "ranked", r"missing field 'scores' or 'ranks'"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1]}, "ranked",
     r"field 'scores': expected a list of 2 numbers"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, float("nan")]}, "ranked",
     r"field 'scores\[1\]': expected a finite number"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, 1]}, "ranked",
     r"all completions have the same score"),
    ({"prompt": "Q", "completions": ["a", "a"], "scores": [1, 0]}, "ranked",
     r"fields 'completions\[0\]' and 'completions\[1\]' are identical"),
    ({"prompt": "Q", "completions": ["a"], "scores": [1]}, "ranked",
     r"field 'completions': expected a list of at least 2"),
    ({"prompt": "Q", "completions": [{"text": "a", "score": 1}, {"text": "", "score": 0}]},
     "ranked", r"field 'completions\[1\].text': the completion is empty"),
])
def test_bad_records_name_location_and_field(record, fmt, message):
    with pytest.raises(RowError, match=r"^d.jsonl:7: " + message) as info:
        parse_record(record, LOC, fmt)
    assert info.value.location == LOC


def test_a_record_that_is_not_an_object():
    with pytest.raises(RowError, match=r"^d.jsonl:7: expected a JSON object, found a list"):
        parse_record([1], LOC, "standard")


def test_openai_preference_form():
    p = parse({"input": {"messages": [U], "tools": []}, "preferred_output": [A1],
               "non_preferred_output": A2})
    assert p == Preference(LOC, CHAT, (PreferenceGroup((U,), ((A1,), (A2,))),), ((0, 1),))


@pytest.mark.parametrize("record", [
    {"messages": [U, A1], "label": True},
    {"prompt": "Q", "completion": "a", "label": False}])
def test_unpaired_data_is_refused_with_its_own_message(record):
    with pytest.raises(ValueError, match=r"^d.jsonl:7: this looks like unpaired \(KTO-style\) "
                                         r"data.*DPO needs pairs"):
        detect_format(record, LOC)


def test_rename_columns():
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    record = {"question": "q", "response_j": "a", "response_k": "b", "qid": 3, "prompt": "old"}
    assert rename_columns(record, columns, LOC) == {"qid": 3, "prompt": "q", "chosen": "a",
                                                    "rejected": "b"}
    assert rename_columns([1], columns, LOC) == [1]  # refused later, as any non-object
    with pytest.raises(RowError, match=r"^d.jsonl:7: missing field 'response_k' \(named in "
                                       r"--columns; this row has: question, response_j\)"):
        rename_columns({"question": "q", "response_j": "a"}, columns, LOC,
                       names={"columns": "--columns"})


def test_ranked_scores_of_the_wrong_length_say_their_length():
    """Before: 'expected a list of 3 numbers (one per completion), found a list'."""
    record = {"prompt": "Q", "completions": ["a", "b", "c"], "scores": [1, 2]}
    with pytest.raises(RowError, match=r"field 'scores': expected a list of 3 numbers \(one per "
                                       r"completion\), found a list of 2$"):
        parse_record(record, LOC, "ranked")

"""The formats of public preference sets and tools, read from small fixtures (generated rows in
each schema, fixtures/formats/): OpenAI preference fine-tuning, TRL conversational with a system
turn, UltraFeedback-binarized and argilla, LLaMA-Factory sharegpt (English and Chinese), hub
parquet shards; `data.columns`; unpaired data refused; a bad first row reported as itself.
Every malformed row names its file:line (or file[row]) and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import load_preference_data
from prefixdpo.data.formats import CHAT, PreferenceGroup, detect_format, parse_record
from prefixdpo.data.reading import read_rows
from prefixdpo.data.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = FIXTURES / "formats"
REPO = Path(__file__).resolve().parents[2]
SHARED_TOKENIZERS = REPO.parent / "shared" / "data" / "tokenizers"
MISTRAL = REPO / "assets" / "tokenizers" / "mistral-7b-v0.1"

S = {"role": "system", "content": "You are a concise assistant."}


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


# SmolLM2-135M-Instruct's chat template (Apache-2.0): ChatML, with a default system turn.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Tokenizer:
    """A byte-level tokenizer (one token per byte, as SmolLM2's and Llama 3's are byte-level)
    with SmolLM2's special tokens and chat template: BOS is `<|im_start|>`, which the template
    writes itself, and the post-processor adds nothing."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(specials)
    folder = tmp_path_factory.mktemp("smollm2")
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "chat_template": SMOLLM2_TEMPLATE}))
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    folder = SHARED_TOKENIZERS / "llama-3"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the Llama 3 tokenizer is not available at {folder}")
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def mistral() -> Tokenizer:
    return Tokenizer.from_folder(MISTRAL)


def load(path, tokenizer: Tokenizer, **config):
    return load_preference_data(DataConfig(path=str(path), **config), tokenizer, progress=False)


def parse_all(path: Path) -> list:
    rows = list(read_rows(str(path)))
    return [parse_record(r.value, r.location, detect_format(r.value, r.location)) for r in rows]


def write_jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def first_row(name: str) -> dict:
    return next(iter(read_rows(str(FORMATS / name)))).value


def assert_bad_row(path: Path, tokenizer: Tokenizer, line: int, message: str, **config):
    """Loading stops at `path:line` with `message`; with bad_rows = "skip" the row is skipped
    and the others load."""
    with pytest.raises(ValueError) as info:
        load(path, tokenizer, **config)
    assert str(info.value).startswith(f"{path}:{line}: {message}"), str(info.value)
    data = load(path, tokenizer, bad_rows="skip", **config)
    assert data.num_skipped == 1 and data.skipped[0].startswith(f"{path}:{line}: {message}")


# -- OpenAI preference fine-tuning ------------------------------------------------------------


def test_openai_preference_rows():
    first, second = parse_all(FORMATS / "openai_preference.jsonl")
    assert first.kind == CHAT and first.groups == (PreferenceGroup(
        (u("What is the capital of France?"),), ((a("Paris."),), (a("Lyon, I think."),))),)
    assert second.groups[0].prompt == (S, u("Name a prime number."), a("7."), u("Another one?"))
    assert second.groups[0].completions == ((a("11."),), (a("9."),))


def test_openai_preference_rows_load(smollm2):
    data = load(FORMATS / "openai_preference.jsonl", smollm2)
    assert data.format == "conversational" and len(data.examples) == 2
    prompt = smollm2.decode(data.examples[0].groups[0].prompt)
    assert prompt.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("change, message", [
    ({"non_preferred_output": None}, "missing field 'non_preferred_output'"),
    ({"input": [u("hi")]}, "field 'input': expected an object with 'messages'"),
    ({"input": {"messages": []}}, "field 'input.messages': expected a non-empty list"),
    ({"preferred_output": [u("hi")]},
     "field 'preferred_output': a completion must end with an assistant message"),
    ({"preferred_output": [{"role": "assistant", "content": None}]},
     "field 'preferred_output[0].content': expected a string, found null"),
    ({"non_preferred_output": [a("Paris.")]},
     "fields 'preferred_output' and 'non_preferred_output' are identical"),
])
def test_openai_malformed_rows(tmp_path, smollm2, change, message):
    good = first_row("openai_preference.jsonl")
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    assert_bad_row(write_jsonl(tmp_path, [good, bad]), smollm2, 2, message)


# -- TRL conversational: system turn, multi-turn prompts, real templates ----------------------


def check_prompt_and_completions(tokenizer: Tokenizer, path: Path) -> None:
    """One prompt per row, rendered with the generation prompt, shared by both completions; each
    completion is exactly what the template adds (then EOS, unless the template wrote it); the
    ids are those of the whole text; BOS once, written by the template."""
    data = load(path, tokenizer)
    template = tokenizer.compile_chat_template()
    eos = tokenizer.special_tokens["eos_token"]
    for example, row in zip(data.examples, read_rows(str(path))):
        record = row.value
        group, = example.groups  # one prompt: the same prompt tokens for both completions
        prompt = group.prompt.tolist()
        prompt_text = template.render(record["prompt"], add_generation_prompt=True)
        assert tokenizer.decode(prompt) == prompt_text
        assert prompt[0] == tokenizer.bos_id and prompt[1] != tokenizer.bos_id  # not doubled
        for completion, side in zip(group.completions, ("chosen", "rejected")):
            full = template.render(record["prompt"] + record[side])
            assert full.startswith(prompt_text)
            added = full[len(prompt_text):]
            ids = completion.tolist()
            if added.rstrip().endswith(eos):  # the template ends the turn with EOS
                added = added.rstrip()
            else:
                assert ids[-1] == tokenizer.eos_id
                ids = ids[:-1]
            assert tokenizer.decode(ids) == added
            assert tokenizer.encode([prompt_text + added])[0] == prompt + ids


def test_trl_conversational_with_smollm2_template(smollm2):
    path = FORMATS / "trl_conversational.jsonl"
    check_prompt_and_completions(smollm2, path)
    example = load(path, smollm2).examples[1]
    chosen = smollm2.decode(example.groups[0].completions[0])
    assert chosen == "Chien.<|im_end|>"  # the template's end-of-turn is the EOS: not doubled


def test_trl_conversational_with_llama3_template(llama3):
    path = FORMATS / "trl_conversational.jsonl"
    check_prompt_and_completions(llama3, path)
    example = load(path, llama3).examples[0]
    text = llama3.decode(example.groups[0].prompt)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert example.groups[0].prompt.tolist().count(llama3.bos_id) == 1


@pytest.mark.parametrize("change, message", [
    ({"prompt": [S, {"role": "user"}]}, "field 'prompt[1]': missing 'content'"),
    ({"chosen": [u("more?")]}, "field 'chosen': a completion must end with an assistant"),
    ({"rejected": "Green."}, "field 'rejected': expected a non-empty list of {role, content}"),
])
def test_trl_conversational_malformed_rows(tmp_path, smollm2, change, message):
    good = first_row("trl_conversational.jsonl")
    assert_bad_row(write_jsonl(tmp_path, [good, {**good, **change}]), smollm2, 2, message)


# -- UltraFeedback-binarized and argilla: whole conversations plus a text prompt --------------


@pytest.mark.parametrize("name", ["ultrafeedback_binarized.jsonl", "argilla_capybara.jsonl"])
def test_whole_conversations_with_a_text_prompt(name, smollm2):
    rows = [r.value for r in read_rows(str(FORMATS / name))]
    for preference, row in zip(parse_all(FORMATS / name), rows):
        group, = preference.groups
        assert group.prompt == tuple(row["chosen"][:-1]) == tuple(row["rejected"][:-1])
        assert group.completions == ((row["chosen"][-1],), (row["rejected"][-1],))
        assert preference.id == row.get("prompt_id")
    data = load(FORMATS / name, smollm2)
    assert len(data.examples) == 2 and data.format == "conversational"


@pytest.mark.parametrize("name, change, message", [
    ("ultrafeedback_binarized.jsonl", {"chosen": [u("Write a haiku about rain.")]},
     "field 'chosen': a completion must end with an assistant message"),
    ("ultrafeedback_binarized.jsonl", {"rejected": None}, "missing field 'rejected'"),
    ("argilla_capybara.jsonl", {"chosen": [a("100 °C.")]},
     "field 'rejected' is a whole conversation but 'chosen' only a reply"),
    ("argilla_capybara.jsonl", {"rejected": [a("90 °C.")]},
     "field 'rejected': no prompt messages before the final assistant"),
    ("argilla_capybara.jsonl", {"rejected": [u("x"), {"role": "assistant", "content": 5}]},
     "field 'rejected[1].content': expected a string, found a number"),
])
def test_whole_conversations_malformed_rows(tmp_path, smollm2, name, change, message):
    good = first_row(name)
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    assert_bad_row(write_jsonl(tmp_path, [good, bad]), smollm2, 2, message)


# -- LLaMA-Factory sharegpt DPO, English and Chinese ------------------------------------------


def test_sharegpt_english(mistral):
    first, second = parse_all(FORMATS / "sharegpt_en.json")
    assert first.groups == (PreferenceGroup((u("Give me a synonym for 'happy'."),),
                                            ((a("Joyful."),), (a("Sad."),))),)
    assert second.groups[0].prompt == (u("What is 2 + 2?"), a("4."), u("And 3 + 3?"))
    data = load(FORMATS / "sharegpt_en.json", mistral)
    assert len(data.examples) == 2 and data.format == "conversational"


def test_sharegpt_chinese_round_trips_through_the_tokenizer(mistral):
    path = FORMATS / "sharegpt_zh.json"
    data = load(path, mistral)
    for example, row in zip(data.examples, read_rows(str(path))):
        group, = example.groups
        prompt = mistral.decode(group.prompt, skip_special_tokens=True)
        assert row.value["conversations"][0]["value"] in prompt
        for completion, side in zip(group.completions, ("chosen", "rejected")):
            text = mistral.decode(completion, skip_special_tokens=True)
            assert text.strip() == row.value[side]["value"]


@pytest.mark.parametrize("change, message", [
    ({"chosen": {"from": "gpt"}}, "field 'chosen': expected a {from, value} message"),
    ({"conversations": [{"from": "robot", "value": "你好"}]},
     "field 'conversations[0].from': unsupported role 'robot'"),
    ({"rejected": {"from": "gpt", "value": "  "}}, "field 'rejected': the completion is empty"),
    ({"conversations": []}, "field 'conversations': expected a non-empty list"),
])
def test_sharegpt_malformed_rows(tmp_path, mistral, change, message):
    good = json.loads((FORMATS / "sharegpt_zh.json").read_text(encoding="utf-8"))[0]
    path = tmp_path / "zh.json"
    path.write_text(json.dumps([good, {**good, **change}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load(path, mistral)
    assert str(info.value).startswith(f"{path}[1]: {message}"), str(info.value)


# -- Hub parquet shards -----------------------------------------------------------------------


def test_parquet_shards_of_a_hub_folder(tmp_path, mistral):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [r.value for r in read_rows(str(FORMATS / "ultrafeedback_binarized.jsonl"))]
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    for name, part in (("train-00000-of-00002", rows[:1]), ("train-00001-of-00002", rows[1:]),
                       ("test-00000-of-00001", rows[::-1])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"{name}.parquet")
    train = load(tmp_path / "repo", mistral)
    test = load(tmp_path / "repo", mistral, split="test")
    assert [e.id for e in train.examples] == ["a1f3", "b7c2"]
    assert [e.id for e in test.examples] == ["b7c2", "a1f3"]
    assert train.locations[1] == f"{folder / 'train-00001-of-00002.parquet'}[0]"
    bad = dict(rows[1], chosen=[u("What is 12 * 12?")])
    pq.write_table(pa.Table.from_pylist([rows[0], bad]), folder / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=rf"^{folder / 'test-00000-of-00001.parquet'}\[1\]: "
                                         r"field 'chosen': a completion must end with"):
        load(tmp_path / "repo", mistral, split="test")
    with pytest.raises(ValueError, match=r"no data file for split 'validation'.*set data.split"):
        load(tmp_path / "repo", mistral, split="validation")


# -- data.columns, unpaired data, a bad first row ---------------------------------------------

STACK_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}


def test_columns_rename_fields_before_the_format_is_detected(tok):
    path = FORMATS / "stack_exchange_paired.jsonl"
    with pytest.raises(ValueError, match=r"stack_exchange_paired.jsonl:1: cannot tell the data "
                                         r"format .*e.g. data.columns = \{prompt = \"question\""):
        load(path, tok)
    data = load(path, tok, columns=STACK_COLUMNS)
    assert data.format == "standard" and len(data.examples) == 2
    prompt = [ord(c) for c in "How do I reverse a list in Python?"]
    assert data.examples[0].groups[0].prompt.tolist() == [1, *prompt]


def test_columns_missing_in_a_row(tmp_path, tok):
    rows = [r.value for r in read_rows(str(FORMATS / "stack_exchange_paired.jsonl"))]
    path = write_jsonl(tmp_path, [rows[0], {"question": "q", "response_j": "a"}])
    assert_bad_row(path, tok, 2, "missing field 'response_k' (named in data.columns; this row "
                                 "has: question, response_j)", columns=STACK_COLUMNS)


def test_columns_in_a_training_config(tmp_path):
    import tomllib

    from prefixdpo.train.config import build_config, load_config, to_toml

    config = tmp_path / "run.toml"
    config.write_text('[model]\nconfig = "m.json"\n[data]\npath = "d.jsonl"\n'
                      'columns = {prompt = "question", chosen = "response_j"}\n')
    loaded = load_config(config, ['--data.columns={rejected = "response_k"}'])
    assert loaded.data.columns == {"rejected": "response_k"}
    assert load_config(config).data.columns == {"prompt": "question", "chosen": "response_j"}
    # The resolved config saved with each checkpoint keeps the table.
    assert build_config(tomllib.loads(to_toml(loaded))) == loaded
    with pytest.raises(ValueError, match=r"data.columns = 'x' should be a table"):
        load_config(config, ["--data.columns=x"])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(FIXTURES / "ascii_bos")


def test_unpaired_kto_data_gets_its_own_message(tok):
    with pytest.raises(ValueError, match=r"kto_unpaired.jsonl:1: this looks like unpaired "
                                         r"\(KTO-style\) data.*DPO needs pairs"):
        load(FORMATS / "kto_unpaired.jsonl", tok, bad_rows="skip")  # never skipped
    shared = REPO.parent / "shared" / "data" / "datasets" / "llamafactory_demo" / \
        "kto_en_demo.json"
    if shared.is_file():  # the real LLaMA-Factory demo file
        with pytest.raises(ValueError, match=r"kto_en_demo.json\[0\]: this looks like unpaired"):
            load(shared, tok)


@pytest.mark.parametrize("first, message", [
    ({"prompt": "Q", "chosen": None, "rejected": "b"},
     "field 'chosen': expected a string, found null"),
    ({"prompt": "Q", "rejected": "b"}, "missing field 'chosen'"),
    ([1, 2], "expected a JSON object, found a list"),
    ('{"prompt": "Q", ', "malformed JSON at column"),
])
def test_a_bad_first_row_is_reported_as_itself(tmp_path, tok, first, message):
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in (first, good)))
    assert_bad_row(path, tok, 1, message)
    assert load(path, tok, bad_rows="skip").format == "standard"


def test_no_row_with_a_known_format(tmp_path, tok):
    path = write_jsonl(tmp_path, [{"prompt": "Q", "chosen": None, "rejected": "b"}] * 3)
    # The keys point to the standard format: each row is the bad row it is.
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'chosen': expected a string, "
                                         r"found null. To skip bad rows instead"):
        load(path, tok)
    path = write_jsonl(tmp_path, [{"question": "Q", "answer": "b"}] * 3)
    with pytest.raises(ValueError, match=r"d.jsonl:1: cannot tell the data format .*\(none of "
                                         r"the first 3 rows has a known format\)$"):
        load(path, tok, bad_rows="skip")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_wrong_type_in_every_row_is_the_same_error_in_every_file_type(tmp_path, tok, suffix):
    """A parquet column has one type, so an int `prompt` is in every row: before, 'cannot tell
    the data format' there, and 'field 'prompt': expected a string' in JSONL."""
    rows = [{"prompt": i, "chosen": "a", "rejected": "b"} for i in range(3)]
    if suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        where = f"{path}[0]"
    else:
        path = write_jsonl(tmp_path, rows)
        where = f"{path}:1"
    with pytest.raises(ValueError) as error:
        load(path, tok)
    assert str(error.value).startswith(f"{where}: field 'prompt': expected a string, found a "
                                       "number")

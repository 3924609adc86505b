"""The tokenizer wrapper: special tokens, the BOS/EOS policy, loading, against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"


def ascii_ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def shared_tokenizer(name: str) -> Path:
    folder = SHARED_TOKENIZERS / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer {name} not available at {folder}")
    return folder


def test_llama_like_special_tokens_and_policy():
    tok = Tokenizer.from_folder(FIXTURES / "ascii_bos")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 128)
    assert tok.encode(["hi", "a</s>"]) == [ascii_ids("hi"), [97, 2]]  # never special tokens
    prompts = tok.encode_prompts(["hi", "<s>hi", ""])
    assert [p.tolist() for p in prompts] == [[1, 104, 105], [1, 104, 105], [1]]  # one BOS
    assert all(p.dtype == np.int32 for p in prompts)
    completions = tok.encode_completions(["ok", "ok</s>", "</s> x"])
    assert [c.tolist() for c in completions] == [[111, 107, 2], [111, 107, 2], [2, 32, 120, 2]]
    assert tok.special_tokens["bos_token"] == "<s>" and tok.chat_template.startswith("{{ bos")


def test_gpt2_like_no_bos_and_baked_in_truncation_is_off():
    tok = Tokenizer.from_folder(FIXTURES / "ascii_nobos")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 2, False)
    assert tok.encode_prompts(["hello world"])[0].tolist() == ascii_ids("hello world")
    assert tok.encode_completions(["abcdef"])[0].tolist() == ascii_ids("abcdef") + [2]
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"has no chat_template.*data.chat_template"):
        tok.compile_chat_template()


def copy_fixture(tmp_path: Path, name: str = "ascii_bos") -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_special_tokens_fall_back_to_the_map_and_bos_to_the_post_processor(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_config(folder, eos_token=None, add_bos_token=None)
    tok = Tokenizer.from_folder(folder)
    assert tok.eos_id == 2 and tok.add_bos  # eos from special_tokens_map, BOS as post-processed
    edit_config(folder, add_bos_token=False)
    assert not Tokenizer.from_folder(folder).add_bos


def test_bad_tokenizer_folders(tmp_path):
    with pytest.raises(ValueError, match=r"no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    folder = copy_fixture(tmp_path)
    (folder / "special_tokens_map.json").unlink()
    edit_config(folder, eos_token=None)
    with pytest.raises(ValueError, match=r"no eos_token in tokenizer_config.json"):
        Tokenizer.from_folder(folder)
    edit_config(folder, eos_token="<eos>")
    with pytest.raises(ValueError, match=r"eos_token '<eos>' is not in the vocabulary"):
        Tokenizer.from_folder(folder)
    with pytest.raises(ValueError, match=r"no such tokenizer folder"):
        load_tokenizer(tmp_path / "absent")


def test_chat_template_sources(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_config(folder, chat_template=[{"name": "tool_use", "template": "T"},
                                       {"name": "default", "template": "D"}])
    assert Tokenizer.from_folder(folder).chat_template == "D"
    (folder / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_folder(folder).chat_template == "J"


def test_hub_tokenizer_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(repo_id) or str(FIXTURES / "ascii_bos"))
    assert load_tokenizer("acme/model").eos_id == 2 and calls == ["acme/model"]


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "llama-3", "gpt2"])
def test_policy_matches_transformers(name):
    """Prompt ids are what transformers gives with special tokens (BOS or not); completions are
    the text without special tokens, plus EOS."""
    from transformers import AutoTokenizer

    folder = shared_tokenizer(name)
    ours, theirs = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    # No leading space: transformers 5 rebuilds SentencePiece-style tokenizers so that " x" and
    # "x" encode alike, while tokenizer.json (and SentencePiece itself) gives " x" a "▁" more.
    texts = ["\n\nHuman: Hello world, what's up?\n\nAssistant:", "Fine, thanks! " * 20]
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    for text, prompt in zip(texts, ours.encode_prompts(texts)):
        assert prompt.tolist() == theirs(text).input_ids
    for text, completion in zip(texts, ours.encode_completions(texts)):
        assert completion.tolist() == \
            theirs(text, add_special_tokens=False).input_ids + [theirs.eos_token_id]
    assert ours.add_bos == (name != "gpt2")
    assert len(ours.encode_prompts([texts[1]])[0]) > 50  # GPT-2's baked-in max_length=50 is off


def test_sentencepiece_leading_space_is_kept_as_in_tokenizer_json():
    """A completion such as HH-RLHF's " I think" keeps its leading space as SentencePiece does
    (tokenizer.json is verified identical to SentencePiece on HH-RLHF): "▁" then "▁I"."""
    tok = Tokenizer.from_folder(shared_tokenizer("mistral-7b-v0.1"))
    ids = tok.encode_completions([" I think"])[0].tolist()
    assert [tok.backend.id_to_token(i) for i in ids] == ["▁", "▁I", "▁think", "</s>"]


def test_completion_is_what_follows_the_prompt_in_the_whole_text():
    """With SentencePiece, " I think" after a prompt is "▁I", "▁think" in the whole transcript
    (what the model reads), not the "▁", "▁I", ... of the text alone; where the whole text's
    ids do not begin with the prompt's (tokens merged across the boundary), the completion is
    the text alone, so the prompt's ids stay the same for every completion."""
    tok = Tokenizer.from_folder(shared_tokenizer("mistral-7b-v0.1"))
    prompt, completion = "\n\nHuman: Hi\n\nAssistant:", " I think"
    prompt_ids, whole, alone = tok.encode([prompt, prompt + completion, completion])
    ids = tok.completion_after(prompt_ids, whole, alone).tolist()
    assert [tok.backend.id_to_token(i) for i in ids] == ["▁I", "▁think", "</s>"]
    assert tok.completion_after([5, 6], [5, 6, 7, 8], [9, 7, 8]).tolist() == [7, 8, 2]
    assert tok.completion_after([5, 6], [5, 10, 8], [9, 7, 8]).tolist() == [9, 7, 8, 2]
    assert tok.completion_after([5, 6], [5, 6], []).tolist() == [2]  # empty: EOS alone

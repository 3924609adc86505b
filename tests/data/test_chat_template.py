"""Chat templates: rendering equals transformers' apply_chat_template; the sandbox; the
prompt/completion split."""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path

import pytest

from prefixdpo.data.chat_template import ChatTemplate, ChatTemplateError
from prefixdpo.data.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_TOKENIZERS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tokenizers"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "  how are you?  "}],
    [{"role": "user", "content": "Qué tal? ünïcode"}, {"role": "assistant", "content": "bien"}],
]


@functools.cache
def ours_and_theirs(name: str):
    """Our tokenizer and transformers' (the oracle) for a folder; loaded once per module."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(name)
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


def tokenizer_folder(name: str) -> Path:
    if name == "ascii_bos":
        return FIXTURES / name
    folder = SHARED_TOKENIZERS / name
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"real tokenizer {name} not available at {folder}")
    return folder


@pytest.mark.parametrize("name", ["ascii_bos", "mistral-7b-v0.1", "tinyllama-1.1b-chat-v1.0",
                                  "llama-3"])
def test_rendering_matches_transformers(name):
    ours, oracle = ours_and_theirs(name)
    template = ours.compile_chat_template()
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            if add_generation_prompt and messages[-1]["role"] == "assistant":
                continue
            assert template.render(messages, add_generation_prompt) == oracle.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", ["ascii_bos", "llama-3"])
def test_prompt_ids_match_transformers_without_a_second_bos(name):
    """The template writes the BOS text; the prompt then gets no second BOS from the tokenizer.
    (Not checked on the legacy SentencePiece tokenizers: transformers 5 rebuilds them without
    the "▁" that tokenizer.json, like SentencePiece, puts after a special token.)"""
    tok, oracle = ours_and_theirs(name)
    prompt_text, _ = tok.compile_chat_template().split(CONVERSATIONS[1], [[
        {"role": "assistant", "content": "fine"}]])
    ids = tok.encode_prompts([prompt_text])[0].tolist()
    expected = oracle.apply_chat_template(
        CONVERSATIONS[1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids == list(expected["input_ids"])
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id


def test_split_drops_whitespace_after_the_final_eos():
    template = ChatTemplate(json.loads((FIXTURES / "ascii_bos" / "tokenizer_config.json")
                                       .read_text())["chat_template"], SPECIAL)
    prompt, texts = template.split(CONVERSATIONS[1], [[{"role": "assistant", "content": "ok"}],
                                                      [{"role": "assistant", "content": "no"}]])
    assert prompt == "<s>[INST] hi [/INST]hello</s> [INST]   how are you?   [/INST]"
    assert texts == ["ok</s>", "no</s>"]


def test_split_needs_the_prompt_to_be_a_prefix():
    source = ("{% for m in messages %}{{ m.content }}{% endfor %}"
              "{% if add_generation_prompt %}<gen>{% endif %}")
    template = ChatTemplate(source, SPECIAL)
    with pytest.raises(ChatTemplateError, match=r"does not render the prompt .* as a prefix"):
        template.split([{"role": "user", "content": "hi"}],
                       [[{"role": "assistant", "content": "ok"}]])
    empty = ChatTemplate("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                         "{% endif %}{% endfor %}", SPECIAL)
    with pytest.raises(ChatTemplateError, match=r"renders nothing for the completion"):
        empty.split([{"role": "user", "content": "hi"}], [[{"role": "assistant", "content": "x"}]])


def test_helpers_raise_exception_strftime_now_tojson():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", SPECIAL)
    with pytest.raises(ChatTemplateError, match=r"refused the messages: roles must alternate"):
        template.render([])
    year = ChatTemplate("{{ strftime_now('%Y') }}", SPECIAL).render([])
    assert year == str(datetime.date.today().year)
    as_json = ChatTemplate("{{ messages | tojson }}", SPECIAL).render(
        [{"role": "user", "content": "é<b>"}])
    assert as_json == '[{"role": "user", "content": "é<b>"}]'  # not escaped, as in transformers
    assert ChatTemplate("{{ bos_token }}x{{ eos_token }}", SPECIAL).render([]) == "<s>x</s>"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",      # reaching Python internals
    "{% set _ = messages.append(1) %}",                     # mutating the input
])
def test_templates_are_sandboxed(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, SPECIAL).render([{"role": "user", "content": "x"}])


def test_a_template_that_does_not_compile():
    with pytest.raises(ChatTemplateError, match=r"does not compile"):
        ChatTemplate("{% for m in messages %}", SPECIAL)


@pytest.mark.parametrize("source", [
    "{{ cycler.__init__.__globals__ }}",                    # the cycler/joiner/namespace escapes
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{% include '/etc/passwd' %}",                          # no loader: no file is read
    "{% import '/etc/passwd' as x %}",
    "{{ range(10**9) | list }}",                             # jinja's sandboxed range limit
])
def test_known_sandbox_escapes_stay_refused(source):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source, SPECIAL).render([{"role": "user", "content": "x"}])
    assert "root:" not in str(info.value) and "uid=" not in str(info.value)


@pytest.mark.parametrize("source, message", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
     r"calls nested deeper than 50 \(a recursive macro\?\)"),
    ("{{ 'x' * 100000 * 100000 }}", r"the output would exceed \d+ characters"),
    ("{{ [0] * 10**9 }}", r"the output would exceed \d+ characters"),
    ("{{ 7 ** 10000000 }}", r"an integer power too large \(7 \*\* 10000000\)"),
    ("{% for i in range(3000) %}{{ 'x' * 1000 }}{% endfor %}",
     r"the output would exceed \d+ characters"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     r"rendering took longer than 0.3 s \(a loop too long\)"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
     r"rendering took longer than 0.3 s \(a loop too long\)"),
    ("{% for i in range(100000)[::1] %}{% for j in range(100000)[1:] %}{% endfor %}{% endfor %}",
     r"rendering took longer than 0.3 s \(a loop too long\)"),
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
     r"rendering took longer than 0.3 s \(a loop too long\)"),
])
def test_hostile_templates_stop_within_budgets_in_one_line(source, message):
    """A recursive macro, a huge string or list, nested loops: one ChatTemplateBudgetError
    naming the template, instead of RecursionError, MemoryError or a hang."""
    from prefixdpo.data.chat_template import ChatTemplateBudgetError

    template = ChatTemplate(source, SPECIAL, origin="the chat template of tok/", time_budget=0.3)
    with pytest.raises(ChatTemplateBudgetError, match=rf"^the chat template of tok/: {message}"
                                                      r"; fix the template") as info:
        template.render([{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)


def test_budgets_leave_real_templates_alone():
    """Loops, macros, ranges and repetition in ordinary amounts render as before."""
    source = ("{% macro turn(m) %}<{{ m.role }}>{{ m.content }}{% endmacro %}"
              "{% for m in messages %}{{ turn(m) }}{% endfor %}{{ '=' * 3 }}"
              "{{ range(3) | length }}{% for i in range(2, 4) %}{{ i }}{% endfor %}")
    text = ChatTemplate(source, SPECIAL).render([{"role": "user", "content": "y" * 200000}])
    assert text == "<user>" + "y" * 200000 + "===323"


# The official chat templates of the Qwen and Gemma families, as TRL ships them (its
# chat_templates/ folder holds the templates of the model repos, byte for byte).
FAMILY_TEMPLATES = {
    "qwen2.5": ("qwen2_5.jinja", {"eos_token": "<|im_end|>"}),
    "qwen3": ("qwen3.jinja", {"eos_token": "<|im_end|>"}),
    "gemma3": ("gemma3.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}),
}
REASONING = [  # Qwen3: reasoning in the history, as content and as a field
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6", "reasoning": "add again"},
]


def family_template(family: str) -> tuple[str, dict]:
    trl = pytest.importorskip("trl", reason="TRL ships the families' chat templates")
    name, special = FAMILY_TEMPLATES[family]
    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(), special


@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_family_templates_render_as_transformers(family):
    from transformers.utils.chat_template_utils import render_jinja_template

    source, special = family_template(family)
    template = ChatTemplate(source, special)
    system = [{"role": "system", "content": "Be brief."}]
    conversations = [*CONVERSATIONS, system + CONVERSATIONS[1]]
    if family == "qwen3":
        conversations.append(REASONING)
    for messages in conversations:
        for add_generation_prompt in (False, True):
            if add_generation_prompt and messages[-1]["role"] == "assistant":
                continue
            expected = render_jinja_template([messages], chat_template=source,
                                             add_generation_prompt=add_generation_prompt,
                                             **special)[0][0]
            assert template.render(messages, add_generation_prompt) == expected


def test_qwen3_split_keeps_the_reasoning_of_the_reply_alone():
    """Qwen3 drops the reasoning of earlier turns from the history and writes a think block
    (empty if there is no reasoning) in the last turn: the prompt renders the same alone and
    before each completion, so each completion is its own reply with its own reasoning."""
    template = ChatTemplate(*family_template("qwen3"))
    prompt_text, texts = template.split(REASONING[:3], [
        [{"role": "assistant", "content": "6", "reasoning_content": "add again"}],
        [{"role": "assistant", "content": "<think>guess</think>7"}],
        [{"role": "assistant", "content": "5"}]])
    assert prompt_text == ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                           "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")
    assert texts == ["<think>\nadd again\n</think>\n\n6<|im_end|>",
                     "<think>\nguess\n</think>\n\n7<|im_end|>",
                     "<think>\n\n</think>\n\n5<|im_end|>"]


def test_qwen3_prompt_ending_in_a_reply_is_refused_in_one_line():
    """A prompt that ends with an assistant turn (a prefilled reply): Qwen3 renders that turn
    with an empty think block when it is last and without one when a reply follows, so the
    prompt is not a prefix of prompt + completion. Training on such a cut would misalign the
    tokens: refused, in one line."""
    template = ChatTemplate(*family_template("qwen3"))
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    with pytest.raises(ChatTemplateError, match="does not render the prompt") as error:
        template.split(prompt, [[{"role": "assistant", "content": "lo"}]])
    assert "\n" not in str(error.value)


def test_qwen_and_gemma_splits():
    """ChatML (Qwen2.5, with its default system prompt) and Gemma 3 (`model` turns, the system
    prompt folded into the first user turn, BOS written by the template)."""
    reply = [[{"role": "assistant", "content": "fine"}]]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    qwen = ChatTemplate(*family_template("qwen2.5"))
    assert qwen.split(prompt[1:], reply) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        ["fine<|im_end|>"])
    gemma = ChatTemplate(*family_template("gemma3"))
    assert gemma.split(prompt, reply) == (
        "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n",
        ["fine<end_of_turn>\n"])

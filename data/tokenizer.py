"""The tokenizer: a `tokenizers` tokenizer.json plus its config, and the tokenization policy.

Loaded from a folder holding tokenizer.json, tokenizer_config.json and special_tokens_map.json
(or a hub model repo id, fetched through huggingface_hub). The BOS and EOS tokens come from
tokenizer_config.json, else special_tokens_map.json; whether plain text starts with BOS comes
from `add_bos_token` in tokenizer_config.json, else from what the tokenizer's post-processor
does (Llama, Mistral, Llama 3: yes; GPT-2: no). Truncation and padding baked into a
tokenizer.json (GPT-2's has `max_length: 50`) are switched off: we never cut text silently.

Policy, the same for every data format:
- Text is always encoded WITHOUT the post-processor's special tokens; BOS and EOS are added here,
  so no tokenizer adds them twice.
- The prompt is encoded alone, so its ids are identical for all its completions (the point of
  prefix sharing). A completion's ids are what follows the prompt's ids in the encoding of
  prompt+completion: the tokens the model reads in the whole text (TRL 1.16 does the same).
  Byte-level tokenizers (Llama 3, SmolLM2, GPT-2) give the same ids as encoding the completion
  alone; SentencePiece-style ones (Llama 2, Mistral) would start a completion encoded alone with
  a `"▁"` piece the whole text does not have. Where the encoding of the whole text does not
  begin with the prompt's ids (tokens merged across the boundary), the completion is encoded
  alone.
- A prompt gets BOS in front when the tokenizer adds BOS to plain text, unless its ids already
  start with BOS (a chat template that writes the `bos_token` text).
- A completion ends with EOS: the EOS id is appended unless its ids already end with it (a chat
  template that writes `eos_token` after each assistant message).
- Pre-tokenized ids are used as given (no BOS or EOS added).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from prefixdpo.data.chat_template import ChatTemplate
from prefixdpo.model.local_files import check_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


class Tokenizer:
    """Encodes prompts and completions by the policy above; knows BOS/EOS and the chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str,
                 bos_token: str | None = None, add_bos: bool | None = None,
                 chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, name: str = "tokenizer",
                 folder: Path | None = None, chat_template_origin: str | None = None) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.name = name
        self.folder = folder  # where it was loaded from, for copying it next to a checkpoint
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.bos_id = self._id_of(bos_token, "bos_token") if bos_token is not None else None
        if add_bos is None:  # as the post-processor does it
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and \
                backend.encode("a", add_special_tokens=False).ids[:1] != [self.bos_id]
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = dict(special_tokens or {})
        self.special_tokens.setdefault("eos_token", eos_token)
        if bos_token is not None:
            self.special_tokens.setdefault("bos_token", bos_token)
        self.chat_template = chat_template  # the jinja source, or None
        # Where it comes from, named in the template's errors.
        self.chat_template_origin = chat_template_origin or f"the chat template of {name}"

    def _id_of(self, token: str, field: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: {field} {token!r} is not in the vocabulary of "
                             "tokenizer.json; fix tokenizer_config.json")
        return token_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json + special_tokens_map.json from a folder
        (and chat_template.jinja); none of them may be a link leading outside the folder
        (`model.local_files`)."""
        folder = Path(folder)
        check_files(folder, TOKENIZER_FILES)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder}: no tokenizer.json (a tokenizer folder holds "
                             "tokenizer.json and tokenizer_config.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"{folder / 'tokenizer.json'}: cannot be loaded by the tokenizers "
                             f"library ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special = {}
        for key in _SPECIAL_NAMES:
            text = _token_text(config.get(key)) or _token_text(special_map.get(key))
            if text is not None:
                special[key] = text
        if "eos_token" not in special:
            raise ValueError(f"{folder}: no eos_token in tokenizer_config.json or "
                             "special_tokens_map.json; completions end with EOS, so one is "
                             "needed")
        extra = config.get("additional_special_tokens") or \
            special_map.get("additional_special_tokens") or []
        specials: dict[str, Any] = dict(special)
        specials["additional_special_tokens"] = [t for t in map(_token_text, extra) if t]
        add_bos = config.get("add_bos_token")
        template, template_file = _chat_template_source(folder, config)
        return cls(backend, eos_token=special["eos_token"], bos_token=special.get("bos_token"),
                   add_bos=add_bos if isinstance(add_bos, bool) else None,
                   chat_template=template, special_tokens=specials, name=str(folder),
                   folder=folder, chat_template_origin=f"the chat template in {template_file}")

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without special tokens added (batched, in parallel)."""
        if not texts:
            return []
        return [e.ids for e in self.backend.encode_batch_fast(list(texts),
                                                              add_special_tokens=False)]

    def prompt_ids(self, ids: Sequence[int]) -> np.ndarray:
        """A prompt's encoded text -> its ids: BOS in front when the tokenizer adds one."""
        if self.add_bos and (len(ids) == 0 or ids[0] != self.bos_id):
            return np.array([self.bos_id, *ids], dtype=np.int32)
        return np.array(ids, dtype=np.int32)

    def completion_ids(self, ids: Sequence[int]) -> np.ndarray:
        """A completion's encoded text -> its ids, ending with exactly the one EOS appended."""
        if len(ids) and ids[-1] == self.eos_id:
            return np.array(ids, dtype=np.int32)
        return np.array([*ids, self.eos_id], dtype=np.int32)

    def completion_after(self, prompt: Sequence[int], whole: Sequence[int],
                         alone: Sequence[int]) -> np.ndarray:
        """A completion's ids, ending with EOS, from the encoded texts (no special tokens) of
        its prompt, of prompt+completion, and of the completion alone: what follows the
        prompt's ids in the whole, or the completion alone where the whole does not begin
        with the prompt's ids."""
        n = len(prompt)
        follows = len(whole) > n and list(whole[:n]) == list(prompt)
        return self.completion_ids(whole[n:] if follows else alone)

    def encode_prompts(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.prompt_ids(ids) for ids in self.encode(texts)]

    def encode_completions(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.completion_ids(ids) for ids in self.encode(texts)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # -- chat templates ---------------------------------------------------------------------

    def compile_chat_template(self, source: str | None = None,
                              origin: str = "the chat template") -> ChatTemplate:
        """The given template source (from `origin`, named in its errors), or this tokenizer's
        own, with its special tokens bound."""
        if source is None:
            source, origin = self.chat_template, self.chat_template_origin
        if source is None:
            raise ValueError(f"{self.name}: the tokenizer has no chat_template (in "
                             "tokenizer_config.json or chat_template.jinja); set "
                             "data.chat_template to a .jinja file")
        return ChatTemplate(source, self.special_tokens,
                            eos_token=self.special_tokens["eos_token"], origin=origin)


def _chat_template_source(folder: Path, config: dict) -> tuple[str | None, Path]:
    """(template, the file it is read from): chat_template.jinja (newer HF saves) over
    tokenizer_config.json's `chat_template`, which is a string or a list of named templates
    (the one named "default" is used)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), folder / "tokenizer_config.json"


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """A local tokenizer folder, or a hub model repo id (fetched, or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return Tokenizer.from_folder(path)
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"{text}: no such tokenizer folder (expected a folder with "
                         "tokenizer.json, or a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(text, allow_patterns=list(TOKENIZER_FILES))
    except Exception as e:  # offline without a cached copy, unknown or gated repo, ...
        raise ValueError(f"{text}: could not fetch the tokenizer from the Hugging Face Hub or "
                         f"find it in the local cache ({type(e).__name__}: {e})") from None
    return Tokenizer.from_folder(folder)

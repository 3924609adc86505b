"""Reading preference data records from local files, local folders and Hugging Face dataset repos.

Supported files: `.jsonl` (one JSON object per line), `.json` (a list of objects, or an object
holding that list under one key), both optionally gzip-compressed (`.jsonl.gz`, `.json.gz`), and
`.parquet` (needs pyarrow). A folder or a hub dataset repo is read as the files of one split:
those named `<split>.<ext>` or `<split>-*.<ext>` (HF shards such as `train-00000-of-00002`), or
lying under a folder named `<split>`, in path order. `owner/name/sub/dir` reads only that
subfolder of the repo `owner/name` (e.g. `Anthropic/hh-rlhf/harmless-base`).

Hub repos come through `huggingface_hub.snapshot_download`, which uses the local HF cache when the
Hub cannot be reached; with `HF_HUB_OFFLINE=1` only the cache is used.

Every record keeps where it came from, for error messages: `file:line` (1-based) for jsonl,
`file[i]` (0-based element or row index) for json and parquet. A jsonl line that cannot be
read (not valid UTF-8, not valid JSON, nested deeper than Python's recursion limit, an integer
literal longer than Python converts) or a record (jsonl line or .json element) with an object
that gives a key twice, is yielded as a `Row` carrying the error, so the caller decides whether
to stop or skip it; a damaged .json file is one error for the whole file (it is parsed whole).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixdpo.data.config import option

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Keys under which a .json object may hold its list of records (else: its only list).
_LIST_KEYS = ("data", "train", "rows", "examples")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")
_TRUE = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class Row:
    location: str            # "file:line" (jsonl) or "file[i]" (json element / parquet row)
    value: Any = None        # the decoded JSON value (None when `error` is set)
    error: str | None = None  # why the record could not be decoded


class RowError(ValueError):
    """A bad record: `location` says where it is, `reason` what is wrong and what to do."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


def data_suffix(path: str | os.PathLike) -> str | None:
    """The supported suffix a file name ends with, or None."""
    name = str(path).lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_rows(path: str, split: str = "train", *, cache_dir: str | os.PathLike | None = None,
              names: Mapping[str, str] | None = None) -> Iterator[Row]:
    """Every record of a file, of the `split` files of a folder, or of a hub dataset repo.
    `names` name the options in messages (data.config.option)."""
    for file, display in resolve_files(path, split, cache_dir=cache_dir, names=names):
        yield from read_file(file, display)


def resolve_files(path: str, split: str = "train", *,
                  cache_dir: str | os.PathLike | None = None,
                  names: Mapping[str, str] | None = None) -> list[tuple[Path, str]]:
    """(local file, name shown in messages) for each file to read, in reading order."""
    local = Path(path).expanduser()
    if local.is_file():
        return [(local, str(path))]
    if local.is_dir():
        return [(f, str(f)) for f in split_files(local, split, str(path), names)]
    if local.exists() or data_suffix(path) or not _HUB_ID.match(path):
        raise ValueError(f"{path}: no such data file or folder (expected a local "
                         f"{'/'.join(SUFFIXES)} file, a folder of them, or a Hugging Face "
                         "dataset repo id like 'owner/name')")
    owner, name, *rest = path.split("/")
    repo_id, subfolder = f"{owner}/{name}", "/".join(rest)
    snapshot = download_hub_dataset(repo_id, split, subfolder, cache_dir=cache_dir)
    root = snapshot / subfolder if subfolder else snapshot
    if not root.is_dir():
        raise ValueError(f"{path}: the dataset repo {repo_id!r} has no folder {subfolder!r}")
    return [(f, f"{repo_id}/{f.relative_to(snapshot).as_posix()}")
            for f in split_files(root, split, path, names)]


def split_files(folder: Path, split: str, display: str,
                names: Mapping[str, str] | None = None) -> list[Path]:
    """The data files of `split` in `folder` (recursively, hidden folders skipped)."""
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and data_suffix(p.name)
                        and not any(part.startswith(".")
                                    for part in p.relative_to(folder).parts))
    chosen = []
    for file in candidates:
        stem = file.name[:-len(data_suffix(file.name))]
        parents = file.relative_to(folder).parts[:-1]
        if stem == split or stem.startswith(f"{split}-") or split in parents:
            chosen.append(file)
    if not chosen:
        found = ", ".join(p.relative_to(folder).as_posix() for p in candidates[:10]) or "none"
        raise ValueError(f"{display}: no data file for split {split!r} (looked for "
                         f"{split}.jsonl, {split}-*.parquet, {split}/..., etc.; data files found: "
                         f"{found}); set {option('split', names)}, or give the file itself as "
                         f"{option('path', names)}")
    return chosen


def download_hub_dataset(repo_id: str, split: str, subfolder: str = "", *,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot folder of a hub dataset repo, holding at least `split`'s data files
    (fetched when needed; from the HF cache when offline or with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    # Only files whose path mentions the split; split_files() then picks the exact ones.
    patterns = [f"{prefix}*{split}*{suffix}" for suffix in SUFFIXES]
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns,
                                   cache_dir=cache_dir, local_files_only=offline)
    except Exception as e:  # offline without a cached copy, unknown or gated repo, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{repo_id}: could not fetch this dataset repo from the Hugging Face Hub nor find it "
            f"in the local HF cache ({type(e).__name__}: {detail}). Check the repo id; for a "
            "gated or private dataset log in (`hf auth login`); to work offline, download it "
            "once beforehand (it is then read from the cache, also with HF_HUB_OFFLINE=1), or "
            "give a local file") from None
    return Path(folder)


def read_file(file: Path, display: str | None = None) -> Iterator[Row]:
    """The records of one local file, in order."""
    display = display or str(file)
    suffix = data_suffix(file.name)
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _read_jsonl(file, display, compressed=suffix.endswith(".gz"))
    elif suffix in (".json", ".json.gz"):
        yield from _read_json(file, display, compressed=suffix.endswith(".gz"))
    elif suffix == ".parquet":
        yield from _read_parquet(file, display)
    else:
        raise ValueError(f"{display}: unsupported file type (expected one of: "
                         f"{', '.join(SUFFIXES)})")


def _open(file: Path, compressed: bool):
    return gzip.open(file, "rb") if compressed else open(file, "rb")


def _read_jsonl(file: Path, display: str, compressed: bool) -> Iterator[Row]:
    try:
        with _open(file, compressed) as f:
            for line_number, raw in enumerate(f, start=1):
                location = f"{display}:{line_number}"
                try:
                    # utf-8-sig drops a byte-order mark, which only the first line may carry.
                    text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield Row(location, error=f"not valid UTF-8 text (byte {e.start} of the "
                                              "line); re-encode the file as UTF-8")
                    continue
                if not text.strip():
                    continue  # blank lines (e.g. a trailing newline) hold no record
                try:
                    # Without its line break, so that json's columns are the line's.
                    value, duplicated = _loads(text.rstrip("\r\n"))
                    error = _duplicate_key_error(value) if duplicated else None
                except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                    error = _json_error(e, "line")
                yield Row(location, error=error) if error else Row(location, value)
    except (OSError, EOFError) as e:  # e.g. a truncated or mislabelled .gz file
        raise ValueError(f"{display}: cannot read the file ({type(e).__name__}: {e})") from None


def _read_json(file: Path, display: str, compressed: bool) -> Iterator[Row]:
    try:
        with _open(file, compressed) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{display}: cannot read the file ({type(e).__name__}: {e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{display}:{line}: not valid UTF-8 text; re-encode the file as "
                         "UTF-8") from None
    try:
        value, duplicated = _loads(text)
    except json.JSONDecodeError as e:
        hint = (" (it looks like one JSON object per line: name the file .jsonl)"
                if e.msg == "Extra data" else "")
        line = e.doc.count("\n", 0, _error_position(e)) + 1
        raise ValueError(f"{display}:{line}: {_json_error(e, 'file')}{hint}") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{display}: {_json_error(e, 'file')} (a .json file is read whole: "
                         "fix the file, or make it .jsonl, one record per line, to skip such "
                         "records with data.bad_rows = 'skip')") from None
    if isinstance(value, _DuplicateKeyObject):
        raise ValueError(f"{display}: the top-level JSON object gives the key {value.key!r} "
                         "twice; give each key once")
    records, prefix = _records_of(value, display)
    for i, record in enumerate(records):
        location = f"{display}{prefix}[{i}]"
        if duplicated and _duplicate_key(record) is not None:
            yield Row(location, error=_duplicate_key_error(record))
        else:
            yield Row(location, record)


def _error_position(error: json.JSONDecodeError) -> int:
    """Where a JSON error is: json's position, or, when only whitespace follows it (the text
    ends before the JSON does), the end of the text's content rather than the start of the
    next (empty) line."""
    return error.pos if error.doc[error.pos:].strip() else len(error.doc.rstrip())


def _json_error(error: ValueError | RecursionError, unit: str) -> str:
    """One line for a failure to parse the JSON of a `unit` (a jsonl "line", a .json "file")."""
    if isinstance(error, RecursionError):
        return ("JSON nested too deeply to read (deeper than Python's recursion limit, about "
                f"{sys.getrecursionlimit()} levels)")
    if not isinstance(error, json.JSONDecodeError):  # e.g. int_max_str_digits
        detail = str(error).split(";")[0].strip()
        return f"JSON that Python cannot read ({detail})"
    position = _error_position(error)
    column = position - error.doc.rfind("\n", 0, position)
    # json's messages "Unterminated string starting at", "Invalid control character at" end
    # where it appends the position.
    message = error.msg.removesuffix(" at").removesuffix(" starting")
    ended = not error.doc[error.pos:].strip() or message.startswith("Unterminated")
    if ended and message == "Invalid control character":  # the line break after a cut string
        message = "Unterminated string"
    ended = f" (the {unit} ends before the JSON does: is it cut short?)" if ended else ""
    return f"malformed JSON at column {column}: {message}{ended}"


class _DuplicateKeyObject(dict):
    """A decoded JSON object that gave `key` more than once (the last value is kept here, but
    the record is refused: which value was meant is unknowable)."""

    key: str


def _loads(text: str) -> tuple[Any, bool]:
    """`json.loads`, and whether any object in the text repeats a key (such objects are
    `_DuplicateKeyObject`s, found by `_duplicate_key`)."""
    duplicated = False

    def make_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        duplicated = True
        seen: set[str] = set()
        marked = _DuplicateKeyObject(obj)
        marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))
        return marked

    return json.loads(text, object_pairs_hook=make_object), duplicated


def _duplicate_key(value: Any) -> str | None:
    """The first key repeated in an object anywhere inside `value`, or None."""
    if isinstance(value, _DuplicateKeyObject):
        return value.key
    children = value.values() if isinstance(value, dict) else value if isinstance(
        value, list) else ()
    return next((key for key in map(_duplicate_key, children) if key is not None), None)


def _duplicate_key_error(value: Any) -> str:
    return (f"duplicate key {_duplicate_key(value)!r} in a JSON object (only one of its values "
            "could be used); give each field once")


def _records_of(value: Any, display: str) -> tuple[list, str]:
    """The list of records in a parsed .json file, and the key path shown in locations."""
    if isinstance(value, list):
        return value, ""
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        for key in _LIST_KEYS:
            if key in lists:
                return value[key], f"[{key!r}]"
        if len(lists) == 1:
            return value[lists[0]], f"[{lists[0]!r}]"
        raise ValueError(f"{display}: a JSON object without one list of records (lists under: "
                         f"{', '.join(map(repr, lists)) or 'none'}); expected a list of "
                         "objects, or an object with the list under 'data'")
    raise ValueError(f"{display}: expected a JSON list of objects, found {type(value).__name__}")


def _read_parquet(file: Path, display: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{display}: reading .parquet files needs pyarrow, which is not "
                         "installed: pip install pyarrow (or convert the file to .jsonl)") from None
    try:
        parquet = pq.ParquetFile(file)
        index = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield Row(f"{display}[{index}]", record)
                index += 1
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise ValueError(f"{display}: cannot read the parquet file ({e})") from None

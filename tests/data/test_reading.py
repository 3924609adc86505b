"""Reading records: every file type, locations, split selection, the hub path, decode errors."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from prefixdpo.data import reading
from prefixdpo.data.reading import Row, read_file, read_rows, resolve_files

RECORDS = [{"prompt": "a", "chosen": "b", "rejected": "c"},
           {"prompt": "d", "chosen": "e", "rejected": "f"}]


def write_jsonl(path: Path, records, compressed: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if compressed else text.encode())
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_records_with_line_numbers(tmp_path, name):
    path = write_jsonl(tmp_path / name, RECORDS, compressed=name.endswith(".gz"))
    rows = list(read_rows(str(path)))
    assert rows == [Row(f"{path}:1", RECORDS[0]), Row(f"{path}:2", RECORDS[1])]


def test_jsonl_blank_lines_are_not_records_but_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n")
    assert [(r.location, r.value) for r in read_rows(str(path))] == \
        [(f"{path}:1", RECORDS[0]), (f"{path}:4", RECORDS[1])]


@pytest.mark.parametrize("name, layout, prefix", [
    ("d.json", "list", ""), ("d.json.gz", "list", ""), ("d.json", "data", "['data']"),
    ("d.json", "train", "['train']"), ("d.json", "other", "['other']")])
def test_json_list_or_object_holding_it(tmp_path, name, layout, prefix):
    value = RECORDS if layout == "list" else {"version": 1, layout: RECORDS}
    text = json.dumps(value, indent=2).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    rows = list(read_rows(str(path)))
    assert [r.location for r in rows] == [f"{path}{prefix}[0]", f"{path}{prefix}[1]"]
    assert [r.value for r in rows] == RECORDS


def test_json_object_with_several_lists_is_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(ValueError, match=r"d.json: a JSON object without one list of records"):
        list(read_rows(str(path)))


def test_malformed_jsonl_line_is_a_row_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + '\n{"prompt": "x", \n' + json.dumps(RECORDS[1]) + "\n")
    rows = list(read_rows(str(path)))
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert rows[1].value is None and rows[1].error.startswith("malformed JSON at column")
    assert rows[2].value == RECORDS[1]


def test_non_utf8_jsonl_line_is_a_row_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b'\n{"prompt": "caf\xe9"}\n')
    rows = list(read_rows(str(path)))
    assert rows[0].error is None
    assert rows[1].location == f"{path}:2" and "not valid UTF-8" in rows[1].error


def test_malformed_or_non_utf8_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,}\n]')
    with pytest.raises(ValueError, match=r"d.json:3: malformed JSON at column 11"):
        list(read_rows(str(path)))
    path.write_bytes(b'[\n{"a": 1},\n{"a": "\xff"}]')
    with pytest.raises(ValueError, match=r"d.json:3: not valid UTF-8"):
        list(read_rows(str(path)))
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ValueError, match=r"name the file .jsonl"):
        list(read_rows(str(path)))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails even where it is installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"d.parquet: reading .parquet files needs pyarrow.*"
                                         r"pip install pyarrow"):
        list(read_rows(str(path)))


def test_parquet(tmp_path):
    """A real parquet file (pyarrow is in the test extra), with nested message lists as hub
    datasets store conversations, and a damaged one."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [{"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]},
               {"prompt": "yo", "chosen": [{"role": "assistant", "content": "c"}],
                "rejected": [{"role": "assistant", "content": "d"}]}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=1)
    rows = list(read_file(tmp_path / "d.parquet", "d.parquet"))
    assert rows == [Row("d.parquet[0]", records[0]), Row("d.parquet[1]", records[1])]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet"):
        list(read_file(tmp_path / "bad.parquet", "bad.parquet"))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(ValueError, match=r"absent.jsonl: no such data file or folder"):
        resolve_files(str(tmp_path / "absent.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d.csv: unsupported file type"):
        list(read_rows(str(tmp_path / "d.csv")))


def make_split_folder(root: Path) -> Path:
    for rel in ["train.jsonl", "test.jsonl", "data/train-00000-of-00002.jsonl",
                "data/train-00001-of-00002.jsonl", "data/train_prefs-00000-of-00001.jsonl",
                "sub/train/part.jsonl.gz", ".cache/train.jsonl", "README.md"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, RECORDS[:1], compressed=rel.endswith(".gz"))
    return root


def test_folder_reads_the_files_of_the_split(tmp_path):
    root = make_split_folder(tmp_path / "ds")
    files = [f.relative_to(root).as_posix() for f, _ in resolve_files(str(root), "train")]
    assert files == ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl",
                     "sub/train/part.jsonl.gz", "train.jsonl"]
    assert [f.name for f, _ in resolve_files(str(root), "test")] == ["test.jsonl"]
    with pytest.raises(ValueError, match=r"no data file for split 'validation'.*train.jsonl"):
        resolve_files(str(root), "validation")


def make_hf_cache(cache: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding one snapshot of a dataset repo, as huggingface_hub
    lays it out (refs/main -> commit, snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for subset in ("harmless-base", "helpful-base"):
        (snapshot / subset).mkdir(parents=True)
        write_jsonl(snapshot / subset / "train.jsonl.gz", RECORDS[:1], compressed=True)
        write_jsonl(snapshot / subset / "test.jsonl.gz", RECORDS[1:], compressed=True)
    return snapshot


def test_hub_repo_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hf_cache(tmp_path / "hub", "acme/prefs")
    rows = list(read_rows("acme/prefs", "test", cache_dir=tmp_path / "hub"))
    assert [(r.location, r.value) for r in rows] == [
        ("acme/prefs/harmless-base/test.jsonl.gz:1", RECORDS[1]),
        ("acme/prefs/helpful-base/test.jsonl.gz:1", RECORDS[1])]
    rows = list(read_rows("acme/prefs/helpful-base", "train", cache_dir=tmp_path / "hub"))
    assert [(r.location, r.value) for r in rows] == [
        ("acme/prefs/helpful-base/train.jsonl.gz:1", RECORDS[0])]
    with pytest.raises(ValueError, match=r"acme/absent: could not fetch this dataset repo.*"
                                         r"HF_HUB_OFFLINE"):
        list(read_rows("acme/absent", "train", cache_dir=tmp_path / "hub"))


def test_hub_download_asks_for_the_split_files(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(make_hf_cache(tmp_path / "hub", repo_id))

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rows = list(read_rows("acme/prefs/harmless-base", "test"))
    assert [r.value for r in rows] == [RECORDS[1]]
    (repo_id, kwargs), = calls
    assert repo_id == "acme/prefs" and kwargs["repo_type"] == "dataset"
    assert kwargs["local_files_only"] is False
    assert "harmless-base/*test*.jsonl.gz" in kwargs["allow_patterns"]
    assert reading.data_suffix("x/test.JSONL.GZ") == ".jsonl.gz"


def test_duplicate_key_in_a_jsonl_row_is_a_row_error(tmp_path):
    """`{"chosen": "A", "rejected": "B", "chosen": "C"}` would silently keep "C"."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n"
                    + '{"prompt": "p", "chosen": "A", "rejected": "B", "chosen": "C"}\n'
                    + '{"prompt": [{"role": "user", "content": "x", "role": "assistant"}], '
                      '"chosen": "A", "rejected": "B"}\n'
                    + json.dumps(RECORDS[1]) + "\n")
    rows = list(read_rows(str(path)))
    assert [r.location for r in rows] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert rows[0].error is None and rows[3].value == RECORDS[1]
    assert rows[1].value is None
    assert rows[1].error.startswith("duplicate key 'chosen' in a JSON object")
    assert rows[2].value is None and rows[2].error.startswith("duplicate key 'role'")


def test_duplicate_key_in_a_json_file_record_is_a_row_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "p", "chosen": "A", "rejected": "B"},\n'
                    ' {"prompt": "p", "chosen": "A", "rejected": "B", "rejected": "C"}]')
    rows = list(read_rows(str(path)))
    assert rows[0].value == {"prompt": "p", "chosen": "A", "rejected": "B"}
    assert rows[0].error is None
    assert rows[1].location == f"{path}[1]" and rows[1].value is None
    assert rows[1].error.startswith("duplicate key 'rejected' in a JSON object")
    path.write_text('{"data": [{"prompt": "p", "chosen": "A", "rejected": "B"}], "data": []}')
    with pytest.raises(ValueError, match=r"d.json: the top-level JSON object gives the key "
                                         r"'data' twice"):
        list(read_rows(str(path)))


# Rows that broke the reader (before: a RecursionError traceback; Python's
# sys.set_int_max_str_digits() advice without file or line; neither skippable).
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "b", "rejected": "c"}'
LONG_INT = '{"prompt": "a", "id": ' + "7" * 5000 + ', "chosen": "b", "rejected": "c"}'


@pytest.mark.parametrize("line, reason", [
    (DEEP, "JSON nested too deeply to read (deeper than Python's recursion limit"),
    (LONG_INT, "JSON that Python cannot read (Exceeds the limit (4300 digits) for integer "
               "string conversion"),
])
def test_rows_that_python_cannot_parse_are_row_errors(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n" + json.dumps(RECORDS[1]) + "\n")
    rows = list(read_rows(str(path)))
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert rows[1].value is None and rows[1].error.startswith(reason), rows[1].error
    assert "\n" not in rows[1].error and rows[2].value == RECORDS[1]
    json_file = tmp_path / "d.json"  # read whole: one error for the file, naming it
    json_file.write_text("[" + json.dumps(RECORDS[0]) + ",\n" + line + "]")
    with pytest.raises(ValueError, match=rf"^{json_file}: {re.escape(reason)}.* make it .jsonl"):
        list(read_rows(str(json_file)))


def test_a_cut_line_is_reported_where_it_ends(tmp_path):
    """Before: 'malformed JSON at column 1' (json's position after the line break) for a row
    cut at column 44."""
    path = tmp_path / "d.jsonl"
    cut = json.dumps(RECORDS[0])[:-1]  # the closing brace lost
    path.write_text("\n".join([json.dumps(RECORDS[1])] * 5 + [cut]) + "\n")
    row = list(read_rows(str(path)))[5]
    assert row.location == f"{path}:6"
    assert row.error == (f"malformed JSON at column {len(cut) + 1}: Expecting ',' delimiter "
                         "(the line ends before the JSON does: is it cut short?)")


def test_a_truncated_json_file_says_so_in_full(tmp_path):
    """Before: '... malformed JSON at column 18: Unterminated string starting at', cut off."""
    path = tmp_path / "d.json"
    text = json.dumps(RECORDS, indent=1)
    path.write_text(text[:text.index('"e"') + 2])  # ends inside the string "e"
    line = text[:text.index('"e"')].count("\n") + 1
    column = text.index('"e"') - text.rfind("\n", 0, text.index('"e"'))
    with pytest.raises(ValueError) as error:
        list(read_rows(str(path)))
    assert str(error.value) == (f"{path}:{line}: malformed JSON at column {column}: "
                                "Unterminated string (the file ends before the JSON does: is "
                                "it cut short?)")

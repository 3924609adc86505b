"""scripts/dataset_metrics.py on a small file, every value derived by hand.

ASCII test tokenizer: one token per character, BOS = 1 added to prompts, EOS = 2.
Rows: ("ab", "cde", "f"), ("xyz", "gh", "ijklm"), and one with identical chosen and rejected
(skipped).
  chosen inputs (no BOS): 2+3+1 = 6, 3+2+1 = 6 -> 12, avg 6.00
  rejected inputs:        2+1+1 = 4, 3+5+1 = 9 -> 13, avg 6.50
  shared groups (BOS): 3 + 4 + 2 = 9, 4 + 3 + 6 = 13 -> median 11.0, p95 9 + 0.95*4 = 12.8
  prompt/mean completion: 3/3 = 1, 4/4.5 = 0.8889 -> median 0.944
  paired: 3*2 + 4+2 = 12, 4*2 + 3+6 = 17 -> 29; shared 22; ratio 29/22 = 1.318
  packing: 1.1 * p95 of [9, 13] -> 128 (a multiple of 128); one row, 22/128 = 0.1719
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dataset_metrics.py"
TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "ascii_bos"
ROWS = [{"prompt": "ab", "chosen": "cde", "rejected": "f"},
        {"prompt": "xyz", "chosen": "gh", "rejected": "ijklm"},
        {"prompt": "q", "chosen": "s", "rejected": "s"}]
EXPECTED = """\
NAME: num_samples=2
NAME: num_tokens_chosen_input=12
NAME: num_tokens_rejected_input=13
NAME: avg_tokens_chosen_input=6.00
NAME: avg_tokens_rejected_input=6.50
NAME: num_skipped_rows=1
NAME: num_groups=2
NAME: median_group_length=11.0
NAME: p95_group_length=12.8
NAME: median_prompt_completion_ratio=0.944
NAME: num_tokens_paired=29
NAME: num_tokens_shared=22
NAME: paired_shared_ratio=1.318
NAME: packing_length=128
NAME: packing_num_rows=1
NAME: packing_efficiency=0.1719
"""


def load_script():
    spec = importlib.util.spec_from_file_location("dataset_metrics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_metrics_of_a_small_file(tmp_path, capsys):
    path = write(tmp_path / "prefs.jsonl", ROWS)
    assert load_script().main(["--data", path, "--tokenizer", str(TOKENIZER)]) == 0
    assert capsys.readouterr().out == EXPECTED.replace("NAME", "prefs")


def test_several_files_one_block_each_or_one_named_set(tmp_path, capsys):
    a = write(tmp_path / "a" / "test.jsonl", ROWS[:1])
    b = write(tmp_path / "b" / "test.jsonl", ROWS[1:])
    script = load_script()
    assert script.main(["--data", a, b, "--tokenizer", str(TOKENIZER)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a/test: num_samples=1" and "b/test: num_samples=1" in lines
    assert "a/test: num_tokens_chosen_input=6" in lines
    assert "b/test: num_tokens_rejected_input=9" in lines
    assert script.main(["--data", a, b, "--tokenizer", str(TOKENIZER), "--name", "all"]) == 0
    assert capsys.readouterr().out == EXPECTED.replace("NAME", "all")
    assert script.dataset_names(["x/d.jsonl.gz", "y/e.json"]) == ["d", "e"]


def test_errors_are_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "absent.jsonl"),
                             "--tokenizer", str(TOKENIZER)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "absent.jsonl: no such data file or folder" in result.stderr
    assert "Traceback" not in result.stderr


NOBOS = TOKENIZER.parent / "ascii_nobos"
CHAT_ROWS = [{"prompt": [{"role": "user", "content": "ab"}],
              "chosen": [{"role": "assistant", "content": "cde"}],
              "rejected": [{"role": "assistant", "content": "f"}]}]


def test_messages_name_the_flags_not_the_config_keys(tmp_path, capsys):
    script = load_script()
    bad = write(tmp_path / "bad.jsonl", ROWS[:2] + [{"prompt": "q", "chosen": None,
                                                     "rejected": "s"}])
    assert script.main(["--data", bad, "--tokenizer", str(TOKENIZER), "--bad-rows",
                        "error"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:3: field 'chosen': expected a string, found null" in err
    assert "set --bad-rows skip" in err and "data." not in err
    chat = write(tmp_path / "chat.jsonl", CHAT_ROWS)
    assert script.main(["--data", chat, "--tokenizer", str(NOBOS)]) == 1
    err = capsys.readouterr().err
    assert "has no chat_template" in err and "set --chat-template to a .jinja file" in err
    assert "data." not in err
    renamed = write(tmp_path / "se.jsonl", [{"question": r["prompt"], "response_j": r["chosen"],
                                            "response_k": r["rejected"]} for r in ROWS])
    assert script.main(["--data", renamed, "--tokenizer", str(TOKENIZER)]) == 1
    err = capsys.readouterr().err
    assert "e.g. --columns prompt=question,chosen=response_j,rejected=response_k" in err
    assert "--format" in err and "data." not in err


def test_chat_template_and_columns_flags(tmp_path, capsys):
    script = load_script()
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    chat = write(tmp_path / "chat.jsonl", CHAT_ROWS)
    assert script.main(["--data", chat, "--tokenizer", str(NOBOS), "--chat-template",
                        str(jinja)]) == 0
    # Prompt "ab", completion "cde" + EOS, no BOS: 2 + 3 + 1.
    assert "chat: num_tokens_chosen_input=6\n" in capsys.readouterr().out
    renamed = write(tmp_path / "se.jsonl", [{"question": r["prompt"], "response_j": r["chosen"],
                                            "response_k": r["rejected"]} for r in ROWS])
    assert script.main(["--data", renamed, "--tokenizer", str(TOKENIZER), "--columns",
                        "prompt=question, chosen=response_j,rejected=response_k"]) == 0
    assert capsys.readouterr().out == EXPECTED.replace("NAME", "se")
    assert script.main(["--data", renamed, "--tokenizer", str(TOKENIZER), "--columns",
                        "prompt"]) == 1
    assert "--columns 'prompt': expected field=column pairs" in capsys.readouterr().err


def test_rows_that_python_cannot_parse_are_skipped_or_named(tmp_path, capsys):
    """Before: a RecursionError traceback, and the int_max_str_digits advice without a line."""
    path = tmp_path / "prefs.jsonl"
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "b", "rejected": "c"}'
    long_int = '{"prompt": "a", "id": ' + "7" * 5000 + ', "chosen": "b", "rejected": "c"}'
    path.write_text("\n".join([json.dumps(ROWS[0]), deep, json.dumps(ROWS[1]), long_int,
                               json.dumps(ROWS[2])]) + "\n")
    script = load_script()
    assert script.main(["--data", str(path), "--tokenizer", str(TOKENIZER)]) == 0
    out = capsys.readouterr().out
    assert "prefs: num_samples=2" in out and "prefs: num_skipped_rows=3" in out
    assert script.main(["--data", str(path), "--tokenizer", str(TOKENIZER),
                        "--bad-rows", "error"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: JSON nested too deeply") and err.count("\n") == 1

"""scripts/score.py: the same log-probs in every layout, equal to transformers' (the oracle)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixdpo.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "tests" / "data" / "fixtures" / "ascii_bos"
# Ranked format (one data file has one format): two completions are a plain pair.
ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "completions": [" 4.", " Five, I think."],
     "scores": [1, 0]},
    {"prompt": "Name a color.", "completions": [" Blue", " Seven"], "scores": [1, 0]},
    {"prompt": "Say hi", "completions": [" hi", " hello there", " no"], "scores": [3, 2, 1]},
    {"id": "d", "prompt": "Long one: " + "x" * 40, "completions": [" y" * 20, " z"],
     "scores": [1, 0]},
]


def load_script():
    spec = importlib.util.spec_from_file_location("score", REPO / "scripts" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scored(hf_checkpoint, tmp_path):
    folder, hf_model = hf_checkpoint("mistral_window")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def score(layout: str, *extra: str) -> list[dict]:
        out = tmp_path / f"{layout}.jsonl"
        load_script().main(["--model", str(folder), "--data", str(data), "--out", str(out),
                            "--tokenizer", str(TOKENIZER), "--layout", layout,
                            "--batch-size", "2", *extra])
        return [json.loads(line) for line in out.read_text().splitlines()]

    return score, hf_model, data


def oracle(hf_model, prompt: str, completion: str) -> tuple[float, int]:
    tok = load_tokenizer(TOKENIZER)
    p = tok.encode_prompts([prompt])[0].tolist()
    c = tok.encode_completions([completion])[0].tolist()
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logps = hf_model(ids).logits[0].float().log_softmax(-1)
    targets = torch.tensor(c)
    return logps[len(p) - 1:len(p) + len(c) - 1].gather(-1, targets[:, None]).sum().item(), len(c)


def test_layouts_agree_with_transformers(scored):
    score, hf_model, _ = scored
    results = {layout: score(layout) for layout in
               ("shared+packed", "shared", "paired", "paired+packed")}
    reference = results["shared+packed"]
    # Rows in input order; the ranked row gives three pairs (3>2, 3>1, 2>1).
    assert [(r["index"], r["pair"]) for r in reference] == [(0, 0), (1, 0), (2, 0), (2, 1),
                                                           (2, 2), (3, 0)]
    assert reference[0]["id"] == "a" and "id" not in reference[1]
    for layout, records in results.items():
        for got, want in zip(records, reference, strict=True):
            for key in ("chosen_logp", "rejected_logp"):
                assert got[key] == pytest.approx(want[key], abs=1e-4), (layout, key)
            assert got["chosen_tokens"] == want["chosen_tokens"]
    completions = {0: ROWS[0]["completions"], 1: ROWS[1]["completions"]}
    for record in reference[:2]:
        prompt = ROWS[record["index"]]["prompt"]
        for side, text in zip(("chosen", "rejected"), completions[record["index"]]):
            logp, n = oracle(hf_model, prompt, text)
            assert record[f"{side}_logp"] == pytest.approx(logp, abs=1e-4)
            assert record[f"{side}_tokens"] == n
    ranked = reference[2:5]
    hi, hello = oracle(hf_model, "Say hi", " hi")[0], oracle(hf_model, "Say hi", " hello there")[0]
    assert ranked[0]["chosen_logp"] == pytest.approx(hi, abs=1e-4)
    assert ranked[2]["chosen_logp"] == pytest.approx(hello, abs=1e-4)


def test_reward_accuracy_against_a_reference(tmp_path):
    """Margins beta * ((c - ref_c) - (r - ref_r)), by hand: pair 0: 0.5 * ((-1 + 3) - (-4 + 5))
    = 0.5 (won); pair 1: 0.5 * ((-2 + 2) - (-1 + 2)) = -0.5 (lost)."""
    records = [{"index": 0, "pair": 0, "chosen_logp": -1.0, "rejected_logp": -4.0},
               {"index": 3, "pair": 0, "chosen_logp": -2.0, "rejected_logp": -1.0}]
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"index": 0, "pair": 0, "chosen_logp": -3.0, "rejected_logp": -5.0}\n'
                   '{"index": 3, "chosen_logp": -2.0, "rejected_logp": -2.0}\n')
    script = load_script()
    assert script.summary(records, ref, beta=0.5) == \
        "reward accuracy 0.5000, mean reward margin 0.0000 (beta 0.5) over 2 pairs"
    assert script.summary(records, None, beta=0.5) == \
        "chosen more likely than rejected: 0.5000 of 2 pairs"
    ref.write_text('{"index": 0, "pair": 0, "chosen_logp": -3.0}\n')
    with pytest.raises(ValueError, match=r"ref.jsonl:1: not a score.py output line"):
        script.summary(records, ref, beta=0.5)
    ref.write_text('{"index": 0, "pair": 0, "chosen_logp": -3.0, "rejected_logp": -5.0}\n')
    with pytest.raises(ValueError, match="no score for row 3 pair 0"):
        script.summary(records, ref, beta=0.5)


def test_too_long_for_the_packing_length_is_refused(scored):
    score, _, _ = scored
    # Messages name the script's flags, not the config keys.
    with pytest.raises(ValueError, match=r"more than --packing-length = 128; raise "
                                         r"--packing-length or set --max-length$"):
        score("paired+packed", "--packing-length", "128")


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/score.py", "--model", str(tmp_path),
                             "--data", "x.jsonl", "--out", str(tmp_path / "o.jsonl")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "config.json" in result.stderr


def test_data_messages_name_the_flags_and_chat_template_is_a_flag(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    script = load_script()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": None, "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    args = ["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
            "--tokenizer", str(TOKENIZER)]
    with pytest.raises(ValueError) as info:
        script.main(args)
    assert str(info.value).startswith(f"{data}:1: field 'chosen': expected a string, found null")
    assert "set --bad-rows skip" in str(info.value) and "data." not in str(info.value)
    chat = {"prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}
    data.write_text(json.dumps(chat) + "\n")
    with pytest.raises(ValueError, match=r"conversational but --chat-template none; set it"):
        script.main(args + ["--chat-template", "none"])
    script.main(args + ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"])
    record, = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert (record["chosen_tokens"], record["rejected_tokens"]) == (4, 3)  # "yes"/"no" + EOS


def test_an_output_path_that_cannot_be_written_is_refused_first(tmp_path):
    """Before: a bare `[Errno 21] Is a directory` after the whole scoring. Checked before the
    model is read (the model here does not even exist)."""
    result = subprocess.run([sys.executable, "scripts/score.py", "--model", str(tmp_path / "no"),
                             "--data", "x.jsonl", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == (
        f"error: --out {tmp_path}: cannot write it (it is a folder); give --out a file name, "
        "not a folder\n")

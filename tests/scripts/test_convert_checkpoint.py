"""HF -> DCP -> HF through the conversion script is bit-identical, with config and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"


def convert(*args: str) -> subprocess.CompletedProcess:
    """The CLI as users run it, in a subprocess (exit code and stderr are part of the contract)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def convert_in_process(*args: str) -> None:
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(args))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("variant, dtype", [("llama_tied", torch.float32),
                                            ("mistral_window", torch.bfloat16),
                                            ("qwen2_bias_tied", torch.bfloat16),
                                            ("qwen3_qk_norm_bias", torch.float32),
                                            ("gemma3_layer_types", torch.bfloat16)])
def test_round_trip_is_bit_exact(hf_checkpoint, tmp_path, variant, dtype):
    folder, hf_model = hf_checkpoint(variant)
    if dtype != torch.float32:  # re-save in bf16 to check dtypes survive
        hf_model.to(dtype).save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"fake": true}')
    convert_in_process("hf-to-dcp", "--hf", str(folder), "--out", str(tmp_path / "dcp"))
    convert_in_process("dcp-to-hf", "--ckpt", str(tmp_path / "dcp"), "--hf-config", str(folder),
                       "--out", str(tmp_path / "back"))
    before, after = read_all(folder), read_all(tmp_path / "back")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype == dtype
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name
    original = json.loads((folder / "config.json").read_text())
    converted = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: v for k, v in converted.items() if k != "torch_dtype"} == \
        {k: v for k, v in original.items() if k != "torch_dtype"}
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"fake": true}'


def test_errors_are_one_line_without_traceback(hf_checkpoint, tmp_path):
    result = convert("hf-to-dcp", "--hf", str(tmp_path / "absent"), "--out", str(tmp_path / "x"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "no such model folder" in result.stderr

    folder, _ = hf_checkpoint("llama_gqa")
    result = convert("dcp-to-hf", "--ckpt", str(folder), "--hf-config", str(folder),
                     "--out", str(tmp_path / "y"))
    assert result.returncode == 1 and "not a torch.distributed.checkpoint folder" in result.stderr



def test_dcp_of_another_model_is_refused(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    other, _ = hf_checkpoint("llama_tied")  # one kv head instead of two, and no lm_head
    convert_in_process("hf-to-dcp", "--hf", str(other), "--out", str(tmp_path / "dcp"))
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        convert_in_process("dcp-to-hf", "--ckpt", str(tmp_path / "dcp"), "--hf-config",
                           str(folder), "--out", str(tmp_path / "z"))
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"):
        convert_in_process("dcp-to-hf", "--ckpt", str(tmp_path / "dcp"), "--hf-config",
                           str(tmp_path / "cfg"), "--out", str(tmp_path / "z"))


def test_damaged_dcp_folders_are_one_line_errors(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    convert_in_process("hf-to-dcp", "--hf", str(folder), "--out", str(tmp_path / "dcp"))
    shard = next((tmp_path / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    result = convert("dcp-to-hf", "--ckpt", str(tmp_path / "dcp"), "--hf-config", str(folder),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the model tensors cannot be read" in result.stderr
    (tmp_path / "dcp" / ".metadata").write_bytes(b"garbage\n")
    result = convert("dcp-to-hf", "--ckpt", str(tmp_path / "dcp"), "--hf-config", str(folder),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ".metadata: cannot be read" in result.stderr


def test_an_output_folder_in_the_way_of_a_file_is_one_line(tmp_path):
    """Before: a bare `[Errno 17] File exists`, naming neither the flag nor the fix."""
    (tmp_path / "afile").write_text("")
    result = convert("hf-to-dcp", "--hf", str(tmp_path / "absent"), "--out",
                     str(tmp_path / "afile"))
    assert result.returncode == 1 and result.stderr == (
        f"error: --out {tmp_path / 'afile'}: cannot write it (a file of that name is in the way "
        "of the folder); remove that file, or give --out another location\n")

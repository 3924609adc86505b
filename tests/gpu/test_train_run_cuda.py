"""A whole run on CUDA through torchrun (one process): checkpoints, export; then a run resumed
from the middle checkpoint finishes and exports again; transformers loads the export and
reproduces our logits; the resumed run's losses equal the uninterrupted run's.

A tiny random Llama (the layer shapes of the other CUDA tests, so their compiled kernels are
reused, and the Mistral tokenizer's vocabulary) trains on the shipped HH-RLHF pairs with
bfloat16 mixed precision, compiled layers and FlexAttention, the CUDA defaults. The learning
rate is constant. Two launches, one after the other: the uninterrupted 4-step run saves
checkpoints at steps 2 and 4; the second resumes a copy of its folder as it stood after step 2
(the step-4 checkpoint and the export removed) and runs steps 3 and 4 again. (Each launch pays
the start-up, compilation and the transformers import, so the test makes no more than two.)

In a CPU rehearsal (tests/gpu/cuda_helpers.py) the same runs use the trainer's CPU defaults:
gloo, float32, the documents executor, nothing compiled.

Tolerances:
- Losses of the resumed steps: 1e-3 absolute on losses of ~0.7, and `logps/*` (sums over a
  completion, hundreds of nats) within 0.1 nats. Both runs execute the same compiled kernels on the
  same batches from the same weights; only the order of atomic additions may differ, far
  below bfloat16's resolution (2^-8 relative). A resume that lost the data position or the
  optimizer's moments moves these by whole nats.
- The first loss is ln 2 within 1e-2 (policy == reference up to bf16 rounding; beta = 0.1
  scales a log-prob difference d to a loss change of about d / 20).
- The exported weights of the resumed run equal the uninterrupted run's to 1e-3 (relative norm
  per tensor; Adam can amplify rounding noise in near-zero gradient entries).
- transformers (eager attention) against our model loaded from the export, both float32 on
  the GPU with TF32 off: logits within 1e-4 (values of order 1; different kernels).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_helpers import CUDA_MARKS, DEVICE, no_tf32, relative

pytestmark = CUDA_MARKS

REPO = Path(__file__).resolve().parents[2]
MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
         "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
         "torch_dtype": "float32"}
LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}


@pytest.fixture
def run_config(tmp_path) -> Path:
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
config = "{tmp_path / 'model.json'}"
[data]
path = "{REPO / 'assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz'}"
tokenizer = "{REPO / 'assets/tokenizers/mistral-7b-v0.1'}"
max_examples = 48
max_prompt_length = 96
max_length = 160
packing_length = 256
eval_fraction = 0.1
bad_rows = "skip"
[reference]
cache_dir = "{tmp_path / 'cache'}"
[optim]
lr = 1e-3
schedule = "constant"
warmup_steps = 0
[train]
device = "{DEVICE.type}"
steps = 4
micro_batch_size = 2
log_every = 1
[checkpoint]
every = 2
""")
    return config


def launch(config: Path, *overrides: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 1 train.py --config CONFIG OVERRIDES...`"""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", "train.py", "--config", str(config), *overrides]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the run did not finish in {timeout} s:\n{err[-3000:]}")
    assert process.returncode == 0, err[-3000:]
    return out


def logged_steps(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_resume_and_export_on_cuda(run_config, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from prefixdpo.model.hf_checkpoint import load_model
    from conftest import causal_logits

    full, cut = tmp_path / "full", tmp_path / "cut"
    finish(launch(run_config, f"--train.output_dir={full}"))
    assert sorted(p.name for p in full.glob("step_*")) == ["step_00000002", "step_00000004"]
    # The folder as it stood after step 2: the later checkpoint and the export gone (the
    # metrics of steps 3 and 4 stay: a resume drops what follows its checkpoint).
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("step_00000004", "hf"))
    out = finish(launch(run_config, f"--train.output_dir={cut}"))
    assert f"resumed from {cut / 'step_00000002'} (step 2)" in out

    expected, resumed = logged_steps(full), logged_steps(cut)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4]
    assert abs(expected[1]["loss"] - math.log(2)) <= 1e-2, expected[1]["loss"]
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-3, step
        for name in ("logps/chosen", "logps/rejected"):
            assert abs(resumed[step][name] - expected[step][name]) <= 0.1, (step, name)
    assert abs(expected[4]["rewards/chosen"]) > 1e-2  # the policy has moved

    export = cut / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (export / name).is_file(), name
    ours_weights = load_file(export / "model.safetensors")
    theirs_weights = load_file(full / "hf" / "model.safetensors")
    assert ours_weights.keys() == theirs_weights.keys()
    for name, tensor in theirs_weights.items():
        assert relative(ours_weights[name], tensor) <= 1e-3, name

    ours = load_model(export, device=DEVICE)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        export, attn_implementation="eager").to(DEVICE).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (2, 40),
                        generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with no_tf32(), torch.no_grad():
        our_logits = causal_logits(ours, ids)
        their_logits = theirs(ids).logits
    assert their_logits.dtype == torch.float32
    assert (our_logits - their_logits).abs().max().item() <= 1e-4

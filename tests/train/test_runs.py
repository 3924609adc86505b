"""Whole runs through `train.py`: one rank and two gloo ranks agree, the first loss is ln 2,
resume after a stop is exact, and the exported checkpoint loads in transformers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": True, "max_position_embeddings": 512,
              "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def run_config(tmp_path) -> Path:
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
config = "{tmp_path / 'model.json'}"
[data]
path = "{REPO / 'assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz'}"
tokenizer = "{REPO / 'assets/tokenizers/mistral-7b-v0.1'}"
max_examples = 40
max_prompt_length = 48
max_length = 80
packing_length = 256
bad_rows = "skip"
[reference]
cache_dir = "{tmp_path / 'cache'}"
[optim]
lr = 1e-3
warmup_steps = 2
[train]
steps = 6
micro_batch_size = 2
log_every = 1
output_dir = "{tmp_path / 'run'}"
[checkpoint]
every = 3
""")
    return config


def launch(config: Path, *overrides: str, ranks: int = 0, **popen) -> subprocess.Popen:
    """`python train.py` (ranks=0) or `torchrun --nproc_per_node ranks train.py`."""
    command = [sys.executable, "train.py"] if not ranks else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", "train.py"]
    return subprocess.Popen([*command, "--config", str(config), *overrides], cwd=REPO,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def clean_env() -> dict[str, str]:
    """The environment without a launcher's variables (an in-process test may have set up a
    process group), one thread per process."""
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}
    return {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1"}


def run(config: Path, *overrides: str, ranks: int = 0) -> str:
    process = launch(config, *overrides, ranks=ranks)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.distributed
def test_one_and_two_ranks_agree(run_config, tmp_path):
    """The same global batch (4 rows per step): 1 rank x 2 micro-batches of 2 rows and
    2 ranks x 1 micro-batch. The step's pairs are the same, so are the losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    out = run(run_config, f"--train.output_dir={one}", "--train.grad_accum=2",
              "--train.steps=3", "--checkpoint.every=0", "--checkpoint.export_hf=false", ranks=1)
    assert "reference log-probs (train): computing" in out
    out = run(run_config, f"--train.output_dir={two}", "--train.grad_accum=1",
              "--train.steps=3", "--checkpoint.every=0", "--checkpoint.export_hf=false", ranks=2)
    # Same model, data and dtype: the second run reuses the first one's reference table.
    assert f"reference log-probs (train): loaded {tmp_path / 'cache'}" in out
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert abs(a[1] - math.log(2)) < 1e-5  # policy == reference at the first step
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    assert a[3] < a[1]  # it learns


@pytest.mark.distributed
def test_resume_after_sigterm_is_exact(run_config, tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    run(run_config, f"--train.output_dir={reference_dir}", "--checkpoint.export_hf=false")
    expected = losses(reference_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # Stop a second run with SIGTERM once it has logged step 2; it checkpoints and exits.
    stopped = tmp_path / "stopped"
    process = launch(run_config, f"--train.output_dir={stopped}", "--checkpoint.every=0",
                     "--checkpoint.export_hf=false")
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (stopped / "metrics.jsonl").is_file() and max(losses(stopped), default=0) >= 2:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "stop requested" in out
    saved = [p.name for p in stopped.glob("step_*")]
    assert len(saved) == 1 and int(saved[0][5:]) < 6
    stop_step = int(saved[0][5:])

    out = run(run_config, f"--train.output_dir={stopped}", "--checkpoint.export_hf=false")
    assert f"resumed from {stopped / saved[0]} (step {stop_step})" in out
    resumed = losses(stopped)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(stop_step + 1, 7):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.distributed
def test_export_loads_in_transformers(run_config, tmp_path):
    import transformers

    from prefixdpo.model.hf_checkpoint import load_model
    from conftest import causal_logits

    out_dir = tmp_path / "run"
    run(run_config, "--train.steps=2", "--checkpoint.every=0")
    export = out_dir / "hf"
    assert (export / "tokenizer.json").is_file() and (export / "config.json").is_file()
    ours = load_model(export)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export,
                                                               attn_implementation="eager")
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (causal_logits(ours, ids) - theirs(ids).logits).abs().max() < 1e-5
    # The export holds the trained weights: the same as the final DCP checkpoint's.
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "dcp-to-hf", "--ckpt",
                    str(out_dir / "step_00000002"), "--hf-config", str(export), "--out",
                    str(converted)], cwd=REPO, check=True, capture_output=True)
    final = load_model(converted).state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, final[name]), name
    assert not torch.equal(final["embed_tokens.weight"],
                           load_model_initial(tmp_path).state_dict()["embed_tokens.weight"])


def load_model_initial(tmp_path: Path):
    from prefixdpo.model.config import ModelConfig
    from prefixdpo.model.transformer import build_model

    return build_model(ModelConfig.from_file(tmp_path / "model.json"), seed=0)


@pytest.mark.distributed
def test_cli_errors_are_one_line(run_config, tmp_path):
    process = launch(run_config, "--train.stepz=3")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err
    assert "error:" in err and "unknown key train.stepz" in err
    process = launch(run_config, f"--data.path={tmp_path / 'absent.jsonl'}")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err and "absent.jsonl" in err


@pytest.mark.distributed
@pytest.mark.parametrize("overrides, first_loss, table", [
    (("--reference.mode=live",), math.log(2), False),
    # SimPO at step 1: -log sigmoid(beta * (avg_w - avg_l) - gamma); not ln 2, but finite.
    (("--reference.mode=none", "--loss.type=simpo"), None, False),
    (("--data.layout=paired",), math.log(2), True),
])
def test_reference_modes_and_layouts(run_config, tmp_path, overrides, first_loss, table):
    out_dir = tmp_path / "run"
    run(run_config, "--train.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false",
        *overrides)
    first = losses(out_dir)[1]
    assert math.isfinite(first)
    if first_loss is not None:
        assert first == pytest.approx(first_loss, abs=1e-5)
    assert (out_dir / "reference_logps_train.safetensors").exists() == table


@pytest.mark.distributed
def test_readme_demo_command(tmp_path):
    """The README's demo command, as written there, with fewer steps and examples so it stays
    quick: it finishes and writes an exported model."""
    import shlex

    readme = (REPO / "README.md").read_text()
    block = readme.split("## Set up and run the demo", 1)[1].split("```", 2)[1]
    command = next(line for line in block.splitlines() if line.startswith("torchrun"))
    argv = shlex.split(command)
    assert argv[0] == "torchrun" and "--config" in argv
    out = tmp_path / "demo"
    overrides = ["--train.steps=3", "--data.max_examples=24", "--checkpoint.every=0",
                 f"--train.output_dir={out}", f"--reference.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:],
                             *overrides], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "hf" / "model.safetensors").is_file()
    assert (out / "hf" / "tokenizer.json").is_file()
    assert losses(out)[1] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.distributed
def test_a_failure_on_one_rank_ends_the_run(run_config, tmp_path):
    """Rank 1 fails alone (as on a full disk or an out-of-memory error): the run ends with its
    error line instead of hanging in the next collective."""
    launcher = tmp_path / "fail_on_rank1.py"
    launcher.write_text(f"""
import sys
import prefixdpo.train.loop as loop

original = loop._train
def failing(config, env):
    if env.rank == 1:
        raise ValueError("injected failure on rank 1")
    return original(config, env)
loop._train = failing
sys.argv = ["train.py", "--config", {str(run_config)!r}, "--checkpoint.export_hf=false"]
import runpy
runpy.run_path({str(REPO / 'train.py')!r}, run_name="__main__")
""")
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", str(launcher)], cwd=REPO, env=clean_env(),
                             capture_output=True, text=True, timeout=120)
    assert process.returncode != 0
    assert "[rank 1] error: injected failure on rank 1" in process.stderr


@pytest.mark.distributed
def test_bco_pair_across_epochs_and_ranks(run_config, tmp_path):
    """bco_pair keeps a running mean; epochs end with empty micro-batches and each rank sees
    its own pairs: the loss stays finite over several epochs on two ranks."""
    out_dir = tmp_path / "run"
    run(run_config, "--loss.type=bco_pair", "--train.grad_accum=3", "--train.steps=6",
        "--checkpoint.every=0", "--checkpoint.export_hf=false", ranks=2)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] >= 2
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    state = json.loads((out_dir / "step_00000006" / "train_state.json").read_text())
    assert state["train"]["loss_state"]["num_updates"] > 0


def test_eval_on_start_measures_the_initial_model(run_config, tmp_path):
    """`train.eval_on_start`: an evaluation before the first step, where the policy is the
    reference (eval loss ln 2, no pair ranked right yet), and one at the end."""
    out_dir = tmp_path / "run"
    run(run_config, "--train.steps=2", "--checkpoint.every=0", "--checkpoint.export_hf=false",
        "--data.eval_fraction=0.25", "--train.eval_on_start=true")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/loss" in r}
    assert sorted(evals) == [0, 2]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/rewards/accuracies"] == 0.0
    assert evals[2]["eval/loss"] != pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("shape", ["tiny-qwen3", "tiny-gemma3"])
def test_qwen3_and_gemma3_train_on_two_ranks_and_export(run_config, tmp_path, shape):
    """The shipped tiny Qwen3 and Gemma 3 shapes (q/k norm, explicit head_dim; Gemma's sliding
    layers shorter than the rows, per-layer RoPE with scaling, 262k-style tied head) train
    sharded on two gloo ranks from ln 2, and their export loads in transformers as the same
    class with the same logits."""
    import transformers
    from conftest import causal_logits

    from prefixdpo.model.hf_checkpoint import load_model

    out_dir = tmp_path / shape
    run(run_config, f"--model.config={REPO / 'configs/models' / f'{shape}.json'}",
        f"--train.output_dir={out_dir}", "--train.steps=3", "--checkpoint.every=0", ranks=2)
    logged = losses(out_dir)
    assert abs(logged[1] - math.log(2)) < 1e-5  # policy == reference at the first step
    assert all(math.isfinite(v) for v in logged.values()) and abs(logged[3] - logged[1]) > 1e-4
    ours = load_model(out_dir / "hf")
    assert ours.config.model_type == json.loads(
        (REPO / "configs/models" / f"{shape}.json").read_text())["model_type"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "hf",
                                                               attn_implementation="eager")
    assert type(theirs).__name__ == ours.config.architecture
    ids = torch.randint(0, 32000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (causal_logits(ours, ids) - theirs(ids).logits).abs().max() < 1e-5

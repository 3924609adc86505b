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


def launch(config: Path, *overrides: str, ranks: int = 0, nproc: int = 0,
           **popen) -> subprocess.Popen:
    """`python train.py` (one rank, through our launcher), `python train.py --nproc-per-node
    nproc` (ranks of our launcher) or `torchrun --nproc_per_node ranks train.py`."""
    command = [sys.executable, "train.py"] if not ranks else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", "train.py"]
    if nproc:
        command.append(f"--nproc-per-node={nproc}")
    return subprocess.Popen([*command, "--config", str(config), *overrides], cwd=REPO,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def clean_env() -> dict[str, str]:
    """The environment without a launcher's variables (an in-process test may have set up a
    process group), one thread per process."""
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
                "PREFIXDPO_LAUNCHER_PID"}
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


def sigterm_after_step(process: subprocess.Popen, out_dir: Path, step: int
                       ) -> tuple[str, str]:
    """SIGTERM to a launched run once its metrics hold `step` (or it ended, or 240 s passed);
    then its output."""
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (out_dir / "metrics.jsonl").is_file() and max(losses(out_dir), default=0) >= step:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    return process.communicate(timeout=120)


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
    out, err = sigterm_after_step(process, stopped, 2)
    assert process.returncode == 0, err[-3000:]
    assert "stop requested" in out and "Traceback" not in err
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


def readme_command(section: str, prefix: str) -> list[str]:
    """The first command of the README section `section` that starts with `prefix`, split."""
    import shlex

    readme = (REPO / "README.md").read_text()
    block = readme.split(section, 1)[1].split("```", 2)[1]
    return shlex.split(next(line for line in block.splitlines() if line.startswith(prefix)))


def installed_command(argv: list[str]) -> list[str]:
    """`prefixdpo-train ...` as installed beside this Python (a console script)."""
    assert argv[0] == "prefixdpo-train"
    script = Path(sys.executable).parent / "prefixdpo-train"
    assert script.is_file(), "install the package (pip install -e .) to get prefixdpo-train"
    return [str(script), *argv[1:]]


def test_readme_demo_command(tmp_path):
    """The README's demo command, as written there, with fewer steps and examples so it stays
    quick: it finishes and writes an exported model."""
    argv = readme_command("## Set up and run the demo", "prefixdpo-train")
    assert argv[0] == "prefixdpo-train" and "--config" in argv
    out = tmp_path / "demo"
    overrides = ["--train.steps=3", "--data.max_examples=24", "--checkpoint.every=0",
                 f"--train.output_dir={out}", f"--reference.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run([*installed_command(argv), *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "hf" / "model.safetensors").is_file()
    assert (out / "hf" / "tokenizer.json").is_file()
    assert losses(out)[1] == pytest.approx(math.log(2), abs=1e-5)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines as a terminal shows them (what follows a line's last carriage return),
    progress bars and blank lines left out."""
    shown = (line.rsplit("\r", 1)[-1] for line in stderr.splitlines())
    return [line for line in shown if line.strip()
            and not line.lstrip().startswith(("loading ", "scoring", "training"))]


@pytest.mark.parametrize("case", ["bad data path", "model folder link", "resume changed",
                                  "absurd micro-batch"])
def test_the_readme_command_fails_in_one_line(run_config, tmp_path, case):
    """The README's single-node command: a failing run prints our one `error:` line and nothing
    else on stderr (before, under torchrun: its ChildFailedError traceback and a summary)."""
    argv = readme_command("## Set up and run the demo", "prefixdpo-train")
    command = [*installed_command(argv[:1]), "--config", str(run_config),
               "--checkpoint.export_hf=false", "--train.steps=2"]
    if case == "bad data path":
        overrides = [f"--data.path={tmp_path / 'absent.jsonl'}"]
        expected = f"error: {tmp_path / 'absent.jsonl'}: no such data file"
    elif case == "absurd micro-batch":  # before: the OOM killer, rc 137, no message
        overrides = ["--train.micro_batch_size=100000000000"]
        expected = "error: train.micro_batch_size = 100000000000 is more rows than the training"
    elif case == "model folder link":
        from prefixdpo.model.config import ModelConfig
        from prefixdpo.model.hf_checkpoint import save_hf_checkpoint
        from prefixdpo.model.transformer import build_model

        folder = tmp_path / "model"
        model = build_model(ModelConfig.from_file(tmp_path / "model.json"), seed=0)
        save_hf_checkpoint(model.state_dict(), model.config, folder)
        secret = tmp_path / "outside.safetensors"
        (folder / "model.safetensors").rename(secret)
        (folder / "model.safetensors").symlink_to(secret)
        overrides = [f"--model.path={folder}", "--model.config="]
        expected = f"error: {folder / 'model.safetensors'} leads to {secret}, outside the folder"
    else:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=clean_env())
        assert result.returncode == 0, result.stderr[-3000:]
        overrides = ["--model.init_seed=1", "--loss.beta=0.2", "--loss.type=ipo",
                     "--train.steps=3"]
        expected = (f"error: cannot resume from {tmp_path / 'run' / 'step_00000002'}: what "
                    "defines the run differs from its run's: model.init_seed (0 -> 1); "
                    'loss.type (["sigmoid"] -> ["ipo"]); loss.beta (0.1 -> 0.2).')
    result = subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=clean_env())
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-3000:]


@pytest.mark.distributed
def test_two_ranks_of_the_launcher_stop_cleanly_on_sigterm(run_config, tmp_path):
    """SIGTERM to `train.py --nproc-per-node 2`: passed on to both ranks, which save a
    checkpoint at the end of their step; exit 0, no traceback (before, under torchrun: its
    SignalException traceback and status 1)."""
    out_dir = tmp_path / "run"
    process = launch(run_config, "--checkpoint.every=0", "--checkpoint.export_hf=false",
                     "--train.steps=50", "--data.max_examples=200", nproc=2)
    out, err = sigterm_after_step(process, out_dir, 2)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "stop requested: saving a checkpoint" in out
    assert len(list(out_dir.glob("step_*"))) == 1 and not (out_dir / "run.lock").exists()


@pytest.mark.distributed
def test_a_rank_killed_is_named_in_one_line(run_config, tmp_path):
    """A rank that dies without a word (SIGKILL, as the out-of-memory killer sends) is named by
    the launcher; the rank that loses it says so in one line, no traceback."""
    out_dir = tmp_path / "run"
    process = launch(run_config, "--checkpoint.every=0", "--checkpoint.export_hf=false",
                     "--train.steps=50", "--data.max_examples=200", nproc=2)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (out_dir / "metrics.jsonl").is_file() and max(losses(out_dir), default=0) >= 2:
            ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                   text=True).stdout.split()
            os.kill(int(ranks[-1]), signal.SIGKILL)  # the last one started: rank 1
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGKILL and "Traceback" not in err, err[-3000:]
    errors = [line for line in error_lines(err) if "error: " in line]
    assert errors[-1].startswith("error: rank 1 was killed by SIGKILL"), err[-3000:]
    assert all(line.startswith("[rank 0] error: lost another rank") for line in errors[:-1])


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
    """bco_pair with bco_running_mean keeps a running mean; epochs end with empty
    micro-batches and each rank sees its own pairs: the loss stays finite over several epochs
    on two ranks."""
    out_dir = tmp_path / "run"
    run(run_config, "--loss.type=bco_pair", "--loss.bco_running_mean=true",
        "--train.grad_accum=3", "--train.steps=6",
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


# ---- TRL's options in whole runs: LD-DPO, WPO, TR-DPO -------------------------------------

TRL_OPTIONS = {
    "ld_alpha": ("--loss.ld_alpha=0.5",),
    "use_weighting": ("--loss.use_weighting=true",),
    "sync_ref_model": ("--reference.sync_ref_model=true", "--reference.ref_model_sync_steps=1",
                       "--reference.ref_model_mixup_alpha=0.5"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("option", list(TRL_OPTIONS))
def test_option_runs_on_one_and_two_ranks(run_config, tmp_path, option):
    """A short DPO run with each option, on the documents executor: one process (2
    micro-batches a step) and two gloo ranks (1 each) see the same steps and log the same
    losses; step 1's is the loss as TRL defines it (ln 2 where the policy is the reference;
    for WPO ln 2 times the mean pair weight, computed here from materialized logits); each run
    finishes with its final checkpoint."""
    common = ("--train.steps=3", "--checkpoint.every=0", "--checkpoint.export_hf=false",
              "--train.attention=documents", *TRL_OPTIONS[option])
    one, two = tmp_path / "one", tmp_path / "two"
    run(run_config, f"--train.output_dir={one}", "--train.grad_accum=2", *common)
    run(run_config, f"--train.output_dir={two}", "--train.grad_accum=1", *common, ranks=2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    first = math.log(2) if option != "use_weighting" else wpo_first_loss(
        run_config, "--train.grad_accum=2", *common)
    assert a[1] == pytest.approx(first, rel=1e-5)
    assert (one / "step_00000003").is_dir() and (two / "step_00000003").is_dir()


def wpo_first_loss(config_path: Path, *overrides: str) -> float:
    """WPO's step-1 loss of the run, as TRL defines it, independently of the trainer's head
    and reduction: the step's pairs from the run's own loader, the initial model, and for each
    completion alone w = exp(mean_t (log p_t - log sum_v p_v^2)) from its full logits; the
    loss is the mean over pairs of ln 2 * w(chosen) * w(rejected)."""
    import numpy as np
    from conftest import causal_logits

    from prefixdpo.data.layout import Numbering
    from prefixdpo.data.loader import PreferenceLoader
    from prefixdpo.model.transformer import build_model
    from prefixdpo.train.build import ModelSource, load_run_data, tokenizer_for
    from prefixdpo.train.config import load_config
    from prefixdpo.model.executor import AttentionExecutor

    config = load_config(config_path, list(overrides))
    source = ModelSource.from_section(config.model)
    data = load_run_data(config.data, tokenizer_for(config.data, source), config.train.seed,
                         progress=False, max_positions=source.config.max_position_embeddings)
    loader = PreferenceLoader(data.train, config.data.layout, config.train.micro_batch_size,
                              config.train.grad_accum, seed=config.train.seed,
                              packing_length=data.fit.packing_length,
                              pad_multiple=AttentionExecutor("documents").row_multiple,
                              prefetch=0)
    iterator = iter(loader)
    step = next(iterator)
    iterator.close()
    model = build_model(source.config, seed=source.seed)
    numbering = Numbering(data.train)

    def weight(prompt, completion) -> float:
        ids = torch.tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = causal_logits(model, ids)[0, len(prompt) - 1:-1].double()
        log_p = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        log_sum_sq = logits.softmax(-1).pow(2).sum(-1).log()
        return math.exp((log_p - log_sum_sq).mean().item())

    pair_losses = []
    for batch in step:
        for pair in batch.pair_ids.tolist():
            example = data.train[int(np.searchsorted(numbering.pair_offsets, pair, "right")) - 1]
            chosen, rejected = example.pairs[pair - int(numbering.pair_offsets[
                data.train.index(example)])]
            sides = []
            for number in (chosen, rejected):
                for group in example.groups:
                    if number < len(group.completions):
                        sides.append(weight(group.prompt, group.completions[number]))
                        break
                    number -= len(group.completions)
            pair_losses.append(math.log(2) * sides[0] * sides[1])
    return sum(pair_losses) / len(pair_losses)


def test_sync_ref_model_resumes_exactly(run_config, tmp_path):
    """TR-DPO's reference changes during training: it is saved with the checkpoint, so a run
    stopped after step 2 and continued logs the losses of an uninterrupted one."""
    common = ("--optim.schedule=constant", "--checkpoint.every=0",
              "--checkpoint.export_hf=false", *TRL_OPTIONS["sync_ref_model"])
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(run_config, f"--train.output_dir={whole}", "--train.steps=4", *common)
    run(run_config, f"--train.output_dir={resumed}", "--train.steps=2", *common)
    out = run(run_config, f"--train.output_dir={resumed}", "--train.steps=4", *common)
    assert "resumed from" in out and "(step 2)" in out
    expected, got = losses(whole), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step

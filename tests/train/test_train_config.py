"""Config loading: TOML sections into frozen dataclasses, strict overrides, clear refusals."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from prefixdpo.train.config import build_config, load_config, parse_override, to_toml

REPO = Path(__file__).resolve().parents[2]
MINIMAL = """
[model]
config = "configs/models/demo-llama.json"
[data]
path = "data.jsonl"
"""


def write(tmp_path, text=MINIMAL):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path), ["--train.steps=7", "--loss.type=sigmoid,sft",
                                           "--loss.weights=[1.0, 0.5]", "--data.layout=paired",
                                           "--data.packing_length=1024", "--optim.lr=2e-6",
                                           "--train.activation_checkpointing=true"])
    assert config.train.steps == 7 and config.train.log_every == 10
    assert config.loss.type == ("sigmoid", "sft") and config.loss.weights == (1.0, 0.5)
    assert config.data.layout == "paired" and config.data.packing_length == 1024
    assert config.optim.lr == 2e-6 and config.train.activation_checkpointing is True
    assert load_config(write(tmp_path), ["--data.packing_length=auto"]).data.packing_length == "auto"


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path), ["--loss.type=ipo", "--optim.betas=[0.8, 0.95]"])
    assert build_config(tomllib.loads(to_toml(config))) == config


@pytest.mark.parametrize("override, message", [
    (["--train.stepz=3"], r"unknown key train.stepz; valid keys in \[train\]: steps, output_dir"),
    (["--trian.steps=3"], r"unknown section \[trian\]; valid sections: model, data"),
    (["--train.steps=many"], r"train.steps = 'many' should be an integer"),
    (["--train.steps=2.5"], r"train.steps = 2.5 should be an integer"),
    (["--train.compile=yes"], r"train.compile = 'yes' should be true or false"),
    (["--optim.betas=[0.9]"], r"optim.betas = \[0.9\] should be a list of 2 values"),
    (["--data.layout=diagonal"], r"data.layout = 'diagonal'; expected one of: shared\+packed"),
    (["--data.packing_length=1000"], r"expected 'auto' or a positive multiple of 128"),
    (["--loss.type=dpo"], r"loss.type has unknown loss 'dpo'"),
    (["--train.steps"], r"expected --section.key=value"),
    (["--reference.mode=none"], r"reference.mode = 'none' but loss.type \['sigmoid'\] needs"),
])
def test_refusals_name_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path), override)


def test_model_source_and_files(tmp_path):
    with pytest.raises(ValueError, match="set exactly one of model.path"):
        load_config(write(tmp_path, MINIMAL + '[model]\n'.replace("[model]", "")),
                    ["--model.path=some/model"])
    with pytest.raises(ValueError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))


def test_override_values_are_toml_or_bare_strings():
    assert parse_override("--data.path=a/b.jsonl") == ("data", "path", "a/b.jsonl")
    assert parse_override("--train.steps=10") == ("train", "steps", 10)
    assert parse_override('--data.path="x y"') == ("data", "path", "x y")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.train.steps > 0 and (config.model.path or config.model.config)


def test_readme_documents_every_key():
    """The README's config reference lists every key of every section with its default."""
    import dataclasses
    import re
    import typing

    from prefixdpo.train.config import Config

    readme = (REPO / "README.md").read_text()
    for section, cls in typing.get_type_hints(Config).items():
        block = readme.split(f"**[{section}]**", 1)[1].split("**[", 1)[0]
        for f in dataclasses.fields(cls):
            row = re.search(rf"^\| `{f.name}` \| (.+?) \|", block, re.MULTILINE)
            assert row, (section, f.name)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if row.group(1) == "(required)":
                assert default == "", (section, f.name)
                continue
            shown = tomllib.loads(f"v = {row.group(1).strip('`')}")["v"]
            if isinstance(default, tuple):
                shown = tuple(shown) if isinstance(shown, list) else (shown,)
            assert shown == default, (section, f.name, shown, default)


@pytest.mark.parametrize("override, message", [
    (["--optim.lr=nan"], r"--optim.lr=nan: optim.lr must be a finite number, got nan"),
    (["--optim.lr=inf"], r"optim.lr must be a finite number, got inf"),
    (["--optim.weight_decay=-inf"], r"optim.weight_decay must be a finite number, got -inf"),
    (["--optim.eps=nan"], r"optim.eps must be a finite number, got nan"),
    (["--optim.max_grad_norm=inf"], r"optim.max_grad_norm must be a finite number, got inf"),
    (["--optim.min_lr_ratio=nan"], r"optim.min_lr_ratio must be a finite number, got nan"),
    (["--optim.betas=[0.9, nan]"], r"optim.betas must be a finite number, got nan"),
    (["--optim.betas=[inf, 0.999]"], r"optim.betas must be a finite number, got inf"),
    (["--loss.beta=nan"], r"loss.beta must be a finite number, got nan"),
    (["--loss.simpo_gamma=inf"], r"loss.simpo_gamma must be a finite number, got inf"),
    (["--loss.weights=[1.0, nan]", "--loss.type=sigmoid,sft"],
     r"loss.weights must be a finite number, got nan"),
    (["--data.eval_fraction=nan"], r"data.eval_fraction must be a finite number, got nan"),
])
def test_nonfinite_floats_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path), override)


def test_nonfinite_floats_in_the_toml_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"optim.lr must be a finite number, got nan"):
        load_config(write(tmp_path, MINIMAL + "[optim]\nlr = nan\n"))


@pytest.mark.parametrize("override, message", [
    (["--optim.betas=[1.0, 0.999]"], r"optim.betas = \[1.0, 0.999\]; expected two numbers in "
                                     r"\[0, 1\)"),
    (["--optim.betas=[0.9, -0.1]"], r"optim.betas = \[0.9, -0.1\]; expected two numbers in"),
])
def test_adam_betas_range(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path), override)


@pytest.mark.parametrize("override, message", [
    (["--train.output_dir="], r"--train.output_dir=: train.output_dir is empty; set the run"),
    (['--train.output_dir="  "'], r"train.output_dir is empty"),
    (["--data.path="], r"--data.path=: data.path is required"),
])
def test_empty_required_paths_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path), override)


def test_trl_options_load_under_trls_names(tmp_path):
    config = load_config(write(tmp_path), [
        "--loss.type=sigmoid,aot_pair", "--loss.ld_alpha=0.5", "--loss.bco_running_mean=true",
        "--loss.f_alpha_divergence_coef=0.3", "--reference.sync_ref_model=true",
        "--reference.ref_model_sync_steps=64", "--reference.ref_model_mixup_alpha=0.9"])
    assert config.loss.type == ("sigmoid", "aot_unpaired")  # the deprecated name, as TRL's
    assert config.loss.ld_alpha == 0.5 and config.loss.bco_running_mean
    assert config.loss.f_alpha_divergence_coef == 0.3
    assert load_config(write(tmp_path), ["--loss.use_weighting=true"]).loss.use_weighting
    # auto is the live reference with sync_ref_model (TR-DPO updates it)
    assert config.reference.mode == "live" and config.reference.ref_model_sync_steps == 64
    assert load_config(write(tmp_path), []).reference.mode == "precomputed"


@pytest.mark.parametrize("overrides, message", [
    (["--reference.sync_ref_model=true", "--reference.mode=precomputed"],
     "reference.sync_ref_model updates the reference during training, which needs "
     "reference.mode = 'live', not 'precomputed'"),
    (["--reference.sync_ref_model=true", "--lora.rank=8"], "reference.mode = 'live', not "
     "'adapters_off'"),
    (["--reference.sync_ref_model=true", "--lora.rank=8", "--reference.mode=live"],
     "needs full fine-tuning"),
    (["--reference.ref_model_mixup_alpha=1.5"], "reference.ref_model_mixup_alpha = 1.5"),
    (["--reference.ref_model_sync_steps=0"], "reference.ref_model_sync_steps = 0"),
    (["--loss.f_divergence_type=forward_kl", "--loss.type=apo_zero"],
     "has no meaning for loss.type"),
])
def test_trl_option_refusals_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config(write(tmp_path), overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override, message", [
    # Before: each of these named run.toml, where the key is not.
    (["--train.stepz=3"], r"^--train.stepz=3: unknown key train.stepz;"),
    (["--trian.steps=3"], r"^--trian.steps=3: unknown section \[trian\];"),
    (["--train.steps=abc"], r"^--train.steps=abc: train.steps = 'abc' should be an integer"),
    (["--train.log_every=0"], r"^--train.log_every=0: train.log_every must be >= 1"),
    (["--train.steps=5", "--reference.mode=none"],
     r"^--reference.mode=none: reference.mode = 'none' but loss.type"),
])
def test_errors_of_overrides_name_the_override(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(write(tmp_path), override)


def test_errors_of_the_file_still_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"^\S*run.toml: train.steps must be >= 1"):
        load_config(write(tmp_path, MINIMAL + "[train]\nsteps = 0\n"), ["--train.seed=3"])


@pytest.mark.parametrize("key", ["train.seed", "model.init_seed", "lora.init_seed"])
def test_negative_seeds_name_the_key(tmp_path, key):
    """Before: `--train.seed=-1` failed deep in numpy with 'expected non-negative integer'."""
    with pytest.raises(ValueError, match=rf"^--{key}=-1: {key} = -1; expected an integer from 0"):
        load_config(write(tmp_path), [f"--{key}=-1"])


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False),
                                             ('"force"', "force")])
def test_checkpoint_resume_takes_force(tmp_path, value, expected):
    assert load_config(write(tmp_path), [f"--checkpoint.resume={value}"]).checkpoint.resume \
        == expected
    with pytest.raises(ValueError, match="expected true, false or 'force'"):
        load_config(write(tmp_path), ["--checkpoint.resume=always"])

"""LoRA adapters: PEFT (the oracle) loads our exported adapter onto the transformers base and
gives our logits; the merged export is W + B A alpha / rank; the base's initialization is
untouched by adding adapters; with the adapters-off reference the first loss is ln 2 and only
the adapters get gradients and move."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from conftest import DENSE, causal_logits, random_examples, tiny_config
from safetensors.torch import load_file
from test_runs import REPO, load_model_initial, losses, run, run_config  # noqa: F401

from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.hf_checkpoint import load_model, save_hf_checkpoint
from prefixdpo.model.transformer import Transformer, build_model
from prefixdpo.train.build import ModelSource
from prefixdpo.train.config import LoraSection, OptimSection
from prefixdpo.train.distributed import Distributed
from prefixdpo.train.forward import attention_masks, batch_sequence_log_probs, pair_losses
from prefixdpo.train.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdaptersOffReference, LoRALinear,
                        adapters_disabled, add_lora, init_lora, merged_state_dict, save_adapter)
from prefixdpo.train.loop import train_step
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.optim import build_optimizer

CPU = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
SEQ_LEN = 20


def adapted(model: Transformer, config: LoraSection, seed: int = 0) -> Transformer:
    """`model` with adapters whose B is random too (B = 0 would hide a wrong A or scale)."""
    add_lora(model, config)
    init_lora(model, config.init_seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                b = module.lora_B.weight
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("variant, config", [
    ("llama_gqa", LoraSection(rank=4, alpha=8.0)),
    ("llama_tied", LoraSection(rank=2, alpha=16.0, target_modules=("q_proj", "v_proj",
                                                                   "down_proj"))),
    ("mistral_window", LoraSection(rank=3, alpha=5.0, dropout=0.1)),
    # Projections with a bias (the adapter adds to the biased base) and the other families.
    ("qwen2_bias_tied", LoraSection(rank=4, alpha=8.0)),
    ("qwen3_qk_norm_bias", LoraSection(rank=2, alpha=4.0, target_modules=("q_proj", "o_proj",
                                                                          "up_proj"))),
    ("gemma3_layer_types", LoraSection(rank=4, alpha=8.0)),
])
def test_peft_loads_the_exported_adapter(hf_checkpoint, tmp_path, variant, config):
    peft = pytest.importorskip("peft")
    folder, hf_model = hf_checkpoint(variant)
    ours = adapted(load_model(folder), config)
    out = save_adapter(ours.state_dict(), config, tmp_path / "adapter", str(folder))
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in saved
    assert len(saved) == 2 * len(config.target_modules) * ours.config.num_hidden_layers
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == config.rank
    theirs = peft.PeftModel.from_pretrained(hf_model, out).eval()
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN),
                              generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        expected = theirs(input_ids).logits
        actual = causal_logits(ours, input_ids)
        with adapters_disabled(ours):
            base = causal_logits(ours, input_ids)
        with theirs.disable_adapter():
            hf_base = theirs(input_ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5
    assert (base - hf_base).abs().max().item() <= 1e-5
    assert (actual - base).abs().max().item() > 1e-3  # the adapters do change the logits


def test_merged_weights_are_base_plus_scaled_product(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    config = LoraSection(rank=4, alpha=12.0, target_modules=("k_proj", "up_proj"))
    ours = adapted(load_model(folder), config)
    state = ours.state_dict()
    merged = merged_state_dict(state, config.alpha / config.rank)
    plain = load_model(folder).state_dict()
    assert set(merged) == set(plain)
    for name, tensor in merged.items():
        prefix = name.removesuffix(".weight")
        if prefix.endswith(("k_proj", "up_proj")):
            a, b = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
            torch.testing.assert_close(tensor, plain[name] + b @ a * 3.0, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, plain[name]), name
    # The merged checkpoint, saved as usual, gives the adapted model's logits.
    save_hf_checkpoint(merged, ours.config, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged")
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        assert (causal_logits(reloaded, input_ids)
                - causal_logits(ours, input_ids)).abs().max().item() <= 1e-5


def test_adapters_do_not_change_the_base_initialization(tmp_path):
    """Adding adapters on the meta device keeps the base's names and random draws."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**tiny_config().to_hf_dict()}))
    source = ModelSource(tiny_config(), None, config_path, seed=3)
    plain = source.build(torch.device("cpu"))
    lora = source.build(torch.device("cpu"), shard=lambda m: add_lora(m, LoraSection(rank=2)))
    init_lora(lora, 0)
    lora_state = lora.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, lora_state[name]), name
    assert all(not p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    a = lora.layers[0].mlp.down_proj.lora_A.weight
    bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)), as PEFT
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert not lora.layers[0].mlp.down_proj.lora_B.weight.any()


def lora_run(dropout: float = 0.0):
    model = build_model(tiny_config(), seed=0)
    add_lora(model, LoraSection(rank=4, alpha=8.0, dropout=dropout))
    init_lora(model, 0)
    examples, report = fit_examples(random_examples(24, model.config.vocab_size), "shared+packed",
                                    128, "error")
    loader = PreferenceLoader(examples, "shared+packed", 4, packing_length=report.packing_length,
                              pad_multiple=8, seed=1)
    return model, AdaptersOffReference(model), loader


def test_first_loss_is_ln2_and_only_adapters_learn():
    model, reference, loader = lora_run(dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimSection(lr=1e-2), CPU.device)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2 * 7 * 2
    batches = iter(loader)
    result, _ = train_step(model, next(batches), reference=reference, loss_config=LossConfig(),
                           loss_state=LossState(), optimizer=optimizer, max_grad_norm=0.0,
                           env=CPU, executor=DENSE)
    assert abs(result.loss - math.log(2)) < 1e-6
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        # Step 1: B = 0, so only B has a gradient (A's is B^T times something).
        assert moved == name.endswith("lora_B.weight"), name
    result, _ = train_step(model, next(batches), reference=reference, loss_config=LossConfig(),
                           loss_state=LossState(), optimizer=optimizer, max_grad_norm=0.0,
                           env=CPU, executor=DENSE)
    assert result.loss != pytest.approx(math.log(2), abs=1e-4)  # the policy left the base
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == ("lora_" not in name), name


def test_gradients_reach_only_adapters():
    model, reference, loader = lora_run()
    with torch.no_grad():  # B != 0, so A gets a gradient as well
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.02)
    batch = next(iter(loader)).batches[0]
    losses, _, _ = pair_losses(model, batch, reference, LossConfig(), LossState(), DENSE)
    losses.sum().backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_adapters_off_reference_is_the_base_model():
    """The reference equals the log-probs of the model without adapters, and the adapters
    are back on afterwards."""
    model, reference, loader = lora_run()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.05)
    plain = build_model(tiny_config(), seed=0)
    batch = next(iter(loader)).batches[0]
    mask = attention_masks(batch, plain.config, DENSE)
    with torch.no_grad():
        expected = batch_sequence_log_probs(plain, batch, mask)[0]
        adapted_logps = batch_sequence_log_probs(model, batch, mask)[0]
    actual = reference(batch, mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert all(m.adapters_enabled for m in model.modules() if isinstance(m, LoRALinear))
    assert (adapted_logps - expected).abs().max() > 1e-3


@pytest.mark.distributed
def test_lora_run_on_two_ranks_resumes_exactly_and_exports(run_config, tmp_path):
    """A whole LoRA run through train.py on two gloo ranks (FSDP2 units holding their
    adapters), with activation checkpointing and adapter dropout: the first loss is ln 2 with
    no reference table; resuming from the step-2 checkpoint gives the same losses; the PEFT
    adapter on the transformers base gives the logits of the merged export."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out_dir = tmp_path / "run"
    overrides = ["--train.steps=4", "--checkpoint.every=2", "--lora.rank=4",
                 "--lora.dropout=0.1", "--train.activation_checkpointing=true",
                 "--lora.export_merged=true"]
    out = run(run_config, *overrides, ranks=2)
    assert "LoRA rank 4" in out and "reference log-probs" not in out
    first = losses(out_dir)
    assert first[1] == pytest.approx(math.log(2), abs=1e-6)
    assert not (out_dir / "reference_logps_train.safetensors").exists()
    saved = tomllib.loads((out_dir / "step_00000004" / "config.toml").read_text())
    assert saved["reference"]["mode"] == "adapters_off" and saved["lora"]["rank"] == 4
    shutil.rmtree(out_dir / "step_00000004")
    out = run(run_config, *overrides, ranks=2)
    assert "(step 2)" in out
    resumed = losses(out_dir)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], abs=1e-6), step

    # The base: the run's random initialization, as a Hugging Face checkpoint.
    base_dir = tmp_path / "base"
    save_hf_checkpoint(load_model_initial(tmp_path).state_dict(),
                       load_model_initial(tmp_path).config, base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir,
                                                             attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base, out_dir / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "hf",
                                                               attn_implementation="eager")
    ids = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(ids).logits
        assert (with_adapter(ids).logits - expected).abs().max() < 1e-4
        with with_adapter.disable_adapter():
            assert (with_adapter(ids).logits - expected).abs().max() > 1e-4  # it trained

    # The final training checkpoint, converted, is the merged export.
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "dcp-to-hf", "--ckpt",
                    str(out_dir / "step_00000004"), "--hf-config", str(out_dir / "hf"),
                    "--out", str(converted)], cwd=REPO, check=True, capture_output=True)
    exported = load_file(out_dir / "hf" / "model.safetensors")
    from_checkpoint = load_file(converted / "model.safetensors")
    assert exported.keys() == from_checkpoint.keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, from_checkpoint[name]), name


@pytest.fixture(scope="module")
def env():
    import torch.distributed as dist

    from prefixdpo.train.distributed import setup

    env = setup("cpu")
    yield env
    dist.destroy_process_group()


def sharded_lora_grads(env, activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    from prefixdpo.train.parallelize import parallelize

    config = LoraSection(rank=4, dropout=0.5)
    model = ModelSource(tiny_config(), None, None, 0).build(
        env.device, shard=lambda meta_model: parallelize(
            add_lora(meta_model, config), env.mesh, mixed_precision=False,
            activation_checkpointing=activation_checkpointing))
    init_lora(model, 0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                b = module.lora_B.weight
                (b.to_local() if hasattr(b, "to_local") else b).normal_(0, 0.05,
                                                                       generator=generator)
    _, _, loader = lora_run()
    batch = next(iter(loader)).batches[0]
    torch.manual_seed(0)  # the dropout masks
    logps, _ = batch_sequence_log_probs(model, batch, attention_masks(batch, model.config,
                                                                      DENSE))
    logps.sum().backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_same_dropout(env):
    """Under FSDP2 with activation checkpointing, the recomputed layer draws the adapters'
    dropout masks of the forward: the gradients equal those without checkpointing."""
    plain, checkpointed = sharded_lora_grads(env, False), sharded_lora_grads(env, True)
    assert set(plain) == set(checkpointed) and all("lora_" in n for n in plain)
    assert len(plain) == 2 * 7 * 2
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)

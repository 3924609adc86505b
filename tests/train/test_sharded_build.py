"""Building the initial model sharded (meta device -> `parallelize` -> `to_empty` -> fill each
shard), on two gloo ranks: the weights equal the unsharded `build_model` / `load_model`, each
rank reads only its own rows of the checkpoint, the FSDP units are the intended ones, and a
forward and backward through the sharded units matches the plain model.

One torchrun launch runs every scenario (this file, run as a script, is the worker); each rank
writes what it saw to a JSON file and rank 0 the gathered full weights to safetensors files,
and the tests below compare them with the unsharded model, built here in the test process.
The tiny configs split unevenly over two ranks: vocab 211 (106 + 105 rows) and intermediate
size 97 (49 + 48).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]

from conftest import (DENSE, FAMILIES, HF_VARIANTS, make_hf_model, random_examples,
                      reshards_after_forward, tiny_config)

from prefixdpo.model.hf_checkpoint import load_model, save_hf_checkpoint  # noqa: E402
from prefixdpo.model.transformer import build_model  # noqa: E402

SEED = 5
# The other families' oracle variants (biases, q/k norms, per-layer windows and RoPE), loaded
# sharded and run against the plain model.
FAMILY_VARIANTS = ("qwen2_bias_tied", "qwen3_qk_norm_bias", "gemma3_layer_types")
# Scenario name -> config overrides (random initialization).
INIT = {"init_untied": dict(intermediate_size=97),
        "init_tied": dict(intermediate_size=97, tie_word_embeddings=True),
        # Gemma 3: its norms start at zero, its q/k norms are parameters of each layer's unit.
        "init_gemma3": dict(FAMILIES["gemma3"], intermediate_size=97)}
# Scenario name -> (transformers model kind, its config overrides, save_pretrained
# max_shard_size).
LOAD = {"load_single": ("llama", dict(intermediate_size=97), None),
        "load_multi": ("llama", dict(intermediate_size=97), "40KB"),
        "load_tied_with_head": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1),
                                None),
        **{f"load_{name}": (*HF_VARIANTS[name], None) for name in FAMILY_VARIANTS}}
NUMERICS = ("load_single", "load_tied_with_head", "reference_bf16",
            *(f"load_{name}" for name in FAMILY_VARIANTS))


def make_checkpoints(root: Path) -> dict[str, Path]:
    folders = {}
    for name, (kind, overrides, max_shard_size) in LOAD.items():
        folder = root / name
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        make_hf_model(kind, **overrides).save_pretrained(folder, **kwargs)
        folders[name] = folder
    # A tied checkpoint that also stores the head (equal to the embedding, as it must be).
    tied = folders["load_tied_with_head"] / "model.safetensors"
    tensors = load_file(tied)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tied, metadata={"format": "pt"})
    # bfloat16 on disk, float32 in the model: each rank converts its rows.
    plain = load_model(folders["load_single"], dtype=torch.bfloat16)
    folders["load_bf16"] = save_hf_checkpoint(plain.state_dict(), plain.config,
                                              root / "load_bf16", max_shard_bytes=60_000)
    # The live reference's build: frozen, bfloat16 parameters, resharded after forward.
    folders["reference_bf16"] = folders["load_single"]
    # A tied checkpoint whose stored head differs from the embedding in its last row only,
    # which rank 1 reads: only the rank that reads the differing rows can see it.
    bad = root / "tied_head_differs"
    bad.mkdir()
    for f in folders["load_tied_with_head"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.weight"][-1] += 1
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    folders["tied_head_differs"] = bad
    return folders


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, Path], list[dict]]:
    """Run the worker once on two ranks; returns (output folder, checkpoints, per-rank
    results)."""
    root = tmp_path_factory.mktemp("sharded_build")
    folders = make_checkpoints(root)
    spec = {"out": str(root / "out"), "checkpoints": {k: str(v) for k, v in folders.items()}}
    (root / "out").mkdir()
    (root / "spec.json").write_text(json.dumps(spec))
    from test_runs import clean_env

    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         __file__, str(root / "spec.json")], cwd=REPO,
        env=clean_env() | {"PYTHONPATH": str(REPO / "tests")},  # the worker imports conftest
        capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-5000:]
    ranks = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    return root / "out", folders, ranks


def assert_same_weights(gathered: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        assert gathered[name].dtype == tensor.dtype, name
        assert torch.equal(gathered[name], tensor), name


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", sorted(INIT))
def test_random_init_equals_unsharded(results, scenario):
    """Each rank draws every full parameter in turn with the seeded generator and keeps its
    rows: together the shards are exactly `build_model(config, seed=SEED)`."""
    out, _, ranks = results
    config = tiny_config(**INIT[scenario])
    assert_same_weights(load_file(out / f"{scenario}.safetensors"),
                        build_model(config, seed=SEED).state_dict())
    if scenario == "init_gemma3":  # (1 + w) norms start at w = 0
        gathered = load_file(out / f"{scenario}.safetensors")
        assert not gathered["layers.0.self_attn.q_norm.weight"].any()
    # The split is torch.chunk's, uneven here: the embedding's 211 rows as 106 + 105.
    assert [r[scenario]["local_rows"]["embed_tokens.weight"] for r in ranks] == [106, 105]
    assert [r[scenario]["local_rows"]["layers.0.mlp.gate_proj.weight"] for r in ranks] == [49, 48]
    assert all(r[scenario]["tied"] == config.tie_word_embeddings for r in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", [*sorted(LOAD), "load_bf16", "reference_bf16"])
def test_load_equals_unsharded(results, scenario):
    out, folders, _ = results
    dtype = torch.bfloat16 if scenario == "reference_bf16" else torch.float32
    assert_same_weights(load_file(out / f"{scenario}.safetensors"),
                        load_model(folders[scenario], dtype=dtype).state_dict())


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", [*sorted(LOAD), "load_bf16", "reference_bf16"])
def test_each_rank_reads_and_holds_only_its_rows(results, scenario):
    """Memory at load, counted in bytes rather than measured: torch's CPU allocations are
    invisible to tracemalloc, and the process's RSS at this size is mostly torch itself. A
    rank's memory while loading is its shards plus the slice being copied, so:

    - every read of the checkpoint (instrumented at the single function that reads tensor
      data) returns exactly the rows of the local shard of the parameter it fills: its shape
      is the local shard's shape, so no full tensor is ever read (a tied checkpoint's stored
      head is read for the same rows, to compare them with the embedding);
    - the bytes a rank reads are the bytes of its shards, and the two ranks together read the
      checkpoint's tensors exactly once;
    - the bytes of the parameters a rank allocates (the local shards that `to_empty` made) are
      about half of the model's: with two ranks and uneven splits, within 1%.
    """
    _, _, ranks = results
    model_bytes = ranks[0][scenario]["model_bytes"]
    read_total = 0
    for rank in ranks:
        seen = rank[scenario]
        local_shapes = seen["local_shapes"]
        assert seen["reads"], "nothing was read"
        for name, shape, _ in seen["reads"]:
            assert shape == local_shapes[name], (name, shape, local_shapes[name])
        read_bytes = sum(nbytes for _, _, nbytes in seen["reads"])
        assert read_bytes == seen["shard_bytes_on_disk"]
        read_total += read_bytes
        assert abs(seen["param_bytes"] / model_bytes - 0.5) < 0.01, seen["param_bytes"]
    assert read_total == ranks[0][scenario]["checkpoint_bytes"]


@pytest.mark.distributed
def test_sharded_validation_sees_every_row(results):
    """A stored tied head that differs from the embedding in its last row: the rank that
    reads that row refuses the checkpoint."""
    _, _, ranks = results
    assert ranks[0]["tied_head_differs"]["error"] is None
    assert "lm_head.weight differs from model.embed_tokens.weight" in \
        ranks[1]["tied_head_differs"]["error"]


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", ["init_untied", "init_tied", "init_gemma3"])
def test_fsdp_units(results, scenario):
    """Untied: the embedding, each layer and norm + head are units, besides the root; tied,
    the embedding and the head share the root. With two ranks the layers and the embedding
    free their gathered weights after forward, norm + head does not."""
    _, _, ranks = results
    units = ranks[0][scenario]["units"]
    tied = scenario != "init_untied"
    assert units["layers.0"] == units["layers.1"] == {"unit": True, "reshard": True}
    assert units["root"]["unit"]
    if tied:
        assert units["embed_tokens"]["unit"] is False and units["lm_head"]["unit"] is False
    else:
        assert units["embed_tokens"] == {"unit": True, "reshard": True}
        assert units["norm"] == units["lm_head"] == {"unit": True, "reshard": False}
        assert ranks[0][scenario]["norm_and_head_share_a_unit"]


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", NUMERICS)
def test_forward_backward_match_plain_model(results, scenario):
    """Sharded log-probs and gradients (two steps, both ranks on the same batch, so FSDP's
    average over ranks is the plain gradient) against the unsharded model, compared on each
    rank; the frozen reference's log-probs against the plain model's in bfloat16."""
    _, _, ranks = results
    for rank in ranks:
        seen = rank[scenario]
        assert seen["logp_error"] <= (1e-3 if scenario == "reference_bf16" else 1e-5)
        if scenario == "reference_bf16":
            assert seen["trainable"] == []
        else:
            assert seen["grad_error"] <= 1e-5
            assert seen["num_grads"] == seen["num_params"]


# The worker: run by torchrun on every rank.

def _units(model) -> dict[str, dict]:
    from torch.distributed.fsdp import FSDPModule

    def describe(module):
        if not isinstance(module, FSDPModule):
            return {"unit": False}
        return {"unit": True, "reshard": reshards_after_forward(module)}

    units = {"root": describe(model), "embed_tokens": describe(model.embed_tokens),
             "norm": describe(model.norm), "lm_head": describe(model.lm_head)}
    units.update({f"layers.{i}": describe(layer) for i, layer in enumerate(model.layers)})
    return units


def _batch(vocab: int):
    from prefixdpo.data.loader import PreferenceLoader, fit_examples

    examples, _ = fit_examples(random_examples(12, vocab), "shared+packed", 128, "error")
    loader = PreferenceLoader(examples, "shared+packed", 2, packing_length=128, prefetch=0)
    return next(iter(loader))[0]


def _compare_numerics(model, plain, frozen: bool) -> dict:
    from prefixdpo.train.forward import attention_masks, batch_sequence_log_probs
    from prefixdpo.train.parallelize import reshard
    from prefixdpo.train.reference import LiveReference

    b = _batch(plain.config.vocab_size)
    mask = attention_masks(b, plain.config, executor=DENSE)
    if frozen:
        with torch.no_grad():
            expected = batch_sequence_log_probs(plain, b, mask)[0]
        actual = LiveReference(model)(b, mask)
        return {"logp_error": (actual.float() - expected.float()).abs().max().item(),
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}
    logp_error = grad_error = 0.0
    for _ in range(2):
        actual = batch_sequence_log_probs(model, b, mask)[0]
        expected = batch_sequence_log_probs(plain, b, mask)[0]
        actual.sum().backward()
        expected.sum().backward()
        logp_error = max(logp_error, (actual - expected).abs().max().item())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()
             if p.grad is not None}
    for name, p in plain.named_parameters():
        grad_error = max(grad_error, (grads[name] - p.grad).abs().max().item())
    reshard(model)
    return {"logp_error": logp_error, "grad_error": grad_error, "num_grads": len(grads),
            "num_params": len(list(plain.parameters()))}


def _worker(spec_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import prefixdpo.model.hf_checkpoint as hf
    from prefixdpo.model.config import ModelConfig
    from prefixdpo.train.build import ModelSource
    from prefixdpo.train.distributed import setup
    from prefixdpo.train.parallelize import freeze, parallelize

    spec = json.loads(Path(spec_file).read_text())
    out = Path(spec["out"])
    env = setup("cpu")
    reads: list[tuple[str, list[int], int]] = []
    original_read = hf._read_rows

    def recording_read(stored, start, stop):
        rows = original_read(stored, start, stop)
        reads.append((hf.hf_to_ours(stored.hf_name), list(rows.shape),
                      rows.numel() * rows.element_size()))
        return rows

    hf._read_rows = recording_read

    def build(source: ModelSource, dtype=torch.float32, frozen: bool = False):
        def shard(meta_model):
            assert all(p.is_meta for p in meta_model.parameters())
            if frozen:
                return parallelize(freeze(meta_model), env.mesh, mixed_precision=False,
                                   reshard_after_forward=True)
            return parallelize(meta_model, env.mesh, mixed_precision=False)
        return source.build(env.device, dtype, shard=shard)

    def describe(model, source: ModelSource, name: str) -> dict:
        params = model.state_dict(keep_vars=True)  # tied: both names, one parameter
        local = {n: hf.local_rows(p) for n, p in params.items()}
        unique = {id(p): (p, local[n][0]) for n, p in params.items()}
        checkpoint_bytes = shard_bytes = 0
        if source.checkpoint_dir is not None:
            reader = hf.CheckpointReader(source.checkpoint_dir, source.config)
            stored = list(reader.tensors.items())
            if reader.tied_head is not None:  # read too, for the same rows as the embedding
                stored.append(("lm_head.weight", reader.tied_head))
            for n, t in stored:
                with hf.safe_open(t.file, framework="pt") as f:
                    itemsize = {"F32": 4, "BF16": 2}[f.get_slice(t.hf_name).get_dtype()]
                checkpoint_bytes += itemsize * torch.Size(t.shape).numel()
                shard_bytes += itemsize * local[n][0].numel()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if env.rank == 0:
            save_file({k: v.clone() for k, v in state.items()}, out / f"{name}.safetensors")
        norm_state = getattr(model.norm, "_get_fsdp_state", None)
        return {
            "local_rows": {n: stop - start for n, (_, start, stop) in local.items()},
            "local_shapes": {n: list(t.shape) for n, (t, _, _) in local.items()},
            "param_bytes": sum(t.numel() * t.element_size() for _, t in unique.values()),
            "model_bytes": sum(p.numel() * p.element_size() for p, _ in unique.values()),
            "shard_bytes_on_disk": shard_bytes, "checkpoint_bytes": checkpoint_bytes,
            "tied": model.lm_head.weight is model.embed_tokens.weight,
            "units": _units(model),
            "norm_and_head_share_a_unit": norm_state is not None
            and norm_state() is model.lm_head._get_fsdp_state(),
        }

    results: dict[str, dict] = {}
    for name, overrides in INIT.items():
        source = ModelSource(tiny_config(**overrides), None, None, SEED)
        results[name] = describe(build(source), source, name)
    for name in [*LOAD, "load_bf16", "reference_bf16"]:
        folder = Path(spec["checkpoints"][name])
        source = ModelSource(ModelConfig.from_file(folder), folder, None, SEED)
        frozen = name == "reference_bf16"
        reads.clear()
        model = build(source, torch.bfloat16 if frozen else torch.float32, frozen)
        results[name] = {"reads": list(reads)} | describe(model, source, name)
        if name in NUMERICS:
            plain = load_model(folder, dtype=torch.bfloat16 if frozen else torch.float32)
            results[name] |= _compare_numerics(model, plain, frozen)
    # Last, since the ranks then disagree: only rank 1 reads the differing row.
    folder = Path(spec["checkpoints"]["tied_head_differs"])
    source = ModelSource(ModelConfig.from_file(folder), folder, None, SEED)
    try:
        build(source)
        error = None
    except ValueError as e:
        error = str(e)
    results["tied_head_differs"] = {"error": error}
    (out / f"rank{env.rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])

"""Convert between Hugging Face safetensors checkpoints and torch.distributed.checkpoint (DCP).

    python scripts/convert_checkpoint.py hf-to-dcp --hf DIR --out DIR
    python scripts/convert_checkpoint.py dcp-to-hf --ckpt DIR --hf-config DIR --out DIR

`hf-to-dcp` writes the weights under the key `model` (our parameter names), as the trainer's
checkpoints hold them, for tools that read DCP. `dcp-to-hf` reads the model weights of such a
folder, or of a training checkpoint (`output_dir/step_NNNNNNNN`), and writes config.json (from
`--hf-config`, every field preserved), safetensors shards and the tokenizer files found in
`--hf-config`. Tensors keep their dtype, so HF -> DCP -> HF is bit-identical. A LoRA run's
checkpoint is written merged, `W + B A alpha / rank` (alpha and rank from its config.toml).

DCP stores its `.metadata` file as a Python pickle, which torch.distributed.checkpoint reads:
convert only DCP folders you trust (your own runs). Safetensors are never unpickled.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from prefixdpo.model.config import ModelConfig
from prefixdpo.model.hf_checkpoint import (checked_model_dir, copy_tokenizer_files,
                                           expected_shapes, load_state_dict, resolve_model_dir,
                                           save_hf_checkpoint)
from prefixdpo.train.checkpoint import unwrapped, describe
from prefixdpo.train.lora import merged_state_dict, split_state_dict
from prefixdpo.train.run_dir import check_output_folder, output_error

MODEL_KEY = "model"


def hf_to_dcp(hf: str, out: Path) -> None:
    check_output_folder(out, "--out")
    model_dir = resolve_model_dir(hf)
    config = ModelConfig.from_file(model_dir)
    state = load_state_dict(model_dir, config)
    try:
        dcp.save({MODEL_KEY: state}, storage_writer=dcp.FileSystemWriter(out), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a failed write
        raise output_error("--out", out, unwrapped(e)) from None
    print(f"wrote {len(state)} tensors to {out}")


def read_dcp_model(ckpt: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP folder, allocated from its own metadata and checked against
    the config's names and shapes."""
    if not (ckpt / ".metadata").is_file():
        raise ValueError(f"{ckpt}: not a torch.distributed.checkpoint folder (no .metadata)")
    try:
        metadata = dcp.FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # noqa: BLE001 - a damaged or foreign .metadata file
        raise ValueError(f"{ckpt / '.metadata'}: cannot be read ({describe(e)})") from None
    prefix = MODEL_KEY + "."
    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            state[key.removeprefix(prefix)] = torch.empty(meta.size, dtype=meta.properties.dtype)
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    # A LoRA run's checkpoint also holds its adapters: read them too, and fold them in below.
    _, adapters = split_state_dict(state)
    expected.update({name: tuple(state[name].shape) for name in adapters})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: model tensors do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{ckpt}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {expected[name]} from the config")
    try:
        dcp.load({MODEL_KEY: state}, storage_reader=dcp.FileSystemReader(ckpt), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - truncated or missing files
        raise ValueError(f"{ckpt}: the model tensors cannot be read ({describe(e)})") from None
    if adapters:
        lora = lora_section(ckpt)
        state = merged_state_dict(state, lora["alpha"] / lora["rank"])
    return state


def lora_section(ckpt: Path) -> dict:
    """The [lora] section of the run config saved with a checkpoint (its alpha and rank)."""
    try:
        lora = tomllib.loads((ckpt / "config.toml").read_text())["lora"]
        if lora["rank"] > 0 and lora["alpha"] > 0:
            return lora
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        pass
    raise ValueError(f"{ckpt}: holds LoRA adapters but no config.toml with lora.rank and "
                     "lora.alpha to merge them with")


def dcp_to_hf(ckpt: Path, hf_config: Path, out: Path) -> None:
    if not hf_config.is_dir():
        raise ValueError(f"{hf_config}: --hf-config must be a folder holding config.json")
    config = ModelConfig.from_file(checked_model_dir(hf_config))
    check_output_folder(out, "--out")
    state = read_dcp_model(ckpt, config)
    try:
        save_hf_checkpoint(state, config, out)
        copied = copy_tokenizer_files(hf_config, out)
    except (OSError, SafetensorError) as e:
        raise output_error("--out", out, e) from None
    print(f"wrote {len(state)} tensors and config.json to {out}"
          + (f" (+ {', '.join(copied)})" if copied else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-dcp", help="HF safetensors folder (or hub id) -> DCP folder")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True, type=Path)
    p = sub.add_parser("dcp-to-hf", help="DCP folder -> HF safetensors folder")
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--hf-config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "hf-to-dcp":
        hf_to_dcp(args.hf, args.out)
    else:
        dcp_to_hf(args.ckpt, args.hf_config, args.out)


if __name__ == "__main__":
    # DCP says it assumes a single process when no group exists: that is the intent here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

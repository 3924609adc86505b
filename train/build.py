"""Building what a run needs from its config: the initial model and the tokenized data.

Kept apart from the loop so `train()` reads as a sequence of steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefixdpo.data.config import DataConfig
from prefixdpo.data.dataset import PreferenceData, load_preference_data
from prefixdpo.data.example import Example
from prefixdpo.data.loader import FitReport, PreferenceLoader, fit_examples
from prefixdpo.data.tokenizer import Tokenizer, load_tokenizer
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.hf_checkpoint import load_weights, local_rows, resolve_model_dir
from prefixdpo.model.transformer import Transformer
from prefixdpo.train.config import ModelSection


@dataclass(frozen=True)
class ModelSource:
    """Where the initial weights come from: a checkpoint folder, or a config and a seed."""

    config: ModelConfig
    checkpoint_dir: Path | None
    config_path: Path | None
    seed: int

    @classmethod
    def from_section(cls, section: ModelSection) -> ModelSource:
        if section.path:
            folder = resolve_model_dir(section.path)
            return cls(ModelConfig.from_file(folder), folder, None, section.init_seed)
        path = Path(section.config)
        return cls(ModelConfig.from_file(path), None, path, section.init_seed)

    def build(self, device: torch.device, dtype: torch.dtype = torch.float32,
              shard: Callable[[Transformer], Transformer] | None = None) -> Transformer:
        """The initial model on `device` in `dtype`. It is built on the meta device, where
        `shard` (e.g. `train.parallelize.parallelize`) wraps it before any memory is
        allocated; then each rank allocates only its own shards and fills them, from the
        checkpoint by reading only its rows of each tensor, or from the seed by drawing each
        full parameter in turn and keeping its rows. The weights are those of `load_model` or
        `build_model(config, seed=seed)`, whatever the number of ranks."""
        with torch.device("meta"):
            model = Transformer(self.config).to(dtype)
        if shard is not None:
            model = shard(model)
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives the embedding and the head a tensor each
        if self.checkpoint_dir is not None:
            return load_weights(model, self.checkpoint_dir)
        init_local_weights(model, torch.Generator(device=device).manual_seed(self.seed))
        return model


@torch.no_grad()
def init_local_weights(model: Transformer, generator: torch.Generator) -> None:
    """`Transformer.init_weights` for parameters that may be sharded over ranks: the same full
    values, drawn in the same order on the generator's device, of which each rank keeps its
    own rows (memory: the shards plus one full parameter)."""
    for param, value in model.initial_weights(generator):
        local, start, stop = local_rows(param)
        local.copy_(value[start:stop])


def tokenizer_for(data: DataConfig, source: ModelSource) -> Tokenizer:
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if source.checkpoint_dir is None:
        raise ValueError("data.tokenizer is required with a randomly initialized model "
                         "(model.config); point it at a folder with tokenizer.json")
    return load_tokenizer(source.checkpoint_dir)


@dataclass
class RunData:
    train: list[Example]
    eval: list[Example]
    fit: FitReport
    loaded: PreferenceData
    num_eval_truncated: int

    def summary(self) -> str:
        # The first line: counts (skipped rows are listed by the loader's own warning).
        lines = [self.loaded.summary().splitlines()[0],
                 f"{len(self.train)} training examples, {len(self.eval)} evaluation examples"]
        if self.fit.packing_length:
            lines.append(f"packing_length {self.fit.packing_length}: packing efficiency "
                         f"{self.fit.efficiency:.1%}, {self.fit.num_truncated} examples cut to "
                         f"fit a row (+{self.num_eval_truncated} evaluation)")
        return "\n".join(lines)


def load_run_data(config: DataConfig, tokenizer: Tokenizer, seed: int,
                  progress: bool, max_positions: int = 0) -> RunData:
    """Training and evaluation examples, fitted to the layout's rows. Evaluation data is a
    separate file (`eval_path`) or `eval_fraction` of the examples held out by `seed`.
    `max_positions`: the model's max_position_embeddings, which bounds packing_length "auto"."""
    loaded = load_preference_data(config, tokenizer, progress=progress)
    examples = loaded.examples
    eval_locations = loaded.locations
    if config.eval_path:
        eval_loaded = load_preference_data(config, tokenizer, path=config.eval_path,
                                           progress=progress)
        eval_examples, eval_locations = eval_loaded.examples, eval_loaded.locations
    elif config.eval_fraction:
        order = np.random.default_rng([seed, 7]).permutation(len(examples))
        num_eval = max(1, round(config.eval_fraction * len(examples)))
        held_out = set(order[:num_eval].tolist())
        eval_examples = [e for i, e in enumerate(examples) if i in held_out]
        examples = [e for i, e in enumerate(examples) if i not in held_out]
    else:
        eval_examples = []
    train, fit = fit_examples(examples, config.layout, config.packing_length, config.overlong,
                              max_positions, loaded.locations)
    num_eval_truncated = 0
    if eval_examples:
        eval_examples, eval_fit = fit_examples(eval_examples, config.layout,
                                               fit.packing_length or "auto", config.overlong,
                                               max_positions if not fit.packing_length else 0,
                                               eval_locations)
        num_eval_truncated = eval_fit.num_truncated
    return RunData(train, eval_examples, fit, loaded, num_eval_truncated)


def check_sizes(loader: PreferenceLoader, config: ModelConfig, device: torch.device) -> None:
    """What the data and the device bound, checked before anything is allocated (an absurd
    train.micro_batch_size would otherwise grow the process until the kernel kills it): a
    micro-batch of more rows than the data makes, a step of more micro-batches than the data
    makes, a micro-batch whose hidden states alone exceed the device's memory. ValueError, one
    line naming the keys."""
    rows, size = loader.num_rows, loader.micro_batch_size
    if size > rows:
        raise ValueError(f"train.micro_batch_size = {size} is more rows than the training data "
                         f"makes ({rows} rows in layout {loader.layout!r}); set it to {rows} "
                         "or less")
    micro_batches, per_step = len(loader.micro_batch_plan(0)), loader.grad_accum * \
        loader.world_size
    if per_step > micro_batches:
        raise ValueError(f"train.grad_accum x ranks = {per_step} micro-batches per step, more "
                         f"than the training data makes ({micro_batches} micro-batches of "
                         f"{size} rows): the rest of every step would be padding; lower "
                         "train.grad_accum")
    tokens = size * loader.row_length
    need = tokens * config.hidden_size * (2 if device.type == "cuda" else 4)
    capacity = device_memory(device)
    if need > capacity:
        raise ValueError(
            f"a micro-batch of {size} rows x {loader.row_length} tokens needs {need / 2**30:.1f} "
            f"GiB for one layer's hidden states alone, more than the {capacity / 2**30:.1f} GiB "
            f"of the {device.type} device; lower train.micro_batch_size or "
            "data.packing_length")


def device_memory(device: torch.device) -> int:
    """Bytes of memory of `device`: the GPU's, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

"""The training loop. `train(config)` reads in setup order; one optimizer step is
`train.step.train_step`, set up by `train.setup.build_training`.

Setup: process group -> the checkpoint to resume from, checked against this run -> data and
loader (sizes checked) -> initial model -> parallelize -> reference -> optimizer -> resume ->
loop -> final checkpoint and Hugging Face export.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from prefixdpo.data.loader import PreferenceLoader
from prefixdpo.model.hf_checkpoint import save_hf_checkpoint
from prefixdpo.model.executor import choose_executor
from prefixdpo.data.dataset import chat_template_override
from prefixdpo.train.build import ModelSource, check_sizes, load_run_data, tokenizer_for
from prefixdpo.train.checkpoint import (IncompleteCheckpoint, check_resume, list_checkpoints,
                                        load_checkpoint, read_run_files, save_checkpoint)
from prefixdpo.train.config import Config, ReferenceSection, to_toml
from prefixdpo.train.distributed import (LAUNCHER_ENV, Distributed, broadcast_text, setup,
                                         teardown)
from prefixdpo.train.forward import Reference
from prefixdpo.train.losses import LossState
from prefixdpo.train.metrics import MetricsLogger, peak_flops, peak_memory_gib
from prefixdpo.train.optim import lr_at, set_lr
from prefixdpo.train.reference import default_cache_dir, model_fingerprint
from prefixdpo.train.lora import export_adapters, merged_state_dict
from prefixdpo.train.reporting import Reporter, check_available
from prefixdpo.train.run_dir import RunLock, check_writable, write_error
from prefixdpo.train.setup import build_training
# The step's computation, here too for the callers that take it from the loop.
from prefixdpo.train.step import PAIR_METRICS, StepResult, evaluate, train_step  # noqa: F401

@dataclass
class TrainState:
    step: int = 0                  # optimizer steps done
    pairs_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0         # steps skipped for a non-finite loss (nonfinite = "skip")
    loss_state: LossState = field(default_factory=LossState)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pairs_seen": self.pairs_seen,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "loss_state": self.loss_state.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        return cls(state["step"], state["pairs_seen"], state["tokens_seen"],
                   state["skipped_steps"], LossState.from_state_dict(state["loss_state"]))


class StopSignal:
    """SIGTERM / SIGINT ask for a clean stop: the loop saves a checkpoint at the end of the
    current step and exits. A second SIGINT interrupts at once. Under torchrun, a worker whose
    launcher is gone (its parent process changed: the agent died and the worker was
    re-parented) stops the same way; call the object to ask whether to stop."""

    def __init__(self):
        self.requested = False
        self.orphaned = False
        # torchrun sets TORCHELASTIC_RUN_ID in its workers' environment, prefixdpo-train
        # LAUNCHER_ENV. Not LOCAL_RANK alone: other launchers set it too, and their parent may
        # end on purpose (a script that starts the run in the background and exits).
        launched = "TORCHELASTIC_RUN_ID" in os.environ or LAUNCHER_ENV in os.environ
        self._parent = os.getppid() if launched else None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def __call__(self) -> bool:
        if not self.requested and self._parent is not None and os.getppid() != self._parent:
            self.requested = self.orphaned = True
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: Config) -> Path:
    """Run the configured training; returns the output folder. On an error the process group
    is left as it is: other ranks may be waiting in a collective, so the caller reports the
    error and exits, and the launcher stops the others."""
    env = setup(config.train.device)
    lock = None
    if env.is_main:
        # Before any work: a folder that cannot be written, or that another run writes to,
        # ends the run here rather than at the first file written.
        check_writable(Path(config.train.output_dir))
        lock = RunLock(Path(config.train.output_dir)).acquire()
    try:
        output_dir = _train(config, env)
    finally:
        if lock is not None:
            lock.release()
    teardown()
    return output_dir


def _train(config: Config, env: Distributed) -> Path:
    cfg_train, device = config.train, env.device
    cuda = device.type == "cuda"
    executor = choose_executor(cfg_train.attention, device, flex_backend=cfg_train.flex_backend)
    output_dir = Path(cfg_train.output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    config_toml = to_toml(config)
    log = print if env.is_main else _quiet
    if not env.is_main:  # every rank reads the data; one reports its skipped rows
        logging.getLogger("prefixdpo.data").setLevel(logging.ERROR)
    log(f"config (resolved):\n{config_toml}")
    log(f"{env.world_size} rank(s) on {device.type}")
    check_available(cfg_train.report_to)  # a missing tracker package, before any work

    # The checkpoint to resume from, if any: what defines the run (model, loss, reference) is
    # compared with its run's before any work, and so is the data once read.
    source = ModelSource.from_section(config.model)
    model_id = _model_id(config, source, env)
    resume = _newest_readable(list_checkpoints(output_dir), log) \
        if config.checkpoint.resume else None
    if resume is not None:
        checkpoints, (saved, saved_config) = resume
        check_resume(checkpoints[-1], saved, saved_config, config_toml, model_id,
                     config.checkpoint.resume == "force", log)

    # Data.
    tokenizer = tokenizer_for(config.data, source)
    data = load_run_data(config.data, tokenizer, cfg_train.seed, progress=env.is_main,
                         max_positions=source.config.max_position_embeddings)
    log(data.summary())
    loader = PreferenceLoader(data.train, config.data.layout, cfg_train.micro_batch_size,
                              cfg_train.grad_accum, env.world_size, env.rank, cfg_train.seed,
                              data.fit.packing_length, executor.row_multiple,
                              pin_memory=cuda)
    eval_loader = PreferenceLoader(data.eval, config.data.layout, cfg_train.micro_batch_size,
                                   world_size=env.world_size, rank=env.rank, shuffle=False,
                                   packing_length=data.fit.packing_length,
                                   pad_multiple=executor.row_multiple) if data.eval else None
    check_sizes(loader, source.config, device)
    if resume is not None:
        loader.load_state_dict(saved["loader"])  # refuses other data, before any work

    # The policy, its reference (a resumed run takes its own folder's table) and its optimizer.
    training = build_training(
        source, env, executor, train=cfg_train, optim=config.optim, loss=config.loss,
        reference=config.reference, lora=config.lora, examples=data.train,
        eval_examples=data.eval, packing_length=data.fit.packing_length, log=log,
        model_id=model_id, resuming=resume is not None)
    model, reference, optimizer = training.model, training.reference, training.optimizer
    state = TrainState()
    # TR-DPO's reference changes during training: it is saved and restored with the policy.
    synced = reference.model if config.reference.sync_ref_model else None
    if resume is not None:
        def check(path: Path, files: tuple[dict, dict]) -> None:
            check_resume(path, *files, config_toml, model_id,
                         config.checkpoint.resume == "force", log)
        saved, resumed_from = _load_latest(checkpoints, model, optimizer, env.rank, log, synced,
                                           check)
        state = TrainState.from_state_dict(saved["train"])
        loader.load_state_dict(saved["loader"])
        log(f"resumed from {resumed_from} (step {state.step})")

    def checkpoint() -> Path:
        return save_checkpoint(
            output_dir, state.step, model, optimizer,
            {"train": state.state_dict(), "loader": loader.state_dict(),
             "run": {"model": model_id}}, config_toml,
            config.checkpoint.keep_last, env, reference=synced)

    def run_eval() -> None:
        if eval_loader is not None:
            logger.log(state.step, evaluate(model, eval_loader,
                                            reference=training.eval_reference,
                                            loss_config=config.loss,
                                            loss_state=state.loss_state, env=env,
                                            executor=executor), prefix="eval ")

    logger = MetricsLogger(output_dir, cfg_train.steps, state.step, env.is_main, Reporter(
        cfg_train.report_to, output_dir, state.step, env.is_main, config, config_toml))
    log = logger.print  # above the progress bar from now on
    stop = StopSignal()
    peak = peak_flops(device)
    window = _Window()
    last_saved = state.step if resume is not None else -1
    batches_iter = iter(loader)
    if cfg_train.eval_on_start and state.step == 0:
        run_eval()
    try:
        while state.step < cfg_train.steps:
            start = time.perf_counter()
            batches = next(batches_iter)
            set_lr(optimizer, lr_at(state.step, cfg_train.steps, config.optim))
            try:
                result, loss_state = training.step(batches, state.loss_state, stop)
            except torch.OutOfMemoryError:
                raise ValueError(
                    "out of memory in the training step: lower train.micro_batch_size or "
                    "data.packing_length, set train.activation_checkpointing = true, or use "
                    "more ranks") from None
            if not result.finite:
                if cfg_train.nonfinite == "stop":
                    previous = list_checkpoints(output_dir)
                    raise ValueError(
                        f"non-finite loss or gradient at step {state.step + 1} (loss "
                        f"{result.loss}, grad_norm {result.metrics['grad_norm']}); the update "
                        "was not applied. Last checkpoint: "
                        f"{previous[-1] if previous else 'none'}. Lower optim.lr, check the "
                        "data, or set train.nonfinite = 'skip'")
                state.skipped_steps += 1
                log(f"step {state.step + 1}: non-finite loss, update skipped "
                    f"({state.skipped_steps} so far)")
            state.loss_state = loss_state
            state.step += 1
            sync_reference(reference, model, state.step, config.reference)
            state.pairs_seen += result.num_pairs
            state.tokens_seen += result.num_tokens
            window.add(time.perf_counter() - start, result, training.step_flops(batches))
            logger.advance()
            if (state.step % cfg_train.log_every == 0 or state.step == cfg_train.steps
                    or state.step == 1):
                logger.log(state.step, {
                    **window.means(), "grad_norm": result.metrics["grad_norm"],
                    "lr": optimizer.param_groups[0]["lr"], **window.rates(peak),
                    "peak_memory_gib": peak_memory_gib(device), "epoch": loader.epoch})
                window = _Window()
            if cfg_train.eval_every and state.step % cfg_train.eval_every == 0:
                run_eval()
            if result.stop_requested:
                why = "the launcher is gone" if stop.orphaned else "stop requested"
                log(f"{why}: saving a checkpoint at step {state.step}")
                checkpoint()
                return output_dir
            if config.checkpoint.every and state.step % config.checkpoint.every == 0:
                checkpoint()
                last_saved = state.step
        if not cfg_train.eval_every or state.step % cfg_train.eval_every:
            run_eval()
        if last_saved != state.step:
            checkpoint()
        if config.checkpoint.export_hf and config.lora.rank:
            adapter_dir = export_adapters(
                model, config.lora, output_dir / "adapter", is_main=env.is_main,
                base_model=config.model.path, tokenizer_dir=tokenizer.folder,
                chat_template=chat_template_override(config.data))
            log(f"exported a PEFT LoRA adapter to {adapter_dir}")
        if config.checkpoint.export_hf and (not config.lora.rank or config.lora.export_merged):
            merge = (lambda state: merged_state_dict(state, config.lora.alpha / config.lora.rank)
                     ) if config.lora.rank else None
            export_dir = export(model, source, tokenizer.folder,
                                chat_template_override(config.data), output_dir / "hf", env,
                                state_transform=merge)
            log(f"exported a Hugging Face checkpoint to {export_dir}")
    finally:
        batches_iter.close()  # stops the loader's background thread
        stop.restore()
        logger.close()
    return output_dir


def sync_reference(reference: Reference, model: torch.nn.Module, step: int,
                   section: ReferenceSection) -> bool:
    """TR-DPO (`reference.sync_ref_model`), as TRL's `SyncRefModelCallback` does at the end
    of a step: after every `ref_model_sync_steps`-th optimizer step (`step` = steps done), the
    live reference becomes alpha * policy + (1 - alpha) * reference. Whether it synced."""
    if not section.sync_ref_model or step % section.ref_model_sync_steps:
        return False
    reference.sync(model, section.ref_model_mixup_alpha)
    return True


def _newest_readable(checkpoints: list[Path], log) -> tuple[list[Path], tuple[dict, dict]] | None:
    """The checkpoints up to the newest whose train state and config can be read, and that
    one's (state, config); newer damaged ones are passed over with a line each. None when there
    is no checkpoint."""
    for i, path in enumerate(reversed(checkpoints)):
        try:
            return checkpoints[:len(checkpoints) - i], read_run_files(path)
        except IncompleteCheckpoint as e:
            _pass_over(e, checkpoints[:len(checkpoints) - i], log)
    return None


def _load_latest(checkpoints: list[Path], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, rank: int, log,
                 reference: torch.nn.Module | None = None,
                 check: Callable[[Path, tuple[dict, dict]], None] | None = None
                 ) -> tuple[dict, Path]:
    """Restore the newest complete checkpoint (and `reference`, TR-DPO's synced one): one whose
    files are partly gone or damaged is passed over, with a line saying which and why, and each
    older one tried is first checked to be of this run (`check`). Every rank sees the same
    failures (DCP gathers them), so all ranks pick the same checkpoint."""
    for i, path in enumerate(reversed(checkpoints)):
        try:
            if i and check is not None:
                check(path, read_run_files(path))
            return load_checkpoint(path, model, optimizer, rank, reference), path
        except IncompleteCheckpoint as e:
            _pass_over(e, checkpoints[:len(checkpoints) - i], log)
    raise AssertionError("unreachable")


def _pass_over(error: IncompleteCheckpoint, checkpoints: list[Path], log) -> None:
    """A note that the last of `checkpoints` is passed over for the one before it; ValueError
    when there is none."""
    if len(checkpoints) < 2:
        raise ValueError(f"{error}, and there is no older checkpoint to resume from; set "
                         "checkpoint.resume = false or use another train.output_dir") from None
    log(f"warning: {error}; resuming from the previous checkpoint {checkpoints[-2]} instead")


def _model_id(config: Config, source: ModelSource, env: Distributed) -> str | None:
    """The fingerprint of the initial weights (`model_fingerprint`) where the objective depends
    on them after a resume (the reference is computed from them), else None. Rank 0 reads the
    checkpoint files once and tells the others."""
    if config.reference.mode not in ("precomputed", "live"):
        return None
    return broadcast_text(
        model_fingerprint(source.checkpoint_dir, source.config_path, source.seed, env.device,
                          _cache_dir(config)) if env.is_main else "", env.device)


def _cache_dir(config: Config) -> Path:
    return Path(config.reference.cache_dir) if config.reference.cache_dir \
        else default_cache_dir()


def export(model: torch.nn.Module, source: ModelSource, tokenizer_folder: Path | None,
           chat_template: str | None, out: Path, env: Distributed,
           state_transform: Callable[[dict], dict] | None = None) -> Path:
    """Gather the full weights on rank 0 and write a Hugging Face checkpoint, in the dtype of
    the source checkpoint's config (float32 for a random initialization), with the tokenizer
    the run used and the chat template it rendered with (chat_template.jinja, which
    transformers prefers to the one in tokenizer_config.json). `state_transform` maps the
    gathered state dict first (LoRA: fold the adapters into the weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    if env.is_main:
        if state_transform is not None:
            state = state_transform(state)
        dtype_name = source.config.hf_config.get("torch_dtype") or \
            source.config.hf_config.get("dtype") or "float32"
        dtype = getattr(torch, dtype_name, torch.float32)
        state = {k: v.to(dtype) for k, v in state.items()}
        # Written under a temporary name and renamed when complete, as checkpoints are: a
        # folder named `out` is always a whole export.
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf_checkpoint(state, source.config, tmp, tokenizer_dir=tokenizer_folder)
            if chat_template is not None:
                (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(out, e, "The last training checkpoint is complete: free disk "
                              "space and run the same command again to export") from None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


class _Window:
    """The steps since the last log line: loss and reward metrics averaged over their pairs,
    and throughput."""

    def __init__(self):
        self.seconds = 0.0
        self.pairs = self.tokens = 0
        self.flops = 0.0
        self.sums: dict[str, float] = {}
        self.averaged_pairs = 0  # pairs of steps with a finite loss

    def add(self, seconds: float, result: StepResult, flops: float) -> None:
        """`flops`: this rank's useful FLOPs (MFU is per accelerator)."""
        self.seconds += seconds
        self.pairs += result.num_pairs
        self.tokens += result.num_tokens
        self.flops += flops
        if result.finite:
            self.averaged_pairs += result.num_pairs
            for name, value in (("loss", result.loss),
                                *((n, result.metrics[n]) for n in PAIR_METRICS)):
                self.sums[name] = self.sums.get(name, 0.0) + value * result.num_pairs

    def means(self) -> dict[str, float]:
        return {name: total / max(self.averaged_pairs, 1) for name, total in self.sums.items()}

    def rates(self, peak: float | None) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        rates = {"pairs_per_s": self.pairs / seconds, "tokens_per_s": self.tokens / seconds}
        if peak:
            rates["mfu"] = self.flops / seconds / peak
        return rates


def _quiet(*args, **kwargs) -> None:
    """Ranks other than 0 print nothing."""

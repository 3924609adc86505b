"""Experiment trackers beside `metrics.jsonl`: TensorBoard and Weights & Biases (`train.report_to`).

Rank 0 sends every logged line to each tracker under the tags TRL's runs get there (the
Hugging Face Trainer's: training values under `train/`, evaluation under `eval/`), so a
prefixdpo run and a TRL run overlay in one dashboard:

    ours (metrics.jsonl)        tracker tag
    loss, rewards/chosen, ...   train/loss, train/rewards/chosen, ... (same name after train/)
    lr                          train/learning_rate
    eval/loss, eval/rewards/*   eval/loss, eval/rewards/* (unchanged)

The x axis is the optimizer step (0 for an evaluation before training). A resumed run continues
the same curves: only steps after the checkpoint's are written (and lines of its own step the
interrupted process had not logged), TensorBoard drops the events the interrupted process wrote past
the checkpoint (`purge_step`), and W&B resumes the same run, whose id is kept in
`output_dir/wandb_run_id`.

The trackers are optional extras (`pip install -e ".[tensorboard]"`, `".[wandb]"`); a missing
one is refused when the run starts, naming the extra (`check_available`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The import each tracker needs, and the extra that installs it.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
# Our metrics.jsonl names whose TRL name differs.
_TRL_NAMES = {"lr": "learning_rate"}
WANDB_ID_FILE = "wandb_run_id"


def tracker_tag(name: str) -> str:
    """The tag a metric of metrics.jsonl gets in the trackers (see the module docstring)."""
    if name.startswith("eval/"):
        return name
    return "train/" + _TRL_NAMES.get(name, name)


def check_available(report_to: Sequence[str]) -> None:
    """A ValueError naming the extra to install when a requested tracker's package is
    missing. Checked on every rank, so that all of them stop with the same message."""
    for name in report_to:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"train.report_to includes {name!r} but the {module} package is "
                             f"not installed: pip install 'prefixdpo[{extra}]' (or remove "
                             f"{name!r} from train.report_to)")


class Reporter:
    """Sends logged metrics to the trackers in `report_to`. Built on every rank; only the
    enabled one (rank 0) opens anything. `start_step`: the step of the checkpoint a run
    resumes from (0 for a fresh run); steps before it are never written again."""

    def __init__(self, report_to: Sequence[str], output_dir: Path, start_step: int,
                 enabled: bool, config: Any = None, config_toml: str = ""):
        self.start_step = start_step
        self.writer = None  # TensorBoard
        self.wandb_run = None
        if not enabled:
            return
        check_available(report_to)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of this step and later, written by an interrupted process
            # after its last checkpoint, are dropped when the files are read.
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            if not start_step and config_toml:
                self.writer.add_text("config", "```\n" + config_toml + "\n```", 0)
        if "wandb" in report_to:
            self.wandb_run = _init_wandb(output_dir, start_step, config)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        # Steps before the checkpoint are on the curves already. Lines of the checkpoint's own
        # step come only when the interrupted process had not logged them (`MetricsLogger`
        # drops the others): an evaluation it did not reach, say.
        if step < self.start_step:
            return
        values = {tracker_tag(name): float(value) for name, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if math.isfinite(v)}
                               | {"train/global_step": step}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _init_wandb(output_dir: Path, start_step: int, config: Any):
    """A W&B run whose files live under `output_dir/wandb`. The project is `WANDB_PROJECT`
    (default "prefixdpo"), the name the run folder's; offline with `WANDB_MODE=offline`. A
    resumed run (`start_step` > 0) continues the run whose id the first one stored."""
    import wandb

    id_file = output_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if start_step and id_file.is_file() else None
    if run_id is None:
        run_id = secrets.token_hex(4)  # W&B's ids: lowercase letters and digits
        id_file.write_text(run_id + "\n")
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prefixdpo"),
                         name=output_dir.resolve().name, id=run_id, resume="allow",
                         dir=str(output_dir), config=_config_dict(config))
    except Exception as e:  # noqa: BLE001 - not logged in, no network, ...: one clear line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"wandb could not start a run ({type(e).__name__}: {first}); run "
                         "`wandb login`, or set WANDB_MODE=offline to write the run under "
                         f"{output_dir / 'wandb'} and `wandb sync` it later") from None
    # The optimizer step is every curve's x axis (as the Trainer's train/global_step).
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    return run


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)

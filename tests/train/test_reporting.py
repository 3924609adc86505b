"""Experiment trackers (`train.report_to`): the values written are read back from TensorBoard's
event files and from an offline W&B run, under TRL's tags, and a resumed run continues the
same curves without writing a step twice."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from test_runs import REPO, losses, run, run_config  # noqa: F401 - run_config is a fixture

from prefixdpo.train.config import load_config
from prefixdpo.train.reporting import Reporter, check_available, tracker_tag


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `folder`, as TensorBoard shows them (events
    purged by a restarted writer are gone). Every (tag, step) must be there once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        scalars[tag] = {e.step: e.value for e in events}
    return scalars


def wandb_history(run_file: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline W&B run file. The file is a LevelDB-style log of
    protobuf records: a 7-byte header, then 32 KiB blocks of (crc32 uint32, length uint16,
    kind uint8: 1 whole, 2 first, 3 middle, 4 last) chunks."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = run_file.read_bytes(), 32768
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer or zero padding
            pos += left
            continue
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunk)
            chunk = b""
    run_id, rows = "", []
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows


def test_tags_are_trl_dashboard_names():
    assert tracker_tag("loss") == "train/loss"
    assert tracker_tag("rewards/accuracies") == "train/rewards/accuracies"
    assert tracker_tag("logps/rejected") == "train/logps/rejected"
    assert tracker_tag("lr") == "train/learning_rate"
    assert tracker_tag("eval/rewards/margins") == "eval/rewards/margins"
    assert tracker_tag("eval/loss") == "eval/loss"


def test_tensorboard_resume_continues_the_curves(tmp_path):
    """A first process logs steps 1-3 (and an eval at 3) but its last checkpoint is step 2;
    the resumed one logs 3 and 4 again. Step 3 is the resumed value, once; the first
    process's eval at 3 is purged with it."""
    pytest.importorskip("tensorboard")
    first = Reporter(["tensorboard"], tmp_path, 0, True, config_toml="[train]\nsteps = 4")
    first.log(0, {"eval/loss": 8.0})  # an evaluation before training
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 * step, "lr": 0.1, "rewards/accuracies": 0.5})
    first.log(3, {"eval/loss": 9.0})
    first.close()
    resumed = Reporter(["tensorboard"], tmp_path, 2, True)
    resumed.log(1, {"loss": 99.0})  # before the checkpoint: never written again
    resumed.log(2, {"eval/loss": 7.0})  # the checkpoint's step, not logged before
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step, "lr": 0.2, "rewards/accuracies": 0.75})
    resumed.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert scalars["train/learning_rate"] == pytest.approx({1: 0.1, 2: 0.1, 3: 0.2, 4: 0.2})
    assert scalars["train/rewards/accuracies"] == {1: 0.5, 2: 0.5, 3: 0.75, 4: 0.75}
    assert scalars["eval/loss"] == {0: 8.0, 2: 7.0}  # the first process's eval at 3 is purged


def test_disabled_reporter_writes_nothing(tmp_path):
    reporter = Reporter(["tensorboard", "wandb"], tmp_path, 0, enabled=False)
    reporter.log(1, {"loss": 0.5})
    reporter.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = Reporter(["wandb"], tmp_path, 0, True)
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 * step, "lr": 0.1})
    first.log(3, {"eval/loss": 9.0})
    first.close()
    resumed = Reporter(["wandb"], tmp_path, 2, True)
    resumed.log(1, {"loss": 99.0})
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step, "lr": 0.2})
    resumed.close()
    run_files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    (id_a, rows_a), (id_b, rows_b) = (wandb_history(f) for f in run_files)
    # One W&B run (the id stored in the run folder), continued after the checkpoint.
    assert id_a == id_b == (tmp_path / "wandb_run_id").read_text().strip()
    assert [(r["_step"], r["train/loss"]) for r in rows_a] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert rows_a[-1]["eval/loss"] == 9.0 and rows_a[0]["train/learning_rate"] == 0.1
    assert [(r["_step"], r["train/loss"]) for r in rows_b] == [(3, 30.0), (4, 40.0)]
    assert [r["train/global_step"] for r in rows_b] == [3, 4]


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'prefixdpo\[wandb\]'"):
        check_available(["wandb"])
    check_available([])


def test_report_to_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nconfig = "m.json"\n[data]\npath = "d.jsonl"\n')
    assert load_config(path).train.report_to == ()
    config = load_config(path, ["--train.report_to=tensorboard,wandb"])
    assert config.train.report_to == ("tensorboard", "wandb")
    with pytest.raises(ValueError, match=r"train.report_to = 'mlflow'; expected one of"):
        load_config(path, ["--train.report_to=mlflow"])


@pytest.mark.distributed
def test_run_writes_tensorboard_and_resume_does_not_repeat_steps(run_config, tmp_path):
    """A whole run through train.py: the event files hold metrics.jsonl's values. Then the
    last checkpoint is removed and the run resumed from the one before: each step is in the
    event files once, with the losses of metrics.jsonl."""
    pytest.importorskip("tensorboard")
    out_dir = tmp_path / "run"
    run(run_config, "--train.steps=4", "--checkpoint.every=2", "--checkpoint.export_hf=false",
        "--train.report_to=tensorboard")
    first = losses(out_dir)
    scalars = tensorboard_scalars(out_dir / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(first)
    assert set(scalars["train/learning_rate"]) == {1, 2, 3, 4}
    shutil.rmtree(out_dir / "step_00000004")
    out = run(run_config, "--train.steps=4", "--checkpoint.every=2",
              "--checkpoint.export_hf=false", "--train.report_to=tensorboard")
    assert "(step 2)" in out
    scalars = tensorboard_scalars(out_dir / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses(out_dir))
    assert scalars["train/loss"] == pytest.approx(first, abs=1e-6)  # resume is exact
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]


def test_readme_names_the_option():
    readme = (REPO / "README.md").read_text()
    assert "report_to" in readme and "plot_metrics.py" in readme

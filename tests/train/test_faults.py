"""Runtime and storage faults end in one clear line, and never leave a file that looks whole
but is not: an output folder that cannot be written, a full disk during the export, the
reference table or metrics.jsonl, two runs on one folder, a checkpoint whose data files were
partly deleted, a resume that would log a step twice, rows longer than the model's positions,
NaN in the initial weights, a worker whose launcher died, and checkpoint metadata that names
more than DCP's own types."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DENSE, random_examples, tiny_config
from safetensors import SafetensorError

import prefixdpo.train.checkpoint as checkpoint_module
import prefixdpo.train.loop as loop
import prefixdpo.train.metrics as metrics_module
import prefixdpo.train.reference as reference_module
import prefixdpo.train.run_dir as run_dir
from prefixdpo.data.example import Example, Group
from prefixdpo.data.loader import example_length, fit_examples
from prefixdpo.model.hf_checkpoint import load_model, save_hf_checkpoint
from prefixdpo.model.transformer import build_model
from prefixdpo.train.checkpoint import list_checkpoints, save_checkpoint
from prefixdpo.train.config import OptimSection, load_config
from prefixdpo.train.distributed import Distributed
from prefixdpo.train.metrics import MetricsLogger
from prefixdpo.train.optim import build_optimizer
from prefixdpo.train.reference import write_table
from prefixdpo.train.run_dir import RunLock, check_writable

CPU = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- 1. an output folder that cannot be written ---------------------------------------------

def make_read_only(folder: Path, monkeypatch) -> None:
    """chmod the folder read-only; as root, which ignores permissions, make the probe's write
    fail the way a read-only file system does instead."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(run_dir, "open", read_only, raising=False)


def test_unwritable_output_dir_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    make_read_only(folder, monkeypatch)
    try:
        with pytest.raises(ValueError) as error:
            check_writable(folder)
    finally:
        folder.chmod(0o700)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "train.output_dir" in message
    assert "read-only" in message or "permission denied" in message
    assert list(folder.iterdir()) == []  # no probe left behind


def test_writable_output_dir_is_created_and_left_clean(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


def tiny_run_config(tmp_path: Path, *overrides: str):
    (tmp_path / "model.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 211, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}))
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nconfig = "{tmp_path / "model.json"}"\n'
                    f'[data]\npath = "{tmp_path / "data.jsonl"}"\n'
                    f'[train]\noutput_dir = "{tmp_path / "run"}"\ndevice = "cpu"\n')
    return load_config(path, list(overrides))


def test_train_checks_the_folder_before_any_work(tmp_path, monkeypatch):
    """train() stops at the check: the data, the model and the reference are never reached."""
    config = tiny_run_config(tmp_path)
    reached = []
    monkeypatch.setattr(loop, "setup", lambda device: CPU)
    monkeypatch.setattr(loop, "_train", lambda config, env: reached.append(1))
    make_read_only(tmp_path / "run", monkeypatch)
    try:
        with pytest.raises(ValueError, match="not writable"):
            loop.train(config)
    finally:
        (tmp_path / "run").chmod(0o700)
    assert reached == []


# -- 2. a full disk -------------------------------------------------------------------------

def test_export_on_a_full_disk_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = build_model(tiny_config(), seed=0)
    source = SimpleNamespace(config=model.config)
    out = tmp_path / "hf"
    loop.export(model, source, None, "{{ x }}", out, CPU)  # a first, complete export
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def partial_then_full(state, config, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(loop, "save_hf_checkpoint", partial_then_full)
    with pytest.raises(ValueError) as error:
        loop.export(model, source, None, None, out, CPU)
    message = str(error.value)
    assert "\n" not in message and str(out) in message and "disk is full" in message
    # The earlier export is untouched and no temporary folder is left.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_export_replaces_the_previous_one_whole(tmp_path):
    model = build_model(tiny_config(), seed=0)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    loop.export(model, SimpleNamespace(config=model.config), None, "T", out, CPU)
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json",
                                                      "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_reference_table_on_a_full_disk(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(reference_module, "save_file", full)
    with pytest.raises(OSError) as error:
        write_table(tmp_path / "t.safetensors", "key", torch.zeros(3))
    assert error.value.errno == errno.ENOSPC and "disk is full" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither the table nor its temporary file
    logged = []
    reference_module._write_copies([tmp_path / "a.safetensors"], "key", torch.zeros(3),
                                   logged.append)
    assert len(logged) == 1 and "a.safetensors" in logged[0] and "disk is full" in logged[0]


def test_metrics_append_on_a_full_disk(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, total_steps=4, start_step=0, enabled=True)
    monkeypatch.setattr(metrics_module, "open", disk_full, raising=False)
    with pytest.raises(ValueError) as error:
        logger.log(1, {"loss": 0.5})
    logger.close()
    message = str(error.value)
    assert "\n" not in message and "metrics.jsonl" in message and "disk is full" in message


# -- 3. two runs on one folder --------------------------------------------------------------

def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_lock_refuses_a_second_run(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ValueError) as error:
        RunLock(tmp_path).acquire()
    message = str(error.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message
    assert socket.gethostname() in message and "run.lock" in message
    first.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(tmp_path).acquire().release()  # a later run (a resume) takes it


def test_a_stale_lock_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    notes = []
    lock = RunLock(tmp_path).acquire(log=notes.append)
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {pid}" in notes[0]
    lock.release()


@pytest.mark.parametrize("content", [json.dumps({"host": "elsewhere", "pid": 1}), "{"])
def test_a_lock_from_another_host_or_unreadable_is_not_taken(tmp_path, content):
    (tmp_path / "run.lock").write_text(content)
    with pytest.raises(ValueError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "run.lock").read_text() == content


def test_train_releases_the_lock_on_error(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path)
    monkeypatch.setattr(loop, "setup", lambda device: CPU)

    def failing(config, env):
        assert (Path(config.train.output_dir) / "run.lock").is_file()
        raise ValueError("injected")
    monkeypatch.setattr(loop, "_train", failing)
    with pytest.raises(ValueError, match="injected"):
        loop.train(config)
    assert not (tmp_path / "run" / "run.lock").exists()


# -- 4. a checkpoint with missing data files ------------------------------------------------

def saved_checkpoints(tmp_path: Path, steps=(1, 2), keep_last=3):
    model = build_model(tiny_config(), seed=0)
    optimizer = build_optimizer(model, OptimSection(lr=1e-2), CPU.device)
    for step in steps:
        with torch.no_grad():
            model.norm.weight.fill_(float(step))
        save_checkpoint(tmp_path, step, model, optimizer, {"train": {"step": step}}, "",
                        keep_last, CPU)
    return model, optimizer


def test_resume_falls_back_past_a_checkpoint_with_missing_files(tmp_path):
    model, optimizer = saved_checkpoints(tmp_path)
    latest = list_checkpoints(tmp_path)[-1]
    next(latest.glob("*.distcp")).unlink()  # as a kill during pruning could leave it
    notes = []
    saved, path = loop._load_latest(list_checkpoints(tmp_path), model, optimizer, 0,
                                    notes.append)
    assert path.name == "step_00000001" and saved["train"]["step"] == 1
    assert torch.all(model.norm.weight == 1.0)
    assert len(notes) == 1 and latest.name in notes[0] and "step_00000001" in notes[0]


def test_no_complete_checkpoint_is_one_line(tmp_path):
    model, optimizer = saved_checkpoints(tmp_path, steps=(1,))
    (list_checkpoints(tmp_path)[0] / ".metadata").unlink()
    with pytest.raises(ValueError) as error:
        loop._load_latest(list_checkpoints(tmp_path), model, optimizer, 0, print)
    assert "incomplete" in str(error.value) and "checkpoint.resume" in str(error.value)


def test_a_checkpoint_without_metadata_is_passed_over_quietly(tmp_path, capfd):
    """Before: DCP printed two FileNotFoundError tracebacks and the note said
    'AssertionError: metadata is None'."""
    model, optimizer = saved_checkpoints(tmp_path)
    latest = list_checkpoints(tmp_path)[-1]
    (latest / ".metadata").unlink()
    notes = []
    saved, path = loop._load_latest(list_checkpoints(tmp_path), model, optimizer, 0,
                                    notes.append)
    assert path.name == "step_00000001" and torch.all(model.norm.weight == 1.0)
    assert notes == [f"warning: {latest} is incomplete (its .metadata file is missing); "
                     f"resuming from the previous checkpoint {path} instead"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["{", "[1, 2]", b"\xff\xfe"])
def test_a_damaged_train_state_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    """Before: a hard error with no advice, the intact previous checkpoint unused."""
    model, optimizer = saved_checkpoints(tmp_path)
    latest = list_checkpoints(tmp_path)[-1]
    state_file = latest / checkpoint_module.STATE_FILE
    state_file.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    notes = []
    checkpoints, (saved, _) = loop._newest_readable(list_checkpoints(tmp_path), notes.append)
    assert [p.name for p in checkpoints] == ["step_00000001"] and saved["train"]["step"] == 1
    assert len(notes) == 1 and str(state_file) in notes[0] and "damaged" in notes[0]
    assert "step_00000001 instead" in notes[0] and "\n" not in notes[0]
    saved, path = loop._load_latest(checkpoints, model, optimizer, 0, notes.append)
    assert path.name == "step_00000001" and torch.all(model.norm.weight == 1.0)


def test_a_damaged_only_checkpoint_is_one_line_with_advice(tmp_path):
    saved_checkpoints(tmp_path, steps=(1,))
    (list_checkpoints(tmp_path)[0] / checkpoint_module.STATE_FILE).write_text("{")
    with pytest.raises(ValueError) as error:
        loop._newest_readable(list_checkpoints(tmp_path), print)
    message = str(error.value)
    assert "\n" not in message and "damaged" in message and "checkpoint.resume = false" in message


def test_a_full_disk_during_a_checkpoint_says_so(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as 'unexpected pos 704 vs 598', without an
    errno: the message says what it means (the real case: test_checkpoint_on_a_real_full_disk)."""
    model, optimizer = saved_checkpoints(tmp_path, steps=(1,))

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(checkpoint_module.dcp, "save", full)
    monkeypatch.setattr(run_dir.os, "statvfs", lambda path: SimpleNamespace(
        f_bfree=3, f_bavail=0, f_frsize=4096))
    with pytest.raises(ValueError) as error:
        save_checkpoint(tmp_path, 2, model, optimizer, {"train": {"step": 2}}, "", 3, CPU)
    message = str(error.value)
    assert "\n" not in message and "(the disk is full)" in message, message
    assert "step_00000001 is intact" in message and "Free disk space" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_checkpoint_on_a_real_full_disk(tmp_path):
    """A real full disk: a tmpfs of 400 KiB, smaller than the checkpoint (needs the right to
    mount, as root in a container has; skipped otherwise)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        model, optimizer = saved_checkpoints(tmp_path / "big", steps=(1,))
        with pytest.raises(ValueError) as error:
            save_checkpoint(folder, 2, model, optimizer, {"train": {"step": 2}}, "", 3, CPU)
        assert "(the disk is full)" in str(error.value), str(error.value)
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_pruning_removes_the_completion_marker_first(tmp_path, monkeypatch):
    """A kill in the middle of deleting an old checkpoint leaves a folder that no longer
    counts as one; the next save deletes the leftover."""
    saved_checkpoints(tmp_path, steps=(1, 2), keep_last=2)
    real_rmtree = checkpoint_module.shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name == "step_00000001":
            raise KeyboardInterrupt  # the kill, before any file of the folder is gone
        return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.prune(tmp_path, keep_last=1)
    assert (tmp_path / "step_00000001").is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    checkpoint_module.prune(tmp_path, keep_last=1)
    assert not (tmp_path / "step_00000001").exists()


# -- 5. a resume never logs a step twice ----------------------------------------------------

def test_resume_at_the_last_step_does_not_log_it_again(tmp_path):
    """The run logged step 6 and its final evaluation, saved step 6, then failed to export;
    the rerun resumes at step 6 and evaluates again: nothing is appended twice."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 6, "loss": 0.3}, {"step": 6, "eval/loss": 0.6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    logger = MetricsLogger(tmp_path, total_steps=6, start_step=6, enabled=True)
    logger.log(6, {"eval/loss": 0.61}, prefix="eval ")
    logger.log(6, {"loss": 0.31})
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_resume_logs_the_evaluation_a_kill_cut_off(tmp_path):
    """Killed after saving step 6 but before the final evaluation was logged: it is logged."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 6, "loss": 0.3}) + "\n")
    logger = MetricsLogger(tmp_path, total_steps=6, start_step=6, enabled=True)
    logger.log(6, {"eval/loss": 0.6}, prefix="eval ")
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 6, "loss": 0.3}, {"step": 6, "eval/loss": 0.6}]


# -- 6. rows no longer than the model's positions -------------------------------------------

def long_example(index: int, num_tokens: int) -> Example:
    tokens = np.arange(num_tokens, dtype=np.int32) % 200
    return Example(index, (Group(tokens[:4], (tokens[4:], tokens[4:8])),), ((0, 1),))


def test_auto_packing_length_stops_at_max_position_embeddings():
    examples = random_examples(20, 200) + [long_example(20, 5000)]
    fitted, report = fit_examples(examples, "shared+packed", "auto", "truncate",
                                  max_positions=300)
    # Sized by the examples within the model's positions; the long one is cut to the largest
    # multiple of 128 not above 300.
    assert report.packing_length == fit_examples(examples[:20], "shared+packed", "auto",
                                                 "truncate")[1].packing_length
    assert example_length(fitted[20], "shared+packed") <= 256
    assert max(example_length(e, "shared+packed") for e in fitted) <= report.packing_length
    assert report.num_truncated == 1
    # A shared row longer than the positions, whose prompt + longest completion fit them, is
    # neither cut nor refused: it sizes the rows.
    wide = Example(21, (Group(np.arange(100, dtype=np.int32),
                              (np.arange(150, dtype=np.int32), np.arange(180, dtype=np.int32))),),
                   ((0, 1),))
    fitted, report = fit_examples(examples[:20] + [wide], "shared+packed", "auto", "error",
                                  max_positions=300)
    assert report.packing_length == 512 and report.num_truncated == 0
    # Without the bound, the one long example would size every row.
    assert fit_examples(examples, "shared+packed", "auto", "truncate")[1].packing_length >= 5000


def test_an_overlong_example_with_auto_names_its_line_and_max_length():
    examples = random_examples(20, 200) + [long_example(20, 5000)]
    with pytest.raises(ValueError) as error:
        fit_examples(examples, "shared+packed", "auto", "error", max_positions=512,
                     locations={20: "data.jsonl:21"})
    message = str(error.value)
    assert "\n" not in message and "data.jsonl:21" in message
    assert "data.max_length" in message and "max_position_embeddings = 512" in message


def test_explicit_packing_length_above_max_positions_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.loader"):
        fit_examples(random_examples(10, 200), "shared+packed", 1024, "truncate",
                     max_positions=512)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "data.packing_length = 1024" in warnings[0]
    assert "max_position_embeddings = 512" in warnings[0]


# -- 6b. sizes the data and the device bound -------------------------------------------

def small_loader(micro_batch_size: int = 2, grad_accum: int = 1, packing_length: int = 128):
    from prefixdpo.data.loader import PreferenceLoader

    examples, _ = fit_examples(random_examples(12, 200), "shared+packed", packing_length,
                               "error")
    return PreferenceLoader(examples, "shared+packed", micro_batch_size, grad_accum,
                            packing_length=packing_length)


@pytest.mark.parametrize("sizes, message", [
    # Before: accepted, and the process grew until the kernel's OOM killer ended it (rc 137).
    (dict(micro_batch_size=10**11), r"^train.micro_batch_size = 100000000000 is more rows than "
                                    r"the training data makes \(\d+ rows in layout"),
    (dict(grad_accum=10**11), r"^train.grad_accum x ranks = 100000000000 micro-batches per "
                              r"step, more than the training data makes"),
    (dict(micro_batch_size=1, packing_length=128 * 10**7),
     r"^a micro-batch of 1 rows x 1280000000 tokens needs \d+\.\d GiB .* lower "
     r"train.micro_batch_size or data.packing_length$"),
])
def test_absurd_sizes_are_refused_before_any_allocation(sizes, message, monkeypatch):
    from prefixdpo.train.build import check_sizes

    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096,
                                                     "SC_PHYS_PAGES": 2**22}[name])  # 16 GiB
    loader = small_loader(**sizes)
    with pytest.raises(ValueError, match=message):
        check_sizes(loader, tiny_config(hidden_size=128), CPU.device)
    check_sizes(small_loader(), tiny_config(), CPU.device)  # the usual sizes pass


# -- 7. NaN in the initial weights ----------------------------------------------------------

def test_nan_in_loaded_weights_names_the_tensor(tmp_path):
    model = build_model(tiny_config(), seed=0)
    state = model.state_dict()
    state["layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_hf_checkpoint(state, model.config, tmp_path)
    with pytest.raises(ValueError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "model.layers.1.mlp.up_proj.weight" in message
    assert "NaN" in message


# -- 8. a worker orphaned by its launcher ---------------------------------------------------

def test_orphaned_worker_stops_like_sigterm(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    parent = os.getppid()
    stop = loop.StopSignal()
    try:
        assert not stop()
        monkeypatch.setattr(loop.os, "getppid", lambda: 1 if parent != 1 else 2)
        assert stop() and stop.orphaned
    finally:
        stop.restore()


def test_no_orphan_check_without_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # set by other launchers too
    stop = loop.StopSignal()
    try:
        monkeypatch.setattr(loop.os, "getppid", lambda: -5)
        assert not stop()
    finally:
        stop.restore()


def test_stop_request_is_read_at_the_end_of_the_step():
    """A stop asked for during a step (after its backward passes began) ends that step: the
    request is read after the last backward, not when the step starts."""
    from prefixdpo.data.loader import PreferenceLoader
    from prefixdpo.train.losses import LossConfig, LossState
    from prefixdpo.train.reference import TableReference
    from prefixdpo.train.scoring import score_sequences

    model = build_model(tiny_config(), seed=0)
    examples, report = fit_examples(random_examples(8, 200), "shared+packed", 128, "error")
    table, _ = score_sequences(model, examples, layout="shared+packed", packing_length=128,
                               micro_batch_size=4, device=CPU.device, executor=DENSE,
                               progress=False)
    loader = PreferenceLoader(examples, "shared+packed", 4, 1, packing_length=128,
                              pad_multiple=8)
    seen_gradients = []

    def asked() -> bool:
        seen_gradients.append(any(p.grad is not None for p in model.parameters()))
        return True
    result, _ = loop.train_step(
        model, next(iter(loader)), reference=TableReference(table.float()),
        loss_config=LossConfig(), loss_state=LossState(),
        optimizer=build_optimizer(model, OptimSection(lr=1e-2), CPU.device), max_grad_norm=0.0,
        env=CPU, executor=DENSE, stop_requested=asked)
    assert seen_gradients == [True] and result.stop_requested


# -- 9. checkpoint metadata is read with an allow-list --------------------------------------

class _Smuggled:
    def __reduce__(self):
        return (os.getpid, ())


def test_checkpoint_metadata_naming_other_globals_is_refused(tmp_path):
    import pickle

    model, optimizer = saved_checkpoints(tmp_path, steps=(1,))
    path = list_checkpoints(tmp_path)[0]
    checkpoint_module.check_metadata(path)  # what DCP wrote passes
    (path / ".metadata").write_bytes(pickle.dumps({"metadata": _Smuggled()}))
    with pytest.raises(ValueError) as error:
        checkpoint_module.load_checkpoint(path, model, optimizer, 0)
    assert "getpid" in str(error.value) and "resume only from checkpoints you wrote" in str(
        error.value)


def test_resume_restores_optimizer_state_through_the_safe_loaders(tmp_path):
    model = build_model(tiny_config(), seed=0)
    optimizer = build_optimizer(model, OptimSection(lr=1e-2), CPU.device)
    sum(p.square().sum() for p in model.parameters()).backward()
    optimizer.step()
    save_checkpoint(tmp_path, 1, model, optimizer, {"train": {"step": 1}}, "", 1, CPU)
    fresh = build_model(tiny_config(), seed=1)
    fresh_optimizer = build_optimizer(fresh, OptimSection(lr=5e-1), CPU.device)
    checkpoint_module.load_checkpoint(tmp_path / "step_00000001", fresh, fresh_optimizer, 0)
    assert torch.equal(fresh.norm.weight, model.norm.weight)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    state = fresh_optimizer.state[fresh.norm.weight]
    assert torch.equal(state["exp_avg"], optimizer.state[model.norm.weight]["exp_avg"])


# -- a whole run: the export fails, the rerun exports without logging a step twice ---------

@pytest.mark.distributed
def test_failed_export_then_rerun(tmp_path):
    from test_runs import TINY_MODEL, launch

    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "run.toml"
    out = tmp_path / "run"
    config.write_text(f"""
[model]
config = "{tmp_path / 'model.json'}"
[data]
path = "{repo / 'assets/data/hh-rlhf-helpful-base-test-1000.jsonl.gz'}"
tokenizer = "{repo / 'assets/tokenizers/mistral-7b-v0.1'}"
max_examples = 24
max_length = 80
packing_length = 256
bad_rows = "skip"
eval_fraction = 0.25
[reference]
cache_dir = "{tmp_path / 'cache'}"
[train]
steps = 2
micro_batch_size = 2
attention = "dense"
output_dir = "{out}"
""")
    out.mkdir()
    (out / ".hf.tmp").write_text("in the way")  # the export cannot create its folder
    process = launch(config)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"error: cannot write {out / 'hf'}" in err and "run the same command again" in err
    assert not (out / "hf").exists() and not (out / "run.lock").exists()
    first = (out / "metrics.jsonl").read_text().splitlines()
    kinds = [("eval/loss" in record, record["step"]) for record in map(json.loads, first)]
    assert kinds == [(False, 1), (False, 2), (True, 2)]

    (out / ".hf.tmp").unlink()
    process = launch(config)
    stdout, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "resumed from" in stdout and (out / "hf" / "model.safetensors").is_file()
    assert (out / "metrics.jsonl").read_text().splitlines() == first

"""A resume continues the run its checkpoint holds: what defines the run (the [model], [loss],
[reference] and [lora] sections, the initial weights) must be the checkpoint's, or the resume is
refused in one line naming the keys, unless `checkpoint.resume = "force"`; other settings may
change, with a note; the run folder's reference table is never replaced. Whole runs of
`train.py` on a tiny model (the config of test_runs.py)."""

from __future__ import annotations

import json

from test_runs import launch, losses, run, run_config  # noqa: F401 - run_config is a fixture

from prefixdpo.train.checkpoint import check_resume


def attempt(config, *overrides: str) -> tuple[int, str, str]:
    process = launch(config, "--checkpoint.export_hf=false", *overrides)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_what_defines_the_run_is_kept_on_resume(run_config, tmp_path):  # noqa: F811
    out_dir = tmp_path / "run"
    run(run_config, "--checkpoint.export_hf=false", "--train.steps=2")
    table = out_dir / "reference_logps_train.safetensors"
    table_bytes = table.read_bytes()
    checkpoint = out_dir / "step_00000002"

    # Before: each was taken silently (with a new init_seed the reference was recomputed from
    # the new initial model and replaced the run's table).
    for overrides, named in [
            (["--model.init_seed=1"], "model.init_seed (0 -> 1)"),
            (["--loss.beta=0.2"], "loss.beta (0.1 -> 0.2)"),
            (["--loss.type=ipo"], 'loss.type (["sigmoid"] -> ["ipo"])'),
            (["--reference.mode=live"], "reference.mode ('precomputed' -> 'live')"),
            (["--lora.rank=4", "--reference.mode=precomputed"], "lora.rank (0 -> 4)")]:
        code, _, err = attempt(run_config, "--train.steps=3", *overrides)
        assert code == 1 and err.count("\n") == 1, err[-3000:]
        assert err.startswith(f"error: cannot resume from {checkpoint}: what defines the run "
                              f"differs from its run's: {named}. Set it back"), err
        assert 'checkpoint.resume = "force"' in err
    assert [p.name for p in out_dir.glob("step_*")] == ["step_00000002"]
    assert table.read_bytes() == table_bytes

    # The initial weights changed at the same path: their fingerprint says so.
    model_json = tmp_path / "model.json"
    original = model_json.read_text()
    model_json.write_text(json.dumps({**json.loads(original), "initializer_range": 0.05}))
    code, _, err = attempt(run_config, "--train.steps=3")
    assert code == 1 and "the initial weights (the file of model.config or the files of " \
        "model.path changed since: their fingerprint differs)" in err, err[-3000:]
    model_json.write_text(original)

    # Settings that do not define the run may change: noted.
    code, out, err = attempt(run_config, "--train.steps=3", "--train.log_every=2",
                             f"--reference.cache_dir={tmp_path / 'other-cache'}")
    assert code == 0, err[-3000:]
    note = next(line for line in out.splitlines() if line.startswith("resuming with changed"))
    assert note.startswith("resuming with changed settings: reference.cache_dir (")
    assert note.endswith("), train.steps (2 -> 3), train.log_every (1 -> 2)")
    assert f"resumed from {checkpoint} (step 2)" in out
    assert table.read_bytes() == table_bytes

    # force: resumed all the same, said, and the run's own table kept.
    code, out, err = attempt(run_config, "--train.steps=4", "--model.init_seed=1",
                             "--checkpoint.resume=force")
    assert code == 0, err[-3000:]
    assert (f"warning: checkpoint.resume = 'force': resuming from {out_dir / 'step_00000003'} "
            "with model.init_seed (0 -> 1) changed") in out
    assert f"reference log-probs (train): loaded {table}" in out
    assert table.read_bytes() == table_bytes
    assert sorted(losses(out_dir)) == [1, 2, 3, 4]


def test_check_resume_compares_whole_sections():
    """A key added to a compared section later is compared without being listed anywhere; a
    key the checkpoint's config lacks (written before the key existed) is not."""
    saved = {"loss": {"beta": 0.1, "new_option": 1}, "train": {"steps": 2}}
    notes = []
    current = '[loss]\nbeta = 0.1\nnew_option = 2\nnewer_option = 3\n[train]\nsteps = 5\n'
    try:
        check_resume("ckpt", {}, saved, current, None, False, notes.append)
    except ValueError as e:
        assert "loss.new_option (1 -> 2)" in str(e) and "newer_option" not in str(e)
    else:
        raise AssertionError("not refused")
    check_resume("ckpt", {}, saved, current, None, True, notes.append)
    assert notes == ["warning: checkpoint.resume = 'force': resuming from ckpt with "
                     "loss.new_option (1 -> 2) changed",
                     "resuming with changed settings: train.steps (2 -> 5)"]

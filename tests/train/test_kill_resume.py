"""SIGKILL at random moments, checkpoint saves included, then the same command again, until the
run ends: every rerun resumes from the last complete checkpoint and the final losses equal an
uninterrupted run's, each step logged once.

`PREFIXDPO_KILLS` sets the number of kills (default 3, so the suite stays quick; the README
quotes a run with 20). Kill moments are drawn uniformly over an uninterrupted run's duration,
set-up included, from a fixed seed; a checkpoint is saved after every step, so many land in a
save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_runs import launch, losses, run, run_config  # noqa: F401 - run_config is a fixture

NUM_KILLS = int(os.environ.get("PREFIXDPO_KILLS", "3"))
STEPS = 8


def logged_steps(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_kill_minus_nine_then_resume_is_exact(run_config, tmp_path):  # noqa: F811
    overrides = (f"--train.steps={STEPS}", "--checkpoint.every=1", "--checkpoint.keep_last=2",
                 "--checkpoint.export_hf=false")
    uninterrupted = tmp_path / "uninterrupted"
    started = time.monotonic()
    run(run_config, f"--train.output_dir={uninterrupted}", *overrides)
    duration = time.monotonic() - started
    expected = losses(uninterrupted)
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    draw = random.Random(0)
    kills = runs = resumes = episodes = 0
    while kills < NUM_KILLS:  # an episode: a fresh folder, killed and rerun until it ends
        shutil.rmtree(killed, ignore_errors=True)
        episodes += 1
        while True:
            process = launch(run_config, f"--train.output_dir={killed}", *overrides,
                             start_new_session=True)
            runs += 1
            try:
                process.wait(timeout=draw.uniform(0.05, 1.0) * duration
                             if kills < NUM_KILLS else None)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                kills += 1
                continue
            out, err = process.communicate()
            assert process.returncode == 0, err[-3000:]
            resumes += "resumed from" in out
            break
        # Every step once, with the uninterrupted run's loss.
        assert sorted(logged_steps(killed)) == list(range(1, STEPS + 1))
        final = losses(killed)
        for step in range(1, STEPS + 1):
            assert final[step] == pytest.approx(expected[step], abs=1e-6), step
    print(f"{kills} kills in {episodes} runs to the end ({runs} launches); every one ended "
          "with the uninterrupted run's losses")

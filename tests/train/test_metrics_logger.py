"""MetricsLogger on resume: the lines after the checkpoint's step are dropped, and a line torn
by a kill mid-write does not block the resume."""

from __future__ import annotations

import json
import logging

from prefixdpo.train.metrics import MetricsLogger


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3, 4)))
    logger = MetricsLogger(tmp_path, total_steps=10, start_step=2, enabled=True)
    logger.close()
    assert [r["step"] for r in lines(path)] == [1, 2]


def test_fresh_run_removes_the_old_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    MetricsLogger(tmp_path, total_steps=10, start_step=0, enabled=True).close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_drops_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n"
                    + json.dumps({"step": 2, "loss": 0.6}) + "\n"
                    + '{"step": 3, "loss": 0.')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, total_steps=10, start_step=2, enabled=True)
        logger.log(3, {"loss": 0.5})
        logger.close()
    assert lines(path) == [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6},
                           {"step": 3, "loss": 0.5}]
    assert sum("metrics.jsonl" in r.getMessage() for r in caplog.records) == 1


def test_resume_drops_unreadable_lines_anywhere(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n[1, 2]\n{"step": "two"}\n\n{"step": 2}\n{"step": 3}\n')
    MetricsLogger(tmp_path, total_steps=10, start_step=2, enabled=True).close()
    assert lines(path) == [{"step": 1}, {"step": 2}]

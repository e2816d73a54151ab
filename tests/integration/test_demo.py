"""`tb demo` end to end at a tiny size: synth → train → ingest (Milvus Lite) → search, twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime

from tb_reranker.demo import DemoConfig, run_demo


def test_demo_runs_and_reuses_everything(tmp_path):
    config = DemoConfig(
        data_dir=str(tmp_path / "demo"), num_train=96, num_test=20, epochs=1, progress=False
    )
    lines: list[str] = []
    first = run_demo(config, out=lines.append)
    assert first["queries"] == 20
    for view in ("broad", "reranked"):
        assert 0.0 <= first[view]["R@1"] <= first[view]["R@5"] <= 100.0
    assert any(line.startswith("[5/5]") for line in lines)
    assert any("ingested 20" in line for line in lines)

    again: list[str] = []
    second = run_demo(config, out=again.append)
    assert any("(reused)" in line and line.startswith("[1/5]") for line in again)
    assert any("(reused)" in line and line.startswith("[2/5]") for line in again)
    assert any("unchanged 20" in line for line in again)
    assert second["broad"] == first["broad"] and second["reranked"] == first["reranked"]


def test_demo_retrains_when_the_preset_changes(tmp_path, monkeypatch):
    """Before: the stamp held ``epochs=None``, so a new preset default (20 -> 30 epochs) reused
    the old checkpoint silently."""
    from tb_reranker.training.loop import PRESETS

    config = DemoConfig(
        data_dir=str(tmp_path / "demo"), num_train=96, num_test=20, epochs=1, progress=False
    )
    run_demo(config, out=lambda line: None)
    monkeypatch.setitem(PRESETS, "synthetic", {**PRESETS["synthetic"], "weight_decay": 0.1})
    again: list[str] = []
    run_demo(config, out=again.append)
    assert any("(reused)" in line and line.startswith("[1/5]") for line in again)  # the clips
    assert not any("(reused)" in line and line.startswith("[2/5]") for line in again)
    assert any("ingested 20" in line for line in again)  # the new vision side's own library


def test_demo_in_a_pipe_logs_progress_lines_not_bars(tmp_path):
    """Before: tqdm drew its bars into the pipe (carriage returns, 1,500 lines for `make demo`)."""
    interval = 0.2
    env = dict(os.environ, TB_PROGRESS_INTERVAL_S=str(interval))
    result = subprocess.run(
        [sys.executable, "-m", "tb_reranker", "demo", "--data-dir", str(tmp_path / "demo")]
        + ["--train", "96", "--test", "20", "--epochs", "1"],
        env=env,
        capture_output=True,  # pipes, as in CI logs or `make demo | tee`
        timeout=600,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"\r" not in result.stdout and b"\r" not in result.stderr
    stderr = result.stderr.decode()
    lines = re.findall(
        r"^(\S+ \S+) INFO tb_reranker\.progress: (.+?): (\d+)/(\d+) \S+ \((.*)\)$",
        stderr,
        flags=re.MULTILINE,
    )
    # some loops outlast the interval (which ones depends on the machine's speed)
    assert {desc for _, desc, *_ in lines} & {"synth", "decode", "encode", "train"}, stderr
    by_desc: dict[str, list[datetime]] = {}
    for stamp, desc, n, total, details in lines:
        assert int(n) <= int(total)
        if "done in" not in details:
            by_desc.setdefault(desc, []).append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"))
    for desc, stamps in by_desc.items():  # at most one line per interval and bar
        gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
        assert all(gap >= interval - 0.002 for gap in gaps), (desc, gaps)  # ms-rounded stamps
    assert sum(1 for line in stderr.splitlines() if "tb_reranker.progress" in line) == len(lines)
    assert "[5/5]" in result.stdout.decode()

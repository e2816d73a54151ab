"""Progress display: a tqdm bar on a terminal only; off a terminal a log line at a bounded rate."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import select
import struct
import sys
import termios

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.progress import DEFAULT_INTERVAL_S, Progress, _LogProgress, progress


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tb_reranker.progress"]


def test_log_lines_at_most_every_interval_and_a_last_one(caplog):
    caplog.set_level(logging.INFO, logger="tb_reranker.progress")
    clock = _Clock()
    bar = _LogProgress(None, total=1000, desc="decode", unit="video", interval_s=10, clock=clock)
    for _ in range(1000):  # 35 s of work in 1000 steps
        clock.now += 0.035
        bar.update(1)
    bar.set_postfix(loss="0.123")
    bar.close()
    bar.close()  # idempotent
    lines = _lines(caplog)
    assert len(lines) == 4, lines  # at 10, 20, 30 s, then done
    assert lines[0].startswith("decode: 286/1000 video (28.6 video/s, 10 s")
    assert lines[-1] == "decode: 1000/1000 video (28.6 video/s, done in 35.0 s, loss=0.123)"


def test_a_short_loop_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="tb_reranker.progress")
    clock = _Clock()
    bar = _LogProgress(range(50), total=None, desc="synth", unit="clip", interval_s=10, clock=clock)
    assert list(bar) == list(range(50))
    bar.close()
    assert bar.total == 50 and bar.n == 50
    assert _lines(caplog) == []


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.floats(min_value=0.0, max_value=7.0), max_size=300),
    interval=st.floats(min_value=0.1, max_value=20.0),
)
def test_rate_is_bounded_for_any_timing(steps, interval):
    logged: list[float] = []
    clock = _Clock()
    bar = _LogProgress(None, total=None, desc="x", unit="it", interval_s=interval, clock=clock)
    bar._log = lambda now, done=False: (logged.append(now), setattr(bar, "_last", now))  # type: ignore[method-assign]
    start = clock.now
    for step in steps:
        clock.now += step
        bar.update(1)
    assert all(b - a >= interval for a, b in zip([start, *logged], logged, strict=False))
    assert len(logged) <= (clock.now - start) / interval + 1e-9


def test_off_a_terminal_no_bar_is_drawn(monkeypatch, caplog):
    fake = io.StringIO()  # a pipe or a file: not a TTY
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setenv("TB_PROGRESS_INTERVAL_S", "0.000001")
    caplog.set_level(logging.INFO, logger="tb_reranker.progress")
    assert list(progress(range(20), desc="encode videos", unit="batch")) == list(range(20))
    drawn = fake.getvalue()  # no bar (a stale handler of another test may still write here)
    assert "\r" not in drawn and "%|" not in drawn, drawn
    lines = _lines(caplog)
    assert lines and all(line.startswith("encode videos: ") for line in lines)
    assert "\r" not in "".join(lines)


def test_on_a_terminal_the_bar_is_drawn(monkeypatch):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24x100
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            bar = progress(total=3, desc="ingest", unit="video")
            assert not isinstance(bar, Progress)  # tqdm's own bar
            bar.update(3)
            bar.close()
            terminal.flush()
        chunks = []  # a pty hands its bytes over in pieces: read until it has none left
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 65536))
        drawn = b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "\r" in drawn and "ingest" in drawn and "3/3" in drawn


def test_disabled_shows_nothing_anywhere(monkeypatch, caplog):
    monkeypatch.setenv("TB_PROGRESS_INTERVAL_S", "0.000001")
    caplog.set_level(logging.INFO, logger="tb_reranker.progress")
    shown = progress(iter("abc"), desc="d", enabled=False)
    assert type(shown) is Progress and list(shown) == ["a", "b", "c"]
    assert _lines(caplog) == []


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_bad_interval_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("TB_PROGRESS_INTERVAL_S", raw)
    with pytest.raises(InvalidInputError, match="TB_PROGRESS_INTERVAL_S"):
        progress(range(3), desc="d")


def test_default_interval(monkeypatch):
    monkeypatch.delenv("TB_PROGRESS_INTERVAL_S", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress(range(3), desc="d")
    assert isinstance(bar, _LogProgress) and bar.interval_s == DEFAULT_INTERVAL_S == 10.0

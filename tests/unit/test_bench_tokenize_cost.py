"""Smoke run of ``benchmarks/tokenize_cost.py --quick``: it runs and its JSON has the keys
docs/security.md quotes (timings are printed, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_tokenize_cost_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import tokenize_cost

    result = tokenize_cost.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "tokenize_cost.json").read_text())
    assert [row["word_chars"] for row in result["words"]] == [16, 256, 2048]
    for row in result["words"]:
        for path in ("open_clip", "ours"):
            assert 0 < row[path]["median_ms"] <= row[path]["max_ms"]
    call = result["encode_call"]
    assert call["texts"] == 8 and call["chunk_texts"] == 8 and call["text_chars"] == 2048
    assert call["tokenize_all_ms"] > 0 and call["encode_one_chunk_ms"] > 0
    assert "encode_whole_call_ms" not in call  # --quick skips the long one

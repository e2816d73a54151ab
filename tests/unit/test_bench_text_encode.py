"""Smoke run of ``benchmarks/text_encode.py --quick``: it runs, both paths agree, and the JSON
has the keys docs/benchmarks.md quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def test_text_encode_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import text_encode

    result = text_encode.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "text_encode.json").read_text())
    assert result["benchmark"] == "text_encode" and result["device"] == "cpu"
    assert result["environment"]["torch_threads"] == 1
    query = result["results"]["query_10_words"]
    assert query["batch"] == 1 and query["positions_full"] == 77
    # SOT + 12 word pieces + EOT, then the m = 4 indicators
    assert query["positions_truncated"] == 18
    assert query["max_abs_diff"] < 1e-4
    assert result["results"]["batch_64"]["batch"] == 8  # --quick
    for row in result["results"].values():
        for path in (
            "full",
            "truncated",
            "truncated_unpacked",
            "full_packed",
            "open_clip",
            "tokenize",
        ):
            assert 0 < row[path]["median_ms"] <= row[path]["max_ms"]
        assert row["speedup_of_truncation"] > 0 and row["speedup_of_packed_weights"] > 0
    target = result["target"]
    assert target["target"] == 3.0
    assert target["speedup_10_words"] == query["speedup_full_over_truncated"] > 0
    assert target["met"] == (target["speedup_10_words"] >= 3.0)

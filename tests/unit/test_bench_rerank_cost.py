"""Smoke run of ``benchmarks/rerank_cost.py --quick``: it runs, writes JSON + PNG with the keys
the report quotes, and its numbers are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)


def test_rerank_cost_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import rerank_cost

    result = rerank_cost.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "rerank_cost.json").read_text())
    assert printed == written
    assert written["targets"] == result["targets"]
    assert (tmp_path / "rerank_cost.png").stat().st_size > 0
    assert result["benchmark"] == "rerank_cost" and result["quick"] is True
    assert (result["T"], result["D"], result["m"]) == (12, 512, 4)
    assert result["environment"]["torch_threads"] == 1
    targets = result["targets"]
    assert set(targets) == {
        "p50_ms_one_query_K10",
        "queries_per_s_batch64_K10",
        "cold_p50_ms_one_query_K10",
        "cold_queries_per_s_batch64_K10",
    }
    cold_latency = targets["cold_p50_ms_one_query_K10"]
    cold_throughput = targets["cold_queries_per_s_batch64_K10"]
    assert cold_latency["target"] == 1.0 and cold_throughput["target"] == 2500.0
    assert cold_latency["met"] == (cold_latency["measured"] <= 1.0)
    assert cold_throughput["met"] == (cold_throughput["measured"] >= 2500.0)
    latency, throughput = targets["p50_ms_one_query_K10"], targets["queries_per_s_batch64_K10"]
    assert latency["target"] == 1.0 and throughput["target"] == 2000.0
    assert latency["measured"] > 0 and throughput["measured"] > 0
    assert latency["met"] == (latency["measured"] <= latency["target"])
    assert throughput["met"] == (throughput["measured"] >= throughput["target"])
    cells = {(row["K"], row["batch"]) for row in result["results"]}
    assert cells == {(5, 1), (5, 8), (10, 1), (10, 8)}
    for row in result["results"]:
        for name in (
            "rerank_cached",
            "rerank_uncached",
            "kv_cached",
            "kv_uncached",
            "before_cached",
            "before_uncached",
            "bare_fusion",
        ):
            timing = row[name]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["queries_per_s"] == pytest.approx(
                row["batch"] * 1e3 / timing["median_ms"], rel=1e-2
            )
        assert row["uncached_over_cached"] > 0 and row["cached_over_bare"] > 0
        assert row["kv_uncached_over_uncached"] > 0 and row["cached_over_kv_cached"] > 0
        rate = row["kv_cache_break_even_hit_rate"]
        assert rate is None or 0.0 <= rate <= 1.0
        assert 0.0 < row["cache_hit_rate"] <= 1.0

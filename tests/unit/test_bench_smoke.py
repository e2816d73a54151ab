"""Smoke runs of the end-to-end benchmarks (``--quick``): they run, and their JSON has the keys
docs/benchmarks.md quotes, with values that make sense."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    assert path.exists(), f"{name} wrote no JSON"
    return json.loads(path.read_text())


def test_search_e2e_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import search_e2e

    assert search_e2e.main(["--quick", "--out", str(tmp_path), "--queries", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = _load(tmp_path, "search_e2e")
    assert printed == result
    assert (tmp_path / "search_e2e.png").stat().st_size > 0
    assert result["benchmark"] == "search_e2e"
    (cell,) = result["results"]
    assert cell["backend"] == "lite" and cell["videos"] == 300 and cell["queries"] == 3
    for mode in ("broad_only", "reranked", "before", "plain_clip", "repeated"):
        assert 0 < cell[mode]["p50_ms"] <= cell[mode]["p95_ms"]
    for ratio in ("before_over_reranked_p50", "plain_clip_over_reranked_p50"):
        assert cell[ratio] > 0
    assert cell["reranked_over_repeated_p50"] > 0
    assert set(cell["breakdown"]) == {"encode", "ann", "fetch", "rerank", "project_and_fuse"}
    assert cell["breakdown"]["rerank"]["p50_ms"] > 0
    assert isinstance(cell["rerank_added_pct_p50"], float)
    assert "lite_300" in result["headline"]
    assert "reranking adds" in result["headline"]["lite_300"]


def test_ingest_throughput_quick(tmp_path: Path) -> None:
    from benchmarks import ingest_throughput

    assert ingest_throughput.main(["--quick", "--out", str(tmp_path), "--videos", "4"]) == 0
    result = _load(tmp_path, "ingest_throughput")
    (cell,) = result["results"]
    assert cell["model"] == "tiny" and cell["videos"] == 4 and cell["milvus_rows"] == 4
    assert cell["ingest_videos_per_s"] > 0 and cell["raw_encoder"]["frames_per_s"] > 0
    expected = cell["ingest_frames_per_s"] / cell["raw_encoder"]["frames_per_s"]
    assert cell["ratio_vs_raw"] == pytest.approx(expected, rel=0.01, abs=0.002)
    # float16 [T=8, D=64] tokens: 1 KiB; the record adds a header; LMDB pages hold it
    assert cell["tokens_bytes"] == 8 * 64 * 2
    assert cell["record_bytes"] > cell["tokens_bytes"]
    assert cell["store_bytes_per_video"] >= cell["tokens_bytes"]
    assert result["target"]["ratio_vs_raw_min"] == 0.8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sidecar_memory_quick(tmp_path: Path) -> None:
    from benchmarks import sidecar_memory

    assert sidecar_memory.main(["--quick", "--out", str(tmp_path), "--calls", "12"]) == 0
    result = _load(tmp_path, "sidecar_memory")
    assert result["config"]["calls"] == 12
    assert result["peak_rss_mib"] >= result["idle_hwm_mib"] > 50  # torch alone is > 50 MiB
    assert result["peak_rss_mib"] >= result["final_rss_mib"]
    assert result["samples"][-1]["calls"] == 13  # the readiness call + 12
    assert int(result["server_info_cache"]["cache"]["size"]) > 0


def test_read_proc_status_of_this_process() -> None:
    import os

    from benchmarks.sidecar_memory import read_proc_status

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    status = read_proc_status(os.getpid())
    assert status["VmHWM"] >= status["VmRSS"] > 0


def test_run_all_collects_and_reports_missing(tmp_path: Path) -> None:
    from benchmarks import run_all

    assert run_all.main(["--quick", "--only", "store_get", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "all.json").read_text())
    assert summary["statuses"] == {"store_get": "ok"}
    entry = summary["benchmarks"]["store_get"]
    assert entry["result"]["videos"] == 1000
    assert _load(tmp_path, "store_get") == entry["result"]  # stdout-only script: file written

    missing = run_all.run_one("no_such_bench", [], out_dir=tmp_path, timeout=10)
    assert missing["status"] == "missing"
    names = run_all.discover()
    assert names[: len(run_all.BENCHMARKS)] == list(run_all.BENCHMARKS)
    assert "common" not in names and "run_all" not in names


def test_parse_json_output_after_log_lines() -> None:
    from benchmarks.run_all import parse_json_output

    assert parse_json_output('{"a": 1}\n') == {"a": 1}
    mixed = 'loading {model}\n{"a": {"b": 2}}\nINFO done\n{\n  "c": [1, 2]\n}\n'
    assert parse_json_output(mixed) == {"c": [1, 2]}
    with pytest.raises(ValueError):
        parse_json_output("no json here")


def test_plot_stdout_only_draws_fusion_cpu(tmp_path: Path) -> None:
    from benchmarks.run_all import plot_stdout_only

    rows = [
        {"head": h, "batch": b, "kv": kv, "ms_per_query": 1.0 + b / 64}
        for h in ("symmetric", "listwise")
        for b in (1, 64)
        for kv in ("direct", "cached")
    ]
    path = plot_stdout_only("fusion_cpu", {"K": 10, "T": 12, "D": 512, "results": rows}, tmp_path)
    assert path is not None and path.stat().st_size > 1000
    assert plot_stdout_only("store_get", {"videos": 1}, tmp_path) is None


def test_run_all_collect_only(tmp_path: Path) -> None:
    from benchmarks import run_all

    (tmp_path / "store_get.json").write_text(json.dumps({"benchmark": "store_get", "videos": 7}))
    (tmp_path / "fusion_cpu.json").write_text("{not json")
    run_all.main(["--collect-only", "--only", "store_get", "fusion_cpu", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "all.json").read_text())
    assert summary["statuses"] == {"fusion_cpu": "failed", "store_get": "ok"}
    assert summary["benchmarks"]["store_get"]["result"]["videos"] == 7


def test_roofline_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The floors of issue 12's targets: every figure positive, the verdicts follow from them."""
    from benchmarks import roofline

    result = roofline.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    assert json.loads(capsys.readouterr().out) == _load(tmp_path, "roofline") == result
    assert result["rates"]["weight_stream_gb_s"] > 0 and result["rates"]["gemm_gflop_s"] > 0
    for name in ("fusion_batch1", "fusion_batch64", "text_10_words", "text_full"):
        floor = result["floors"][name]
        assert floor["floor_ms"] > 0 and floor["gflop"] > 0 and floor["weight_mb"] > 0
    # 12 layers x (3 + 1 + 4 + 4) x 512² weights + biases, float32
    assert result["floors"]["text_full"]["weight_mb"] == pytest.approx(151.2, abs=0.2)
    assert result["floors"]["text_full"]["gflop"] > 4 * result["floors"]["text_10_words"]["gflop"]
    one = result["verdicts"]["cold_rerank_p50_le_1ms"]
    assert one["possible"] == (one["floor_ms"] <= 1.0)
    assert one["floor_ms"] > result["floors"]["fusion_batch1"]["floor_ms"]  # + the store read
    many = result["verdicts"]["cold_rerank_ge_2500_qps"]
    assert many["batch"] == 8 and many["possible"] == (many["ceiling_queries_per_s"] >= 2500)
    assert many["ceiling_queries_per_s"] < many["ceiling_without_store_read"]


def test_segment_cost_quick(tmp_path: Path) -> None:
    from benchmarks import segment_cost

    assert segment_cost.main(["--quick", "--size", "128x72", "--out", str(tmp_path)]) == 0
    result = _load(tmp_path, "segment_cost")
    assert [row["size"] for row in result["rows"]] == ["128x72", "96x96"]  # --size, then tiny
    for row in result["rows"]:
        assert row["frames"] == 1500 and row["failures"] == 0
        assert row["plain_decode_s"] > 0 and row["segment_224_s"] > 0
        assert row["ratio_224"] == pytest.approx(
            row["segment_224_s"] / row["plain_decode_s"], rel=0.05
        )
        assert row["cpu_ratio_224"] == pytest.approx(
            row["cpu_s"]["segment_224"] / row["cpu_s"]["plain"], rel=0.05
        )
        assert set(row["stages_224"]) == {"detect_s", "preprocess_s", "decode_and_rest_s"}
        assert row["boundaries_at_true_cut_2_frames"] == 1.0  # every boundary on a true cut
    assert result["target"] == {"ratio_224_max": 1.5, "size": "128x72"}
    assert result["notes"]


def test_robust_compare_reads_the_committed_runs(tmp_path: Path, monkeypatch) -> None:
    """The worst run and spread per arm, from robust_training's JSON: the figures the issue-24
    section of docs/results_synthetic.md quotes for --augment on the shapes renderer."""
    from benchmarks import robust_compare

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    reports = [str(results / f"robust_training{s}.json") for s in ("", "_data_seeds")]
    out = tmp_path / "compare.json"
    monkeypatch.setattr(sys, "argv", ["robust_compare", *reports, "--json", str(out)])
    robust_compare.main()
    rows = {(r["arm"], r["test_renderer"]): r for r in json.loads(out.read_text())["rows"]}
    augment = rows[("augment", "shapes")]
    assert [run["data_seed"] for run in augment["runs"]] == [41, 41, 42, 43]
    assert (augment["worst"], augment["spread"]) == (86.5, 9.7)
    assert augment["min_margin_over_broad"] == round(86.5 - 39.4, 1)
    assert rows[("none", "camera")]["worst"] == 15.4
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_augment_cost_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every arm trains a step, and the ratios are the medians' (the figures docs quote)."""
    from benchmarks import augment_cost

    assert augment_cost.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    median = result["median_ms_per_step"]
    assert set(median) == {"none", "augment_pixels", "augment", "order"}
    assert all(value > 0 for value in median.values())
    assert result["ratio_to_none"]["augment"] == round(median["augment"] / median["none"], 2)
    assert _load(tmp_path, "augment_cost")["median_ms_per_step"] == median

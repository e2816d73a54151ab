"""`tb demo` end to end at a tiny size: synth → train → ingest (Milvus Lite) → search, twice."""

from __future__ import annotations

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

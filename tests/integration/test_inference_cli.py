"""``tb search`` runs the checkpoint prepared for inference (packed linear layers, frozen weights,
identity computed once: issue 19 §3 / 21 §1) and gives what the same weights give as a plain
model. The CLI as a subprocess on a fresh ``--data-dir`` (Milvus Lite directory, LMDB store,
real MP4 files); the reference is the plain model in this process over the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tb_reranker.client import Client
from tb_reranker.model import TokenBinder, TokenBinderConfig, load_checkpoint, save_checkpoint

TEXTS = ["a red square moves right", "a blue box on grey"]


def tb(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tb_search_on_a_prepared_model_equals_the_plain_model(tmp_path: Path, mp4_writer) -> None:
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny())
    with torch.no_grad():  # a head that scores: Δ != 0
        model.fusion.head[-1].weight.normal_(0, 0.5)
    checkpoint = save_checkpoint(model, tmp_path / "checkpoint")
    for i, colour in enumerate(mp4_writer.colours[:4]):
        mp4_writer(tmp_path / "videos" / f"clip{i}.mp4", colour, frames=8 + 2 * i)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    env["TB_PROGRESS_INTERVAL_S"] = "60"
    common = ["--data-dir", str(tmp_path / "data"), "--checkpoint", str(checkpoint)]
    ingest = tb("ingest", str(tmp_path / "videos"), *common, "--no-progress", env=env)
    assert ingest.returncode == 0, ingest.stderr
    search = tb("-v", "search", *TEXTS, "--json", "--limit", "4", *common, env=env)
    assert search.returncode == 0, search.stderr
    # 2 text blocks x 4 linear layers + the fusion block's 6 and its head's 2
    assert "prepared for inference: 16 packed layers" in search.stderr
    got = json.loads(search.stdout)

    plain = load_checkpoint(checkpoint)  # not prepared: PyTorch's own modules, no packed copy
    assert not plain.prepared
    with Client(data_dir=str(tmp_path / "data"), model=plain, query_cache_size=0) as client:
        expected = client.search_many(TEXTS, limit=4)
    assert not plain.prepared  # a model handed to the Client is used as it is
    for query, hits in zip(got, expected, strict=True):
        assert [h["id"] for h in query["hits"]] == [h.id for h in hits]
        assert any(abs(h.delta) > 1e-3 for h in hits)
        for cli_hit, hit in zip(query["hits"], hits, strict=True):
            for field in ("score", "broad_score", "delta"):
                assert abs(cli_hit[field] - getattr(hit, field)) < 1e-5, (field, cli_hit, hit)

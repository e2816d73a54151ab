"""Moment evaluation (``training.evaluate_moments``, ``tb eval`` on a ``tb synth --long`` folder):
against a brute-force computation of the same semantics, and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from tb_reranker.metrics import temporal_iou
from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint
from tb_reranker.training.evaluate_moments import (
    evaluate_moments,
    find_videos,
    moment_queries,
    segment_videos,
)
from tb_reranker.video.synth_long import generate_long

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def long_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four videos of three 12-s events (over 30 s: each gets cut), 32 px at 4 fps."""
    root = tmp_path_factory.mktemp("moments") / "long"
    generate_long(
        root, num_pairs=2, events_per_video=3, event_s=12.0, fps=4, size=32, seed=3, progress=False
    )
    return root


def _model(perturbed: bool) -> TokenBinder:
    model = TokenBinder(TokenBinderConfig.tiny())
    if perturbed:  # a non-zero Δ head, so reranking moves things
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            last = model.fusion.head[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
            last.bias.copy_(torch.randn(last.bias.shape, generator=generator))
    return model.eval()


def _order_key(s: int, *, view: str, top: list, final: torch.Tensor, broad: np.ndarray) -> tuple:
    """Where segment ``s`` goes in a view's order: reranked segments first, by S' + Δ."""
    if view == "reranked" and s in top:
        return (0, -float(final[top.index(s)]))
    return (1, -broad[s])


@torch.no_grad()
def _brute_force(model: TokenBinder, root: Path, k: int) -> dict[str, list]:
    """Every (query, video) score by plain loops: a video's score is its best segment's."""
    queries = moment_queries(root / "moments.json")
    segments = segment_videos(model, find_videos(root, [q.video_id for q in queries]))
    cls, tokens = model.encode_frames(segments.frames.float(), segments.masks)
    cls, tokens = cls.half().float(), tokens.half().float()  # as the feature cache rounds them
    video_of = segments.video_of
    out: dict[str, list] = {
        "broad_rank": [],
        "reranked_rank": [],
        "broad_iou": [],
        "reranked_iou": [],
    }
    for query in queries:
        indicators = model.encode_text([query.caption])  # [1, m, D]
        broad = (indicators[0, 0] @ cls.t()).double().numpy()  # [S]
        top = sorted(range(len(broad)), key=lambda s: -broad[s])[:k]
        final = model.focused_scores(indicators, cls[top][None], tokens[top][None],
                                     frames_mask=segments.masks[top][None]).final[0]  # fmt: skip
        for view in ("broad", "reranked"):
            key = partial(_order_key, view=view, top=top, final=final, broad=broad)
            best = {}  # video -> its best segment
            for s in sorted(range(len(broad)), key=key):
                best.setdefault(int(video_of[s]), s)
            order = sorted(best, key=lambda v: key(best[v]))
            truth = segments.video_ids.index(query.video_id)
            out[f"{view}_rank"].append(order.index(truth) + 1)
            span = segments.spans[best[truth]]
            right = order[0] == truth
            out[f"{view}_iou"].append(
                max(temporal_iou(span, w) for w in query.windows) if right else 0.0
            )
    return out


def test_matches_a_brute_force_computation(long_set: Path) -> None:
    model = _model(perturbed=True)
    result = evaluate_moments(model, long_set, k=5, details=True)
    expected = _brute_force(model, long_set, 5)
    for name, values in expected.items():
        got = [q[name] for q in result["queries"]]
        assert np.allclose(got, values, atol=1e-4), name
    assert result["k"] == 5 and result["num_videos"] == 4 and result["num_queries"] == 12
    ranks = np.array(expected["reranked_rank"])
    ious = np.array(expected["reranked_iou"])
    assert result["reranked"]["video"]["R@1"] == pytest.approx(100 * np.mean(ranks == 1))
    assert result["reranked"]["moment"]["R1@IoU0.5"] == pytest.approx(100 * np.mean(ious >= 0.5))
    assert result["reranked"]["moment"]["top_video_right"] == int(np.sum(ranks == 1))
    # the perturbed head does move some query (else this test could not tell the views apart)
    assert expected["reranked_rank"] != expected["broad_rank"]


def test_short_videos_stay_whole(tmp_path: Path) -> None:
    """Videos no longer than 30 s are one segment [0, duration] (SegmentSpec.keeps_whole)."""
    root = tmp_path / "short"
    generate_long(root, num_pairs=1, events_per_video=3, event_s=2.0, fps=4, size=32, seed=1,
                  progress=False)  # fmt: skip
    segments = segment_videos(_model(False), find_videos(root, ["long_000000", "long_000001"]))
    assert len(segments.spans) == 2
    assert segments.spans[:, 0].tolist() == [0.0, 0.0]
    durations = [json.loads(line)["duration_s"] for line in (root / "videos.jsonl").open()]
    assert segments.spans[:, 1] == pytest.approx(durations, abs=0.3)


def tb(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args],
        env=env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_cli_eval_on_a_long_folder(long_set: Path, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(_model(perturbed=False), tmp_path / "ckpt")
    plot = tmp_path / "moments.png"
    done = tb("eval", "--checkpoint", str(checkpoint), "--data", str(long_set), "--json",
              "--no-progress", "--plot", str(plot))  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mode"] == "moments" and result["segments"] == "shots"
    assert (result["num_videos"], result["num_queries"]) == (4, 12)
    assert result["k"] == min(10, result["segmentation"]["segments"])
    assert result["segmentation"]["segments"] >= 12  # every 36-s video is cut
    for view in ("broad", "reranked"):
        assert result[view]["video"]["R@10"] == 100.0  # four videos
        for value in (*result[view]["video"].values(), *result[view]["moment"].values()):
            assert value is None or value >= 0
    # an untrained head (Δ = 0): reranking changes nothing
    assert result["reranked"] == result["broad"]
    assert plot.stat().st_size > 0
    assert result["moments_file"].endswith("moments.json") and "queries" not in result


def test_cli_user_mistakes_exit_2_with_one_line(
    long_set: Path, tmp_path: Path, tb_exit_code
) -> None:
    checkpoint = save_checkpoint(_model(perturbed=False), tmp_path / "ckpt")
    refused = tb("eval", "--checkpoint", str(checkpoint), "--data", str(long_set),
                 "--segments", "fixed:abc")  # fmt: skip
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "segment spec" in lines[0], (
        refused.stderr
    )
    base = ["eval", "--checkpoint", str(checkpoint), "--no-progress"]
    assert (
        tb_exit_code([*base, "--data", str(long_set), "--moments", str(tmp_path / "x.json")]) == 2
    )
    assert tb_exit_code([*base, "--data", str(tmp_path / "nowhere"), "--moments",
                         str(long_set / "moments.json")]) == 2  # fmt: skip
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "captions.jsonl").write_text('{"video_id": "a", "captions": ["x"]}\n')
    assert tb_exit_code([*base, "--data", str(clips), "--segments", "shots"]) == 2

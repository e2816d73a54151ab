"""Evaluation (against a brute-force computation), the Δ = 0 identity, `tb train` / `tb eval` /
`tb ablate` through ``tb_reranker.cli.main`` on a tiny real synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tb_reranker.cli import main
from tb_reranker.model import TokenBinder, TokenBinderConfig, load_checkpoint
from tb_reranker.training import TrainConfig, evaluate, format_table, train
from tb_reranker.training.ablation import parse_sweep
from tb_reranker.training.features import (
    VideoCaptionSet,
    load_features,
    load_frames,
    load_video_captions,
)
from tb_reranker.video.synth import generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(
        root,
        num_train=24,
        num_val=0,
        num_test=12,
        seed=5,
        size=32,
        num_frames=8,
        workers=1,
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained 3 short epochs (Δ no longer zero)."""
    out = tmp_path_factory.mktemp("trained")
    return train(
        TrainConfig(
            data_root=str(synth_root),
            out_dir=str(out / "run"),
            epochs=3,
            batch_size=8,
            lr=3e-3,
            seed=2,
            cache_dir=str(out / "cache"),
            workers=1,
            progress=False,
        )
    )


def _multi_caption(videos: VideoCaptionSet) -> VideoCaptionSet:
    """Every other video gets a second caption (a variant of another video's: no exact ties)."""
    captions = [
        list(c) + ([videos.captions[(i + 3) % len(videos)][0] + " again"] if i % 2 == 0 else [])
        for i, c in enumerate(videos.captions)
    ]
    return VideoCaptionSet(videos.videos_ids, videos.paths, captions, videos.name, videos.split)


def _brute_force(model: TokenBinder, videos: VideoCaptionSet, cache: Path, k: int) -> dict:
    """Ranks by explicit sorting, one query at a time (no metrics module)."""
    frames = load_frames(
        videos,
        num_frames=model.num_frames,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        cache_dir=cache,
    )
    feats = load_features(model, frames, cache_dir=cache)
    texts = [c for cs in videos.captions for c in cs]
    owner = [i for i, cs in enumerate(videos.captions) for _ in cs]
    model.eval()
    with torch.no_grad():
        ind = model.encode_text(texts)
        sims = (ind[:, 0] @ feats.cls.t()).numpy()  # [M, N]
        ranks = {
            name: []
            for name in (
                "t2v_broad",
                "t2v_reranked",
                "v2t_broad",
                "v2t_reranked",
                "v2t_captions_broad",
                "v2t_captions_reranked",
            )
        }
        for q in range(len(texts)):
            order = list(np.argsort(-sims[q], kind="stable"))
            ranks["t2v_broad"].append(order.index(owner[q]) + 1)
            top = order[:k]
            scores = model.focused_scores(
                ind[q : q + 1], feats.cls[top][None], feats.frames_tokens[top][None]
            )
            final = scores.final[0].numpy()
            new = [top[j] for j in np.argsort(-final, kind="stable")] + order[k:]
            ranks["t2v_reranked"].append(new.index(owner[q]) + 1)
        for v in range(len(videos)):
            order = list(np.argsort(-sims[:, v], kind="stable"))
            mine = [t for t in range(len(texts)) if owner[t] == v]
            top = order[:k]
            scores = model.focused_scores_v2t(
                feats.frames_tokens[v : v + 1], feats.cls[v : v + 1], ind[top][None]
            )
            final = scores.final[0].numpy()
            new = [top[j] for j in np.argsort(-final, kind="stable")] + order[k:]
            for view, texts_order in (("broad", order), ("reranked", new)):
                # captions: the best own caption among all captions
                ranks[f"v2t_captions_{view}"].append(min(texts_order.index(t) for t in mine) + 1)
                # videos (published): each video where its best caption first appears
                videos_order = list(dict.fromkeys(owner[t] for t in texts_order))
                ranks[f"v2t_{view}"].append(videos_order.index(v) + 1)
    return {name: np.array(r) for name, r in ranks.items()}


def test_evaluate_matches_brute_force(trained, synth_root, tmp_path):
    model = load_checkpoint(trained)
    videos = _multi_caption(load_video_captions("generic", synth_root, "test"))
    k = 5
    result = evaluate(model, videos, k=k, cache_dir=tmp_path)
    assert result["num_videos"] == 12 and result["num_texts"] == 18 and result["k"] == k
    captions = evaluate(model, videos, k=k, cache_dir=tmp_path, v2t_protocol="captions")
    brute = _brute_force(model, videos, tmp_path, k)
    assert result["ties"] == "pessimistic" and result["v2t_protocol"] == "videos"
    for direction, got in (("t2v", result), ("v2t", result), ("v2t_captions", captions)):
        for view in ("broad", "reranked"):
            ranks = brute[f"{direction}_{view}"]
            metrics = got[direction.removesuffix("_captions")][view]
            for cut in (1, 5, 10):
                assert metrics[f"R@{cut}"] == pytest.approx(100.0 * np.mean(ranks <= cut))
            assert metrics["MdR"] == pytest.approx(float(np.median(ranks)))
            assert metrics["MnR"] == pytest.approx(float(np.mean(ranks)))
            assert metrics["num_queries"] == (18 if direction == "t2v" else 12)
            assert metrics["ties"] == "pessimistic"
            assert metrics["protocol"] == ("captions" if direction == "v2t_captions" else "videos")
            paper = got["optimistic"][direction.removesuffix("_captions")][view]
            assert paper["ties"] == "optimistic" and paper["protocol"] == metrics["protocol"]
            # continuous scores: no ties, so the two rules agree here
            assert paper["R@1"] == metrics["R@1"] and paper["MnR"] == metrics["MnR"]
    # with several captions per video the protocols differ: a video never ranks worse when the
    # competitors are videos rather than captions
    assert (brute["v2t_broad"] <= brute["v2t_captions_broad"]).all()
    assert (brute["v2t_broad"] < brute["v2t_captions_broad"]).any()
    assert result["curves"]["t2v"]["broad"][0] == pytest.approx(result["t2v"]["broad"]["R@1"])
    # a trained head moves some scores: the reranked view is not trivially the broad one
    assert not np.array_equal(brute["t2v_broad"], brute["t2v_reranked"]) or not np.array_equal(
        brute["v2t_broad"], brute["v2t_reranked"]
    )
    table = format_table(result)
    assert "reranked" in table and "protocol: videos" in table and "optimistic ties" in table


def test_untrained_model_reranks_to_the_broad_order(synth_root, tmp_path):
    model = TokenBinder(TokenBinderConfig.tiny(seed=11))
    videos = _multi_caption(load_video_captions("generic", synth_root, "test"))
    result = evaluate(model, videos, cache_dir=tmp_path)
    for direction in ("t2v", "v2t"):
        assert result[direction]["reranked"] == result[direction]["broad"]
        assert result["curves"][direction]["reranked"] == result["curves"][direction]["broad"]


def test_cli_train_eval_and_ablate(synth_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    cache = tmp_path / "cache"
    monkeypatch.setenv("TB_BATCH_SIZE", "8")  # flags also come from TB_* variables
    code = main(
        [
            "train",
            "--data",
            str(synth_root),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--cache-dir",
            str(cache),
            "--workers",
            "1",
            "--no-progress",
            "--json",
        ]
    )
    assert code == 0
    checkpoint = json.loads(capsys.readouterr().out)["checkpoint"]
    state = json.loads((Path(checkpoint) / "train_state.json").read_text())
    assert state["train_config"]["batch_size"] == 8 and state["global_step"] == 3

    plot = tmp_path / "curves.png"
    code = main(
        [
            "eval",
            "--checkpoint",
            checkpoint,
            "--data",
            str(synth_root),
            "--json",
            "--plot",
            str(plot),
            "--cache-dir",
            str(cache),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_videos"] == 12 and set(result["t2v"]) == {"broad", "reranked"}
    # each number names its protocol and tie rule; optimistic ties (paper-comparable) beside
    assert (result["ties"], result["v2t_protocol"]) == ("pessimistic", "videos")
    assert result["v2t"]["reranked"]["protocol"] == "videos"
    assert result["t2v"]["broad"]["ties"] == "pessimistic"
    assert result["optimistic"]["v2t"]["broad"]["ties"] == "optimistic"
    assert set(result["optimistic"]["t2v"]["reranked"]) >= {"R@1", "R@5", "MdR", "protocol"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code = main(
        [
            "ablate",
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "abl"),
            "--init",
            checkpoint,
            "--epochs",
            "1",
            "--sweep",
            "head=listwise",
            "--cache-dir",
            str(cache),
            "--no-progress",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["head"] for row in rows] == ["symmetric", "listwise"]
    assert all(0 <= row["t2v"]["reranked"]["R@1"] <= 100 for row in rows)


def test_cli_bad_arguments_exit_2(synth_root, tmp_path, capsys, monkeypatch, tb_exit_code):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "three"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--head", "diagonal"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--v2t-protocol", "texts"])
    assert exc.value.code == 2
    assert (
        tb_exit_code(
            ["train", "--data", str(synth_root), "--out", str(tmp_path / "o"), "--epochs", "0"]
        )
        == 2
    )
    assert "--epochs: '0': must be an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o")]) == 2  # no --data
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--data", str(synth_root)]) == 2
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert (
        main(
            [
                "ablate",
                "--data",
                str(synth_root),
                "--out",
                str(tmp_path / "a"),
                "--sweep",
                "depth=3",
            ]
        )
        == 2
    )
    monkeypatch.setenv("TB_LR", "fast")
    assert main(["train", "--data", str(synth_root), "--out", str(tmp_path / "o")]) == 2
    assert "TB_LR" in capsys.readouterr().err


def test_parse_sweep():
    assert parse_sweep(["m=2,4", "k=5", "blocks=1,2", "head=listwise"]) == {
        "indicators": [2, 4],
        "top_k": [5],
        "fusion_blocks": [1, 2],
        "head": ["listwise"],
    }


@pytest.mark.parametrize("head", ["symmetric", "listwise"])
def test_score_matrices_ignore_padded_frames(head):
    """Issue 13 §2 in evaluation: videos of 5 real frames padded to T = 8 (repeats + mask)
    score as the unpadded videos, in both directions."""
    from tb_reranker.training.evaluate import score_matrices

    model = TokenBinder(TokenBinderConfig.tiny(head=head, top_k=4)).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.fusion.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    indicators = torch.nn.functional.normalize(torch.randn(9, 4, 64, generator=generator), dim=-1)
    tokens = torch.nn.functional.normalize(torch.randn(6, 5, 64, generator=generator), dim=-1)
    cls = model.pool_cls(tokens)
    padded = torch.cat([tokens, tokens[:, -1:].expand(-1, 3, -1)], dim=1)
    mask = torch.arange(8).expand(6, 8) < 5
    expected = score_matrices(model, indicators, cls, tokens, k=4, batch_size=4)
    got = score_matrices(model, indicators, cls, padded, k=4, batch_size=4, frames_mask=mask)
    unmasked = score_matrices(model, indicators, cls, padded, k=4, batch_size=4)
    assert not torch.allclose(unmasked["final"], expected["final"], atol=1e-4)
    for name in ("candidates", "candidates_v"):
        assert torch.equal(got[name], expected[name])
    for name in ("final", "final_v"):
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)

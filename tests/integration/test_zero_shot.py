"""``tb init``: a checkpoint that searches as plain CLIP does, before any TokenBinder training.

The CLIP weights are a tiny open_clip model saved to a local ``.safetensors`` file (offline).
The reference is computed with open_clip alone: ``encode_text`` for the query, ``encode_image``
over the frames our decoder samples, normalised and mean-pooled (CLIP4Clip's mean-pooling
baseline); search over real MP4 files ingested into Milvus Lite must give exactly its ranking.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tb_reranker.cli import main
from tb_reranker.model.config import TINY_CLIP_CFG

TEXTS = ["a red square moving right", "a blue square", "grey"]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, mp4_writer, tiny_clip) -> dict:
    root = tmp_path_factory.mktemp("zero_shot")
    weights = tiny_clip.save(root / "weights" / "tiny_clip.safetensors")
    videos = []
    for i, colour in enumerate(mp4_writer.colours[:5]):
        videos.append(mp4_writer(root / "videos" / f"v{i}.mp4", colour, frames=6 + 3 * i))
    return {"root": root, "weights": weights, "videos": videos, "clip": tiny_clip}


def test_init_writes_plain_clip(library: dict, capsys: pytest.CaptureFixture[str]) -> None:
    import open_clip

    from tb_reranker.model import load_checkpoint

    out = library["root"] / "zero-shot"
    code = main(
        ["init", "--config", "tiny", "--pretrained", str(library["weights"]), "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    assert "next: tb ingest" in capsys.readouterr().out
    model = load_checkpoint(out)
    assert model.config.broad_query == "clip"
    # the CLIP weights are the file's, bit for bit
    reference = library["clip"].build(seed=99)  # other random weights, then the file's
    open_clip.load_checkpoint(reference, str(library["weights"]))
    ours = {k.removeprefix("clip."): v for k, v in model.state_dict().items() if k[:5] == "clip."}
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)
    # indicator 1 is open_clip's encode_text feature, normalised
    tokens = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    with torch.no_grad():
        expected = F.normalize(reference.encode_text(tokens(TEXTS)), dim=-1)
        indicators = model.encode_text(TEXTS)
    torch.testing.assert_close(indicators[:, 0], expected, rtol=0, atol=2e-6)
    # the focused view starts at Δ = 0
    head_out = model.fusion.head[-1]
    assert not head_out.weight.any() and not head_out.bias.any()
    # an existing checkpoint is not overwritten without --force
    again = ["init", "--config", "tiny", "--pretrained", str(library["weights"]), "--out", str(out)]
    assert main(again) == 2 and "--force" in capsys.readouterr().err
    assert main([*again, "--force"]) == 0


def _clip_mean_pooling(library: dict, num_frames: int) -> dict[str, np.ndarray]:
    """Plain CLIP retrieval with open_clip alone: video id -> cosine with each of TEXTS."""
    import open_clip

    from tb_reranker.video import decode_video

    reference = library["clip"].build(seed=99)
    open_clip.load_checkpoint(reference, str(library["weights"]))
    tokens = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    with torch.no_grad():
        text = F.normalize(reference.encode_text(tokens(TEXTS)), dim=-1)  # [Q, D]
        scores = {}
        for path in library["videos"]:
            clip = decode_video(path, num_frames=num_frames, image_size=32)
            frames = F.normalize(reference.encode_image(torch.from_numpy(clip.frames)), dim=-1)
            weights = torch.from_numpy(clip.mask).float().unsqueeze(-1)
            video = F.normalize((frames * weights).sum(0) / weights.sum(), dim=-1)
            scores[path.stem] = (text @ video).numpy()
    return scores


def test_search_equals_clip_mean_pooling(library: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from tb_reranker import Client

    out = library["root"] / "zero-shot-search"
    assert (
        main(
            ["init", "--config", "tiny", "--pretrained", str(library["weights"]), "--out", str(out)]
        )
        == 0
    )
    num_frames = json.loads((out / "config.json").read_text())["config"]["num_frames"]
    expected = _clip_mean_pooling(library, num_frames)
    with Client(data_dir=str(library["root"] / "tb_data"), checkpoint=str(out)) as client:
        report = client.ingest([str(library["root"] / "videos")], progress=False)
        assert report.ingested == 5 and not report.failed
        for q, text in enumerate(TEXTS):
            for rerank in (True, False):
                hits = client.search(text, limit=5, rerank=rerank)
                order = sorted(expected, key=lambda i: -expected[i][q])
                assert [h.id for h in hits] == order, (text, rerank)
                for hit in hits:
                    assert hit.delta == 0.0 and hit.score == hit.broad_score
                    assert abs(hit.broad_score - float(expected[hit.id][q])) < 1e-4
                assert all(h.reranked for h in hits) == rerank

"""A new reranker does not force re-decoding the library: the collection and the frame store
record the *vision* fingerprint, so any checkpoint with the same vision side serves them as they
are, another vision side is refused with the commands that fix it, and collections written
before the split (whole-model fingerprint) are migrated by ``tb migrate``, never silently
accepted by a different model. Real MP4 files, Milvus Lite, LMDB, checkpoints on disk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tb_reranker.cli import main
from tb_reranker.errors import ModelMismatchError
from tb_reranker.model import TokenBinder, TokenBinderConfig, load_checkpoint, save_checkpoint


def _sharing_vision(source: TokenBinder, config: TokenBinderConfig) -> TokenBinder:
    """A model with ``source``'s vision tower and its own (different) query side."""
    model = TokenBinder(config)
    state = model.state_dict()
    state.update({k: v for k, v in source.state_dict().items() if k.startswith("clip.visual.")})
    model.load_state_dict(state)
    with torch.no_grad():  # a trained head: Δ != 0
        torch.manual_seed(1)
        model.fusion.head[-1].weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, mp4_writer) -> dict:
    root = tmp_path_factory.mktemp("identity")
    original = TokenBinder(TokenBinderConfig.tiny())
    retrained = _sharing_vision(original, TokenBinderConfig.tiny(num_indicators=3, seed=7))
    other_vision = TokenBinder(TokenBinderConfig.tiny(seed=11))
    assert retrained.vision_fingerprint() == original.vision_fingerprint()
    assert retrained.fingerprint() != original.fingerprint()
    assert other_vision.vision_fingerprint() != original.vision_fingerprint()
    paths = {}
    for name, model in (("a", original), ("b", retrained), ("c", other_vision)):
        paths[name] = save_checkpoint(model, root / f"ckpt_{name}")
    for i in range(3):
        mp4_writer(root / "videos" / f"clip{i}.mp4", mp4_writer.colours[i], frames=8 + 2 * i)
    return {"root": root, **paths}


def tb(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    """The CLI's one error line (log lines aside); fails unless there is exactly one."""
    lines = [line for line in err.splitlines() if line.startswith("tb ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _search(capsys, data_dir: Path, checkpoint: Path) -> tuple[int, list, str]:
    code, out, err = tb(
        capsys, "search", "a red square", "--json", "--data-dir", str(data_dir),
        "--checkpoint", str(checkpoint),
    )  # fmt: skip
    return code, (json.loads(out)[0]["hits"] if code == 0 else []), err


def test_a_retrained_query_side_serves_the_library_as_it_is(setup: dict, capsys) -> None:
    data_dir = setup["root"] / "data_new"
    videos = str(setup["root"] / "videos")
    code, out, err = tb(
        capsys, "ingest", videos, "--json", "--no-progress", "--data-dir", str(data_dir),
        "--checkpoint", str(setup["a"]),
    )  # fmt: skip
    assert code == 0 and json.loads(out)["ingested"] == 3, err
    # the retrained checkpoint: nothing to re-encode, and it searches with its own Δ
    code, out, _ = tb(
        capsys, "ingest", videos, "--json", "--no-progress", "--data-dir", str(data_dir),
        "--checkpoint", str(setup["b"]),
    )  # fmt: skip
    assert code == 0 and json.loads(out)["unchanged"] == 3 and json.loads(out)["ingested"] == 0
    code, hits, err = _search(capsys, data_dir, setup["b"])
    assert code == 0, err
    assert len(hits) == 3 and all(h["reranked"] for h in hits)
    assert any(h["delta"] != 0 for h in hits)
    # tb info tells which library a checkpoint can serve
    code, out, err = tb(
        capsys, "info", "--json", "--data-dir", str(data_dir), "--checkpoint", str(setup["b"])
    )
    assert code == 0, err
    info = json.loads(out)
    vision = load_checkpoint(setup["a"]).vision_fingerprint()
    assert info["model"]["vision_fingerprint"] == vision and info["collection"]["count"] == 3
    # another vision side: refused, in one line naming the commands that fix it
    code, hits, err = _search(capsys, data_dir, setup["c"])
    assert code == 2 and hits == []
    line = error_line(err)
    assert "vision" in line and "tb ingest" in line
    from tb_reranker import Client

    with (
        Client(data_dir=str(data_dir), checkpoint=str(setup["c"])) as client,
        pytest.raises(ModelMismatchError, match="--freeze-backbone"),
    ):
        client.search("a red square")
    # the frame store refuses too, even if a row were found
    from tb_reranker.rerank.local import Reranker
    from tb_reranker.stores import LmdbFrameStore

    with LmdbFrameStore(data_dir / "frames") as store:
        reranker = Reranker(load_checkpoint(setup["c"]), store)
        indicators = reranker.encode(["a red square"])
        with pytest.raises(ModelMismatchError, match="vision side"):
            reranker.rerank(indicators, [["clip0", "clip1"]])


def _legacy_library(setup: dict, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection and store as tb_reranker wrote them before the split: the collection's
    ``tb.fingerprint`` and every record carry the whole-model fingerprint."""
    from tb_reranker.index import ingest, schema
    from tb_reranker.index.milvus_index import VideoIndex
    from tb_reranker.stores import LmdbFrameStore

    model = load_checkpoint(setup["a"])
    whole = model.fingerprint()

    def old_properties(dim: int, fingerprint: str, version: int) -> dict[str, str]:
        return {
            schema.FINGERPRINT_PROPERTY: whole,
            schema.DIM_PROPERTY: str(dim),
            schema.SCHEMA_VERSION_PROPERTY: str(version),
        }

    def old_description(dim: int, fingerprint: str, version: int) -> str:
        meta = {"app": "tb_reranker", "schema_version": version, "dim": dim, "fingerprint": whole}
        return json.dumps(meta)

    monkeypatch.setattr(schema, "_properties", old_properties)
    monkeypatch.setattr(schema, "_description", old_description)
    with (
        VideoIndex(str(data_dir / "milvus.db"), collection="tb_videos") as index,
        LmdbFrameStore(data_dir / "frames") as store,
    ):
        index.bind(dim=model.embed_dim)
        index.create()
        report = ingest([str(setup["root"] / "videos")], model=model, index=index, store=store)
        assert report.ingested == 3
        records = store.get_many(store.list_ids())
        store.put_many({i: dataclasses.replace(r, fingerprint=whole) for i, r in records.items()})
        assert index.stored_identity() == schema.StoredIdentity("legacy", whole)
    monkeypatch.undo()


def test_a_legacy_collection_is_migrated_never_silently_accepted(
    setup: dict, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = setup["root"] / "data_legacy"
    _legacy_library(setup, data_dir, monkeypatch)
    where = ("--data-dir", str(data_dir))

    # the model that filled it still serves it, migrated or not
    code, hits, err = _search(capsys, data_dir, setup["a"])
    assert code == 0 and len(hits) == 3, err
    # a different model, even one sharing the vision side, is refused until migrated
    code, _, err = _search(capsys, data_dir, setup["b"])
    assert code == 2 and "tb migrate --checkpoint" in error_line(err)
    code, out, _ = tb(capsys, "collection", "check-schema", *where)
    assert code == 1 and "tb migrate" in out

    # tb migrate with a checkpoint that did not fill it: refused, nothing written
    code, _, err = tb(capsys, "migrate", "--checkpoint", str(setup["b"]), *where)
    assert code == 2 and "give `tb migrate` the checkpoint that filled it" in err
    code, out, _ = tb(capsys, "collection", "describe", *where)
    assert json.loads(out)["fingerprint_kind"] == "legacy"

    # with the checkpoint that filled it: verified, recorded, no vector touched
    code, out, err = tb(capsys, "migrate", "--checkpoint", str(setup["a"]), "--json", *where)
    assert code == 0, err
    report = json.loads(out)
    assert report["was"] == "legacy" and report["records_rewritten"] == 3 and report["changed"]
    vision = load_checkpoint(setup["a"]).vision_fingerprint()
    assert report["vision_fingerprint"] == vision
    code, out, _ = tb(capsys, "collection", "describe", *where)
    described = json.loads(out)
    assert described["fingerprint"] == vision and described["fingerprint_kind"] == "vision"
    assert described["row_count"] == 3
    code, out, _ = tb(capsys, "migrate", "--checkpoint", str(setup["a"]), *where)
    assert code == 0 and "nothing to do" in out
    code, out, _ = tb(capsys, "collection", "check-schema", *where)
    assert code == 0, out

    # now the retrained checkpoint serves it as it is; another vision side still may not
    code, hits, err = _search(capsys, data_dir, setup["b"])
    assert code == 0 and len(hits) == 3 and all(h["reranked"] for h in hits), err
    code, hits_a, _ = _search(capsys, data_dir, setup["a"])
    assert code == 0 and len(hits_a) == 3
    code, _, err = _search(capsys, data_dir, setup["c"])
    assert code == 2 and "vision" in err
    code, _, err = tb(capsys, "migrate", "--checkpoint", str(setup["c"]), *where)
    assert code == 2 and "already records vision model" in err

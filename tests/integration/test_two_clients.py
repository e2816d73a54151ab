"""Two ``Client(data_dir=D)`` in one process share the frame store's LMDB environment and the
Milvus Lite database (issue 20): both work, and closing one leaves the other working."""

from __future__ import annotations

import dataclasses

import pytest

from tb_reranker import Client
from tb_reranker.errors import StoreError
from tb_reranker.model import save_checkpoint
from tb_reranker.server.testing import build_tiny_components
from tb_reranker.stores import LmdbFrameStore


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tb_reranker.index import VideoIndex

    root = tmp_path_factory.mktemp("two_clients")
    components, ids = build_tiny_components(root, num_videos=8)
    model, store = components.reranker.model, components.reranker.store
    vision = model.vision_fingerprint()
    records = store.get_many(ids)
    store.put_many({i: dataclasses.replace(r, fingerprint=vision) for i, r in records.items()})
    save_checkpoint(model, root / "checkpoint")
    index = VideoIndex(
        str(root / "milvus.db"),
        dim=model.embed_dim,
        fingerprint=vision,
        model_fingerprint=model.fingerprint(),
    )
    index.create()
    index.upsert({"id": i, "cls": records[i].video_cls()} for i in ids)
    index.flush()
    index.close()
    store.close()
    return root


def _ids(client: Client) -> list[str]:
    return [hit.id for hit in client.search("a red square", limit=5)]


def test_two_clients_of_one_data_dir(data_dir):
    """Before: the second client's first search failed with StoreError "... is already open
    in this process"."""
    first = Client(data_dir=str(data_dir))
    second = Client(data_dir=str(data_dir))
    try:
        expected = _ids(first)
        assert _ids(second) == expected and len(expected) == 5
        first.close()
        assert _ids(second) == expected  # closing one does not close the other's store
        third = Client(data_dir=str(data_dir))
        second.close()
        assert _ids(third) == expected
        third.close()
    finally:
        first.close()
        second.close()


def test_stores_share_one_environment_and_close_it_with_the_last(data_dir):
    path = data_dir / "frames"
    a, b = LmdbFrameStore(path), LmdbFrameStore(path)
    assert len(a) == len(b) == 8
    a.close()
    a.close()  # twice: harmless, does not release b's reference
    assert len(b) == 8
    with pytest.raises(StoreError, match="closed"):
        len(a)
    b.close()
    c = LmdbFrameStore(path)  # opened afresh after the last one closed
    assert len(c) == 8
    c.close()

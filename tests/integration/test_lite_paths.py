"""Errors about a Milvus Lite database name it by its absolute path (issue 20).

Before: "does not exist at d1/milvus.db": relative to a working directory the reader may not
know, and (having no leading ./ or /) not scrubbed from the sidecar's error details either.
"""

from __future__ import annotations

import pytest

from tb_reranker.errors import NotFoundError


def test_missing_collection_names_the_absolute_database_path(tmp_path, monkeypatch):
    from tb_reranker.index import VideoIndex

    monkeypatch.chdir(tmp_path)
    index = VideoIndex("d1/milvus.db", collection="nowhere")
    try:
        with pytest.raises(NotFoundError) as caught:
            index.count()
    finally:
        index.close()
    assert f"at {tmp_path.resolve() / 'd1' / 'milvus.db'} " in str(caught.value)
    assert " d1/milvus.db" not in str(caught.value)


def test_sidecar_names_a_missing_database_by_its_absolute_path(tmp_path, monkeypatch):
    from tb_reranker.config import Settings
    from tb_reranker.server.app import _index_connector

    monkeypatch.chdir(tmp_path)
    connect = _index_connector(Settings(data_dir="d1").resolved(), lambda: ("", ""))
    with pytest.raises(NotFoundError) as caught:
        connect()
    assert f"database {tmp_path.resolve() / 'd1' / 'milvus.db'} does not exist" in str(caught.value)


def test_a_removed_database_is_never_searched_in_process(tmp_path):
    """Before: only the sidecar checked; an in-process reader (the SDK's ``Client``, ``tb
    search``) kept answering hits of a Lite database removed under it (``rm -rf``): Lite's
    server lives in the process and answers from memory. ``VideoIndex.search`` checks now."""
    import shutil

    import numpy as np

    from tb_reranker.index import VideoIndex

    path = tmp_path / "milvus.db"
    index = VideoIndex(str(path), dim=8, fingerprint="f" * 32)
    try:
        index.create()
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((4, 8)).astype(np.float32)
        index.upsert({"id": f"v{i}", "cls": v / np.linalg.norm(v)} for i, v in enumerate(vectors))
        index.flush()
        assert len(index.search(vectors[0], 3)[0]) == 3
        shutil.rmtree(path)
        with pytest.raises(NotFoundError, match="was removed"):
            index.search(vectors[0], 3)
    finally:
        index.close()

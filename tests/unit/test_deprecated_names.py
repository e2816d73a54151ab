"""The names issue 21 §3 moved or renamed still answer for old user code, with a
``DeprecationWarning`` the first time each is used, and are the very objects of their new places.

Each module is read in a fresh interpreter (a subprocess): "once per process" is only
observable from a clean start, and the warnings filter there is ``always``, so a second warning
would be counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tb_reranker import errors
from tb_reranker.wire import status

_PROBE = textwrap.dedent(
    """
    import importlib, json, sys, warnings
    warnings.simplefilter("always")
    old, new = importlib.import_module(sys.argv[1]), importlib.import_module(sys.argv[3])
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        value = getattr(old, sys.argv[2])
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        exec(f"from {sys.argv[1]} import {sys.argv[2]} as again_value")
        getattr(old, sys.argv[2])
    try:
        getattr(old, "NoSuchName")
        missing = "no error"
    except AttributeError as exc:
        missing = str(exc)
    print(json.dumps({
        "same": value is getattr(new, sys.argv[4]) and again_value is value,
        "first": [(w.category.__name__, str(w.message), w.filename) for w in first],
        "again": len(again),
        "missing": missing,
    }))
    """
)

MOVED = [
    ("tb_reranker.index", "FrameRecord", "tb_reranker.stores", "FrameRecord"),
    ("tb_reranker.index", "FrameStore", "tb_reranker.stores", "FrameStore"),
    ("tb_reranker.index", "LmdbFrameStore", "tb_reranker.stores", "LmdbFrameStore"),
    ("tb_reranker.index", "open_store", "tb_reranker.stores", "open_store"),
    ("tb_reranker.index", "validate_video_id", "tb_reranker.stores", "validate_video_id"),
    ("tb_reranker.rerank.backend", "InProcessBackend", "tb_reranker.rerank", "InProcessBackend"),
    ("tb_reranker.server.backend", "Backend", "tb_reranker.server.engine", "ServingEngine"),
    ("tb_reranker.server.backend", "Components", "tb_reranker.server.engine", "Components"),
    (
        "tb_reranker.server.backend",
        "ENCODE_CHUNK_TEXTS",
        "tb_reranker.server.engine",
        "ENCODE_CHUNK_TEXTS",
    ),
]


@pytest.mark.parametrize(("old", "name", "new", "new_name"), MOVED)
def test_a_moved_name_warns_once_and_is_the_new_object(old, name, new, new_name):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, old, name, new, new_name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["same"]
    assert len(seen["first"]) == 1, seen["first"]
    category, message, filename = seen["first"][0]
    assert category == "DeprecationWarning"
    assert f"{old}.{name} is deprecated" in message and new.split(".")[1] in message
    assert filename == "<string>"  # stacklevel: the warning names the caller's line
    assert seen["again"] == 0
    assert "NoSuchName" in seen["missing"]


def test_the_old_names_are_not_in_the_new_public_lists():
    import tb_reranker.index
    import tb_reranker.rerank.backend

    assert not {"FrameRecord", "open_store"} & set(tb_reranker.index.__all__)
    assert "InProcessBackend" not in tb_reranker.rerank.backend.__all__


def test_index_backend_error_is_the_index_unavailable_error():
    """Errors are public: ``except IndexBackendError`` still catches what the index raises, a
    sidecar that names the old class in its trailer still gives the typed error."""
    import tb_reranker

    assert errors.IndexBackendError is errors.IndexUnavailableError
    assert tb_reranker.IndexBackendError is tb_reranker.IndexUnavailableError
    with pytest.raises(errors.IndexBackendError):
        raise errors.IndexUnavailableError("Milvus is down")
    assert errors.IndexUnavailableError("down").retriable
    assert status.grpc_status_name(errors.IndexBackendError("down")) == "UNAVAILABLE"
    assert status.named_error("IndexUnavailableError") is errors.IndexUnavailableError
    assert status.named_error("IndexBackendError") is errors.IndexUnavailableError
    # the wire keeps the name older SDKs know (they have no IndexUnavailableError to resolve)
    assert status.wire_error_name(errors.IndexUnavailableError("down")) == "IndexBackendError"
    assert status.wire_error_name(errors.InvalidInputError("bad")) == "InvalidInputError"


def test_the_server_attribute_backend_is_the_engine():
    from tb_reranker.server.app import TBServer
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.engine import ServingEngine

    server = TBServer(ServerConfig(), load=lambda: None)  # type: ignore[arg-type, return-value]
    assert isinstance(server.engine, ServingEngine)
    with pytest.warns(DeprecationWarning, match="TBServer.backend is deprecated"):
        assert server.backend is server.engine

"""Session fixtures shared by every integration test.

``milvus_lite_uri``
    A fresh Milvus Lite database file path under a session temp dir (a URI that
    ``pymilvus.MilvusClient`` / ``VideoIndex`` accept). One file per session: use your own
    collection names (``unique_collection``) to keep tests apart.
``milvus_server_uri``
    ``http://127.0.0.1:<free port>`` of a real local Milvus 2.3.5 standalone server, started once
    per test session (under pytest-xdist: once per worker that runs a server test, each on its own
    free ports) by :class:`milvus_setup.launcher.LocalMilvus` and stopped at the end
    (start ≈ 5-10 s; skipped with the reason when the server cannot start, e.g. set
    ``TB_SKIP_MILVUS_SERVER=1``). No token (authorisation off).
``milvus_server``
    The :class:`milvus_setup.launcher.LocalMilvus` behind ``milvus_server_uri`` (its process, for
    tests that freeze it; such a test must leave it running).
``milvus_uri``
    Parametrised over both: ``"lite"`` and ``"server"`` (tests marked ``server`` for the latter).
``unique_collection``
    A collection name unique to the test (``t_<hash>``), dropped afterwards on both backends.
``mp4_writer``
    ``mp4_writer(path, colour, frames=10, size=32, fps=10) -> Path`` writes a tiny real MP4
    (PyAV, mpeg4: a coloured square moving over grey); ``mp4_writer.colours`` lists 6 colours.
``tiny_served``
    ``(root, ids)``: a tiny model's checkpoint (``root/checkpoint``) and a frame store of 8 videos
    (``root/frames``, ids ``vid-000..``) on disk, built once per session, for tests whose
    ``tb serve`` only reads them (``tb serve --checkpoint ... --store ...``).
``tiny_clip``
    ``tiny_clip.build(seed)`` is a tiny open_clip CLIP (``TINY_CLIP_CFG``, seeded random
    weights); ``tiny_clip.save(path, seed=3)`` writes its weights to a local ``.safetensors``
    file, the offline stand-in for downloaded CLIP weights (``tb init --pretrained FILE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def milvus_lite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("milvus_lite") / "milvus.db")


def _skip_or_fail(reason: str) -> None:
    """Skip locally; in CI (``CI=true``) a missing server is a failure, never a silent skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def milvus_server_uri(milvus_server) -> str:
    return str(milvus_server.uri)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if os.environ.get("TB_SKIP_MILVUS_SERVER"):
        pytest.skip("TB_SKIP_MILVUS_SERVER is set")
    try:
        from milvus_setup.launcher import LocalMilvus
    except ImportError as exc:  # pragma: no cover - the `milvus` dev dependency is missing
        _skip_or_fail(f"cannot import the Milvus launcher: {exc}")
    server = LocalMilvus(tmp_path_factory.mktemp("milvus_server"))
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - any start failure skips the server tests
        server.stop()
        _skip_or_fail(f"local Milvus server did not start: {exc}")
    log.info(
        "Milvus server for this session: %s (started in %.1f s)", server.uri, server.start_seconds
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.server)])
def milvus_uri(request: pytest.FixtureRequest) -> str:
    name = "milvus_lite_uri" if request.param == "lite" else "milvus_server_uri"
    return str(request.getfixturevalue(name))


@pytest.fixture
def unique_collection(request: pytest.FixtureRequest) -> Iterator[str]:
    name = "t_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    yield name
    uri = None
    for fixture in ("milvus_uri", "milvus_lite_uri", "milvus_server_uri"):
        if fixture in request.fixturenames:
            uri = request.getfixturevalue(fixture)
            break
    if uri is not None:
        from pymilvus import MilvusClient

        from tb_reranker.index.milvus_index import LITE_GRPC_OPTIONS
        from tb_reranker.index.schema import is_lite_uri

        options = {"grpc_options": LITE_GRPC_OPTIONS} if is_lite_uri(uri) else {}
        with contextlib.suppress(Exception):
            client = MilvusClient(uri=uri, **options)
            if client.has_collection(name):
                client.drop_collection(name)
            client.close()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tb_session")


@pytest.fixture(scope="session")
def tiny_served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from tb_reranker.model import save_checkpoint
    from tb_reranker.server.testing import build_tiny_components

    root = tmp_path_factory.mktemp("tiny_served")
    components, ids = build_tiny_components(root, num_videos=8)
    save_checkpoint(components.reranker.model, root / "checkpoint")
    components.reranker.store.close()
    return root, ids


class Mp4Writer:
    """Writes tiny real MP4 files with PyAV (see the module docstring)."""

    colours = [
        (230, 30, 30),
        (30, 200, 40),
        (40, 60, 220),
        (240, 220, 30),
        (200, 40, 200),
        (20, 200, 210),
    ]

    def __call__(
        self,
        path: Path,
        colour: tuple[int, int, int],
        *,
        frames: int = 10,
        size: int = 32,
        fps: int = 10,
    ) -> Path:
        import av

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for i in range(frames):
                image = np.full((size, size, 3), 96, dtype=np.uint8)
                x = (i * 3) % (size - 8)
                image[8:16, x : x + 8] = colour
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path


@pytest.fixture(scope="session")
def mp4_writer() -> Mp4Writer:
    return Mp4Writer()


class TinyClip:
    """A tiny open_clip CLIP and its weights file (see the module docstring)."""

    @staticmethod
    def build(seed: int = 3):
        import copy

        import torch
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        from tb_reranker.model.config import TINY_CLIP_CFG

        torch.manual_seed(seed)
        cfg = copy.deepcopy(TINY_CLIP_CFG)
        return CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
            text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        ).eval()

    def save(self, path: Path, seed: int = 3) -> Path:
        from safetensors.torch import save_file

        state = self.build(seed).state_dict()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path


@pytest.fixture(scope="session")
def tiny_clip() -> TinyClip:
    return TinyClip()

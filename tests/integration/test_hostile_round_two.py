"""Issue 20, round two, over real sockets: the sidecar's query-side check, tensor shapes that
cannot be, numbers at the edge, expired work never run, a long text never holding the device.

The world: two tiny checkpoints sharing the vision tower (one Milvus Lite collection and one
frame store serve both) with different query sides (text tower and indicators), a sidecar
serving the first.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker import Client
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.errors import InvalidInputError, ModelMismatchError
from tb_reranker.model import save_checkpoint
from tb_reranker.remote import RemoteReranker
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components
from tb_reranker.wire.convert import tensor_to_proto

HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TB = [sys.executable, "-m", "tb_reranker"]


@dataclasses.dataclass
class World:
    root: Path
    data_dir: Path  # checkpoint (the served one), frames, milvus.db: what `tb` finds by default
    other_checkpoint: Path  # same vision side, another query side
    ids: list[str]
    running: ServerThread


def _other_query_side(model):
    """A copy of ``model`` whose text side differs (indicators and a text-tower weight moved),
    the vision tower untouched: what `tb train --freeze-backbone` makes."""
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        other.text.indicators.add_(torch.randn(other.text.indicators.shape, generator=generator))
        other.text.ln_final.weight.mul_(1.5)
    return other


def _fill_collection(data_dir: Path, model, store, ids) -> None:
    from tb_reranker.index import VideoIndex

    index = VideoIndex(
        str(data_dir / "milvus.db"),
        collection="tb_videos",
        dim=model.embed_dim,
        fingerprint=model.vision_fingerprint(),
        model_fingerprint=model.fingerprint(),
    )
    index.create()
    records = store.get_many(ids)
    index.upsert(
        {"id": i, "cls": records[i].video_cls(), "content_hash": records[i].content_hash}
        for i in ids
    )
    index.flush()
    index.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("round_two")
    data_dir = root / "data"
    components, ids = build_tiny_components(data_dir, num_videos=16)
    model = components.reranker.model
    store = components.reranker.store
    records = store.get_many(ids)  # records that name the vision side (what ingest writes)
    vision = model.vision_fingerprint()
    store.put_many({i: dataclasses.replace(r, fingerprint=vision) for i, r in records.items()})
    save_checkpoint(model, data_dir / "checkpoint")
    other = _other_query_side(model)
    assert other.vision_fingerprint() == vision
    assert other.query_fingerprint() != model.query_fingerprint()
    save_checkpoint(other, root / "other")
    _fill_collection(data_dir, model, store, ids)
    config = ServerConfig(port=0, max_texts=256)
    with ServerThread(config, lambda: components) as running:
        yield World(root, data_dir, root / "other", ids, running)


# ---------------------------------------------------------------------- query side
def test_client_with_another_query_side_is_refused_not_reranked(world):
    """Before: hits marked reranked, scored by the sidecar's fusion on indicators of another
    text tower. Now: ModelMismatchError (strict or not: it is no outage to degrade over)."""
    for strict in (True, False):
        client = Client(
            data_dir=str(world.data_dir),
            checkpoint=str(world.other_checkpoint),
            reranker=world.running.target,
            strict=strict,
        )
        try:
            with pytest.raises(ModelMismatchError, match="query side"):
                client.search("a red square", limit=5)
        finally:
            client.close()


def test_client_with_the_served_query_side_still_reranks(world):
    client = Client(data_dir=str(world.data_dir), reranker=world.running.target, strict=True)
    try:
        hits = client.search("a red square", limit=5)
    finally:
        client.close()
    assert len(hits) == 5 and all(hit.reranked for hit in hits)


def test_query_fingerprint_on_the_wire(world):
    """The field: another fingerprint is FAILED_PRECONDITION, the server's own and an absent
    one (an older client) are served; a text query ignores it."""
    with grpc.insecure_channel(world.running.target) as channel:
        rerank = pb_grpc.RerankServiceStub(channel)
        info = pb_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=30)
        indicators = tensor_to_proto(np.eye(4, 64, dtype=np.float32))
        request = pb.RerankRequest(indicators=indicators, candidates_ids=world.ids[:4])
        assert len(rerank.Rerank(request, timeout=30).ranks) == 4  # absent: trusted
        request.query_fingerprint = info.query_fingerprint
        assert len(rerank.Rerank(request, timeout=30).ranks) == 4
        request.query_fingerprint = "0" * 64
        with pytest.raises(grpc.RpcError) as error:
            rerank.Rerank(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        text = pb.RerankRequest(text="a dog", candidates_ids=world.ids[:4], query_fingerprint="x")
        assert len(rerank.Rerank(text, timeout=30).ranks) == 4


@pytest.fixture(scope="module")
def other_sidecar(world):
    """A second sidecar on the same store, serving the checkpoint with the other query side:
    what a replica behind the same target serves halfway through a rolling upgrade."""
    from tb_reranker.model import load_checkpoint
    from tb_reranker.rerank import Reranker
    from tb_reranker.server.engine import Components

    store = world.running.server.engine.reranker.store
    model = load_checkpoint(world.other_checkpoint)
    components = Components(reranker=Reranker(model, store), device="cpu", dtype="float32")
    with ServerThread(ServerConfig(port=0), lambda: components) as running:
        yield running


def test_encode_response_names_its_query_side(world):
    """Before: EncodeResponse had no query_fingerprint, so indicators taken from Encode could
    not be checked when they came back."""
    with grpc.insecure_channel(world.running.target) as channel:
        info = pb_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=30)
        encoded = pb_grpc.EncodeServiceStub(channel).Encode(
            pb.EncodeRequest(texts=["a red square", "a blue circle"]), timeout=30
        )
    assert info.query_fingerprint and encoded.query_fingerprint == info.query_fingerprint


def test_sdk_encode_then_rerank_elsewhere_is_refused(world, other_sidecar):
    """Indicators from one sidecar's Encode, reranked by a sidecar with another query side:
    before, scored without a word (the SDK sent no fingerprint); now ModelMismatchError. Back
    to the sidecar that made them, or as a plain array (origin unknown), they are served."""
    ids = world.ids[:6]
    with (
        RemoteReranker(world.running.target) as here,
        RemoteReranker(other_sidecar.target) as there,
    ):
        indicators = here.encode(["a red square", "a blue circle"])
        assert indicators.query_fingerprint == here.info()["query_fingerprint"]
        assert len(here.rerank(indicators, [ids, ids])[1].candidates) == 6
        for sent in (indicators, indicators[1], indicators[1:]):  # views keep it
            with pytest.raises(ModelMismatchError, match="query side"):
                there.rerank(sent, [ids] * (2 if sent.ndim == 3 and len(sent) == 2 else 1))
        assert len(there.rerank(np.asarray(indicators[0]), [ids])[0].candidates) == 6
        with pytest.raises(ModelMismatchError):  # an explicit fingerprint still wins
            here.rerank(np.asarray(indicators[0]), [ids], query_fingerprint="0" * 64)


def test_remote_backend_carries_encode_fingerprint_to_rerank(world, other_sidecar):
    """``RemoteBackend`` without a local encoder (Encode and Rerank both on the sidecar): the
    TwoStageSearch path passes Encode's indicators (sliced per query) to Rerank."""
    from tb_reranker.remote import RemoteBackend
    from tb_reranker.requests import RerankRequest

    with (
        RemoteReranker(world.running.target) as here,
        RemoteReranker(other_sidecar.target) as there,
    ):
        indicators = RemoteBackend(here).encode(["a red square", "a dog", "a cat"])
        request = RerankRequest(
            indicators=indicators[[0, 2]],  # what the pipeline sends: the queries with rows
            candidates_ids=[world.ids[:4], world.ids[4:8]],
            broad_scores=[None, None],
            contents_hashes=[None, None],
        )
        assert [len(r.candidates) for r in RemoteBackend(here).rerank(request)] == [4, 4]
        with pytest.raises(ModelMismatchError, match="query side"):
            RemoteBackend(there).rerank(request)


def test_async_sdk_encode_then_rerank_elsewhere_is_refused(world, other_sidecar):
    import asyncio

    from tb_reranker.remote import AsyncRemoteReranker

    async def scenario() -> None:
        async with (
            AsyncRemoteReranker(world.running.target) as here,
            AsyncRemoteReranker(other_sidecar.target) as there,
        ):
            indicators = await here.encode(["a red square"])
            assert len((await here.rerank(indicators, [world.ids[:3]]))[0].candidates) == 3
            with pytest.raises(ModelMismatchError, match="query side"):
                await there.rerank(indicators, [world.ids[:3]])

    asyncio.run(scenario())


def test_tb_search_with_another_query_side_exits_2(world):
    """The user's path: `tb serve` serving one checkpoint, `tb search --checkpoint` another
    with the same vision side, as processes on the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    env["TB_SERVE_GRACE_S"] = "1"
    # a fresh data dir: this test process keeps the module's Milvus Lite database open
    data_dir = world.root / "cli_data"
    shutil.copytree(world.data_dir / "frames", data_dir / "frames")
    shutil.copytree(world.data_dir / "checkpoint", data_dir / "checkpoint")
    subprocess.run(
        [sys.executable, "-c", _FILL_SCRIPT, str(data_dir)], env=env, check=True, timeout=180
    )
    data = ["--data-dir", str(data_dir)]
    serve = subprocess.Popen(
        [*TB, "serve", "--port", "0", "--no-search", *data],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = _wait_for_port(serve)
        target = ["--reranker", f"127.0.0.1:{port}"]
        result = subprocess.run(
            [
                *TB,
                "search",
                "a red square",
                *data,
                *target,
                "--checkpoint",
                str(world.other_checkpoint),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("tb search: error:") and "query side" in lines[-1]
        assert "Traceback" not in result.stderr
        same = subprocess.run(
            [*TB, "search", "a red square", *data, *target, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert same.returncode == 0, same.stderr
        assert '"reranked": true' in same.stdout
    finally:
        serve.terminate()
        serve.wait(30)


_FILL_SCRIPT = """
import sys
from pathlib import Path
from tb_reranker.index import VideoIndex
from tb_reranker.stores import open_store
from tb_reranker.model import load_checkpoint
root = Path(sys.argv[1])
model = load_checkpoint(root / "checkpoint")
store = open_store(str(root / "frames"))
ids = list(store.list_ids())
records = store.get_many(ids)
index = VideoIndex(str(root / "milvus.db"), dim=model.embed_dim,
                   fingerprint=model.vision_fingerprint(), model_fingerprint=model.fingerprint())
index.create()
index.upsert({"id": i, "cls": records[i].video_cls()} for i in ids)
index.flush()
index.close()
store.close()
"""


def _wait_for_port(process: subprocess.Popen, timeout: float = 120) -> int:
    deadline, port, lines = time.monotonic() + timeout, None, []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else port
        if port is not None and "model ready" in line:
            return port
    raise AssertionError("tb serve did not come up:\n" + "".join(lines))


# ---------------------------------------------------------------------- shapes
def test_rerank_shape_with_huge_and_zero_dims_is_invalid_argument(world):
    """Before: [2^31, 2^31, 0] with no bytes passed the size check (product 0) and failed
    deeper as INTERNAL with a traceback."""
    with grpc.insecure_channel(world.running.target) as channel:
        rerank = pb_grpc.RerankServiceStub(channel)
        for shape in ([2**31, 2**31, 0], [0, 64], [1, 4, 0], [1] * 40):
            request = pb.RerankRequest(
                indicators=pb.FloatTensor(shape=shape, data=b""), candidates_ids=world.ids[:2]
            )
            with pytest.raises(grpc.RpcError) as error:
                rerank.Rerank(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape


@HYPOTHESIS
@given(
    shape=st.lists(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 4, 64]), max_size=12),
    values=st.integers(0, 300),
)
def test_any_tensor_shape_is_served_or_invalid_argument(world, shape, values):
    channel = grpc.insecure_channel(world.running.target)
    try:
        request = pb.RerankRequest(
            indicators=pb.FloatTensor(shape=shape, data=b"\0" * (4 * values)),
            candidates_ids=world.ids[:2],
        )
        try:
            pb_grpc.RerankServiceStub(channel).Rerank(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, exc.details())
    finally:
        channel.close()


# ---------------------------------------------------------------------- numbers at the edge
@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1, 1e300, True, "5"])
def test_remote_reranker_timeout_out_of_range_is_refused(world, timeout):
    """Before: inf/nan were accepted and every call failed at once with DeadlineExceeded."""
    with pytest.raises(InvalidInputError, match="timeout"):
        RemoteReranker(world.running.target, timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        Client(data_dir=str(world.data_dir), reranker=world.running.target, timeout=timeout)


@HYPOTHESIS
@given(timeout=st.floats(min_value=0.5, max_value=3600))
def test_remote_reranker_finite_timeouts_work(world, timeout):
    with RemoteReranker(world.running.target, timeout=timeout) as remote:
        assert remote.timeout == timeout
        assert remote.info()["embed_dim"] == 64


# ---------------------------------------------------------------------- expired work, long texts
def _random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(length))


def test_long_texts_are_cut_before_bpe_on_the_server(world, monkeypatch):
    """Before: 64 texts of 2,048 random letters kept the device thread ~15 s (BPE of each whole
    text; a concurrent Rerank waited behind it). The encoder reads at most context_length
    tokens: the server BPE-encodes only that part (every word handed to BPE is at most the
    bound long), with the same indicators as the model in process."""
    from tb_reranker.model import tokens

    seen: list[str] = []
    real_bpe = tokens.bpe

    def recording_bpe(ranks, word):
        seen.append(word)
        return real_bpe(ranks, word)

    monkeypatch.setattr(tokens, "bpe", recording_bpe)
    rng = random.Random(5)
    texts = [_random_word(rng, 2048) for _ in range(64)]
    model = world.running.server.engine.reranker.model
    with RemoteReranker(world.running.target, timeout=120) as remote:
        indicators = remote.encode(texts)
        result = remote.rerank(np.eye(4, 64, dtype=np.float32), [world.ids[:4]])
    assert len(result[0].candidates) == 4
    bound = (model.context_length - 1) * 32  # 32: the longest token of CLIP's vocabulary
    assert len(seen) >= 64, "the server's texts did not go through tokens.bpe"
    assert max(len(word) for word in seen) <= bound + len("</w>")
    assert max(len(word) for word in seen) < 2048  # the cut applied: the texts are longer
    with torch.inference_mode():
        local = model.encode_text(texts).numpy()
    np.testing.assert_allclose(indicators, local, atol=1e-5)


def test_a_long_encode_lets_a_rerank_run_between_its_chunks(world, monkeypatch):
    """Before: an Encode of max_texts texts was one device call (3-13 s of ViT-B/32 on 2 cores)
    and a Rerank arriving meanwhile waited for all of it. Now the texts go to the device
    ENCODE_CHUNK_TEXTS at a time and the Rerank runs between two chunks; the indicators are
    the same as in one piece. The first chunk is held until the Rerank waits on the device
    thread, so the order does not depend on timing."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tb_reranker.server.engine import ENCODE_CHUNK_TEXTS

    backend = world.running.server.engine
    order: list[tuple[str, int]] = []
    run_encode, run_rerank = backend.encode_batcher._run, backend.rerank_batcher._run
    encode_started = threading.Event()

    def encode(items):
        order.append(("encode", sum(len(texts) for texts in items)))
        if not encode_started.is_set():
            encode_started.set()
            waited = time.monotonic() + 60
            while backend._device_executor._work_queue.empty():  # the Rerank's batch
                assert time.monotonic() < waited, "the Rerank never reached the device thread"
                time.sleep(0.01)
        return run_encode(items)

    def rerank(items):
        order.append(("rerank", len(items)))
        return run_rerank(items)

    monkeypatch.setattr(backend.encode_batcher, "_run", encode)
    monkeypatch.setattr(backend.rerank_batcher, "_run", rerank)
    texts = [f"a video number {n} of a red square" for n in range(3 * ENCODE_CHUNK_TEXTS + 5)]
    with RemoteReranker(world.running.target, timeout=120) as remote, ThreadPoolExecutor(1) as pool:
        encoding = pool.submit(remote.encode, texts)
        assert encode_started.wait(60)
        result = remote.rerank(np.eye(4, 64, dtype=np.float32), [world.ids[:4]])
        indicators = encoding.result(120)
    assert len(result[0].candidates) == 4
    encodes = [n for kind, n in order if kind == "encode"]
    assert sum(encodes) == len(texts) and max(encodes) <= ENCODE_CHUNK_TEXTS
    assert order.index(("rerank", 1)) < len(order) - 1  # not after the whole Encode
    model = backend.reranker.model
    with torch.inference_mode():
        np.testing.assert_allclose(indicators, model.encode_text(texts).numpy(), atol=1e-5)

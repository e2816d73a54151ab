"""A tiny, real set-up for tests and benchmarks: a random-init TokenBinder + an LMDB frame store.

Everything is real (model, store on disk, ``Reranker``); only the weights are random and the
stored frame tokens are the model's own encoding of random frames, so the focused view sees
tokens of the kind ingest would write. Builds in about a second on a CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.server.engine import Components

__all__ = ["build_tiny_components", "tiny_records", "ServerThread"]


def tiny_records(model: Any, videos_ids: list[str], *, seed: int = 0) -> dict[str, Any]:
    """``FrameRecord`` per id: the model's frame tokens of random frames ``[T, 3, H, W]``."""
    import torch

    from tb_reranker.stores import FrameRecord

    generator = torch.Generator().manual_seed(seed)
    frames_count, size = int(model.num_frames), int(model.image_size)
    records: dict[str, Any] = {}
    batch = 16
    with torch.inference_mode():
        for start in range(0, len(videos_ids), batch):
            chunk = videos_ids[start : start + batch]
            frames = torch.rand(len(chunk), frames_count, 3, size, size, generator=generator)
            _, frames_tokens = model.encode_frames(frames)  # [B, T, D]
            for n, video_id in enumerate(chunk):
                records[video_id] = FrameRecord(
                    tokens=frames_tokens[n].float().cpu().numpy().astype(np.float16),
                    timestamps=np.arange(frames_count, dtype=np.float32) * 0.5,
                    content_hash=hashlib.sha256(video_id.encode()).hexdigest(),
                )
    return records


def build_tiny_components(
    directory: str | Path,
    *,
    num_videos: int = 24,
    seed: int = 0,
    cache_size: int = 4096,
    max_candidates: int = 1000,
    model_overrides: dict[str, Any] | None = None,
) -> tuple[Components, list[str]]:
    """A tiny model, ``num_videos`` stored videos ``vid-000..``, and the ``Reranker`` over them.

    Returns the components (no Milvus index) and the stored ids.
    """
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig
    from tb_reranker.rerank import Reranker
    from tb_reranker.stores import open_store

    torch.manual_seed(seed)
    model = TokenBinder(TokenBinderConfig.tiny(**(model_overrides or {}))).eval()
    _make_head_nonzero(model, seed)
    store = open_store(str(Path(directory) / "frames"))
    videos_ids = [f"vid-{n:03d}" for n in range(num_videos)]
    store.put_many(tiny_records(model, videos_ids, seed=seed))
    reranker = Reranker(model, store, cache_size=cache_size, max_candidates=max_candidates)
    return Components(reranker=reranker, device="cpu", dtype="float32"), videos_ids


def _make_head_nonzero(model: Any, seed: int) -> None:
    """The head's last layer is zero-initialised (Δ = 0, broad order); give it random weights so
    reranking visibly changes the order, as a trained model would."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 1 and torch.count_nonzero(parameter) == 0 and "head" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


class ServerThread:
    """A ``TBServer`` on its own event loop in a daemon thread, for synchronous callers.

    ``with ServerThread(config, load) as server: ... server.port ...``; ``start()`` returns once
    the ports are bound (``wait_ready=True``: once the model is loaded too).
    """

    def __init__(self, config: Any, load: Any, *, wait_ready: bool = True, **server_kwargs: Any):
        import asyncio
        import threading

        from tb_reranker.server.app import TBServer

        self._asyncio = asyncio
        self._wait_ready = wait_ready
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tb-server", daemon=True)
        self.server = TBServer(config, load, **server_kwargs)

    def run(self, coroutine: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return self._asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()
        self.run(self.server.start())
        if self._wait_ready:
            self.run(self.server.wait_ready(120), timeout=130)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 0.0) -> None:
        if self.thread.is_alive():
            self.run(self.server.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

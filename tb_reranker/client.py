"""The SDK: ``Client(...).search(text, rerank=True)`` over Milvus + the frame store + the reranker.

Defaults are embedded (Milvus Lite file, local LMDB store, in-process reranker, all under
``./tb_data``); every argument can also come from a ``TB_*`` variable (see ``Settings``).

Both modes run the one search pipeline, ``rerank.TwoStageSearch``, with another
``RerankBackend``: in process (``reranker="local"``), or remote (``reranker="host:port"``), where
the query is still encoded here when a checkpoint is available (the text tower is cheap and keeps
broad-only search alive when the sidecar is down), Milvus is searched from here, and the sidecar
reranks the candidates. If the sidecar cannot be reached, ``search`` returns the broad-only hits
marked ``reranked=False`` (logged once) unless ``strict=True``. Without a local checkpoint the
sidecar does all of it against its own collection (one hop: ``RemoteReranker.search``).

``Client`` is a facade: it checks the arguments once (``tb_reranker.requests``), makes one call
and returns what it got.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tb_reranker.config import Settings
from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.requests import DEFAULT_MOMENTS_PER_VIDEO, Limits, SearchRequest
from tb_reranker.types import Hit

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.index import VideoIndex
    from tb_reranker.model import TokenBinder
    from tb_reranker.remote import RemoteReranker
    from tb_reranker.rerank.backend import RerankBackend
    from tb_reranker.rerank.local import Reranker
    from tb_reranker.rerank.pipeline import TwoStageSearch
    from tb_reranker.stores import FrameStore

__all__ = ["Client", "AsyncClient"]

log = logging.getLogger(__name__)


class Client:
    """Text-to-video search with TokenBinder reranking on Milvus.

    Args:
        uri: Milvus URI: a file path (Milvus Lite) or ``http://host:19530``.
        token: Milvus token (``user:password`` or API key).
        collection: collection name.
        store: frame-token store: a directory or ``s3://bucket/prefix``.
        checkpoint: TokenBinder checkpoint directory (``save_checkpoint`` output).
        reranker: ``"local"`` (in-process) or ``"host:port"`` of a ``tb serve`` sidecar.
        reranker_token: bearer token for the sidecar.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        timeout: default deadline (seconds) for remote calls.
        strict: in remote mode, raise instead of degrading to broad-only results.
        data_dir: root of the embedded defaults.
        model: an already loaded ``TokenBinder`` (skips ``checkpoint``).
        query_cache_size: encoded query texts kept in an LRU keyed by text and the text side's
            model fingerprint (``TB_QUERY_CACHE_SIZE``, default 1024); 0 turns it off.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        token: str | None = None,
        collection: str | None = None,
        store: str | None = None,
        checkpoint: str | None = None,
        reranker: str | None = None,
        reranker_token: str | None = None,
        device: str | None = None,
        timeout: float | None = None,
        strict: bool = False,
        data_dir: str | None = None,
        model: TokenBinder | None = None,
        query_cache_size: int | None = None,
    ) -> None:
        self.settings = Settings.from_env(
            data_dir=data_dir,
            milvus_uri=uri,
            milvus_token=token,
            collection=collection,
            store=store,
            checkpoint=checkpoint,
            reranker=reranker,
            reranker_token=reranker_token,
            device=device,
            timeout=timeout,
            query_cache_size=query_cache_size,
        )
        from tb_reranker.rerank.query_cache import QueryCache

        self.query_cache = QueryCache(self.settings.query_cache_size)
        self.strict = strict
        if self.is_remote:  # a malformed target is a configuration error now, not a retry later
            from tb_reranker.auth import check_token
            from tb_reranker.remote import check_target

            check_target(self.settings.reranker)
            check_token(self.settings.reranker_token, what="the reranker token")
        self._model = model
        self._store: FrameStore | None = None
        self._index: VideoIndex | None = None
        self._reranker: Reranker | None = None
        self._remote: RemoteReranker | None = None
        self._pipeline: TwoStageSearch | None = None
        self._limits = Limits.sdk()

    # ------------------------------------------------------------------ lazy parts
    @property
    def is_remote(self) -> bool:
        return self.settings.reranker not in ("", "local")

    @property
    def model(self) -> TokenBinder:
        if self._model is None:
            path = Path(self.settings.checkpoint)
            if not (path / "config.json").exists():
                raise NotFoundError(
                    f"no TokenBinder checkpoint at {path} (train one with `tb train`, "
                    "or run `tb demo`, or pass checkpoint=...)"
                )
            from tb_reranker.model import load_checkpoint, resolve_device

            self._model = load_checkpoint(
                path, device=resolve_device(self.settings.device), inference=True
            )
        return self._model

    @property
    def store(self) -> FrameStore:
        if self._store is None:
            from tb_reranker.stores import open_store

            self._store = open_store(self.settings.store)
        return self._store

    @property
    def index(self) -> VideoIndex:
        if self._index is None:
            from tb_reranker.index import VideoIndex

            model = self.model
            self._index = VideoIndex(
                self.settings.milvus_uri,
                token=self.settings.milvus_token,
                collection=self.settings.collection,
                dim=model.embed_dim,
                fingerprint=model.vision_fingerprint(),
                model_fingerprint=model.fingerprint(),
            )
        return self._index

    @property
    def reranker(self) -> Reranker:
        if self._reranker is None:
            from tb_reranker.rerank.local import Reranker

            self._reranker = Reranker(self.model, self.store)
        return self._reranker

    @property
    def remote(self) -> RemoteReranker:
        if self._remote is None:
            from tb_reranker.remote import RemoteReranker

            self._remote = RemoteReranker(
                self.settings.reranker,
                token=self.settings.reranker_token or None,
                timeout=self.settings.timeout,
            )
        return self._remote

    # ------------------------------------------------------------------ verbs
    def ingest(self, paths: str | Path | Iterable[str | Path], **options: Any) -> Any:
        """Decode, encode and store videos (files, directories, globs or ``@list.txt``).

        ``engine="ray"`` (``ray_address=...``, ``encode_actors=...``: see ``IngestOptions``)
        decodes and encodes on Ray, each encode actor loading this client's checkpoint.
        Returns the ``IngestReport`` (ingested, unchanged, failed with reasons, videos/s).
        """
        from tb_reranker.index import ingest

        if isinstance(paths, (str, Path)):
            paths = [paths]
        if options.get("engine") == "ray":  # the actors load the model from its directory
            from tb_reranker.index.ray_ingest import check_ray

            check_ray(options.get("ray_address"))  # the extra and the address, before the model
            options.setdefault("checkpoint", str(Path(self.settings.checkpoint).resolve()))
            options.setdefault("device", self.settings.device or "auto")
        report = ingest(  # checks the options, then creates the collection if needed
            [str(p) for p in paths], model=self.model, index=self.index, store=self.store, **options
        )
        if self._reranker is not None:
            self._reranker.invalidate()
        return report

    def search(
        self,
        text: str,
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        *,
        group: str = "video",
        moments_per_video: int = DEFAULT_MOMENTS_PER_VIDEO,
    ) -> list[Hit]:
        """Hits for one query text, best first (see ``Hit``).

        ``group="video"``: ``limit`` counts videos; each hit is a video, ranked by its best
        moment (segment), with that moment's span (``start_s``, ``end_s``) and its best
        ``moments_per_video`` (1..16) scored moments. ``group="moment"``: ``limit`` counts
        moments; each hit is one moment (``id`` its video's). ``filter`` is a Milvus expression
        over the row fields; ``'video_id == "clip01"'`` searches inside one video.
        """
        if not isinstance(text, str):
            raise InvalidInputError("text must be a string (use search_many for several)")
        return self.search_many(
            [text],
            limit=limit,
            rerank=rerank,
            filter=filter,
            group=group,
            moments_per_video=moments_per_video,
        )[0]

    def search_many(
        self,
        texts: Sequence[str],
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        *,
        group: str = "video",
        moments_per_video: int = DEFAULT_MOMENTS_PER_VIDEO,
    ) -> list[list[Hit]]:
        """Batch search: one list of hits per query text, encoded and reranked together
        (arguments as in :meth:`search`)."""
        request = SearchRequest.build(
            texts,
            limit=limit,
            rerank=rerank,
            filter=filter,
            group=group,
            moments_per_video=moments_per_video,
            limits=self._limits,
            texts_only=True,
        )
        if self.is_remote and not self._has_local_model():
            return self.remote.search_request(request)  # one hop: the sidecar does it all
        return self.pipeline.run(request)

    @property
    def pipeline(self) -> TwoStageSearch:
        """The two-stage search over this client's index and reranker backend."""
        if self._pipeline is None:
            from tb_reranker.rerank.pipeline import TwoStageSearch

            self._pipeline = TwoStageSearch(
                self.index,
                self._backend(),
                limits=self._limits,
                degrade=self.is_remote and not self.strict,
                query_cache=self.query_cache,
            )
        return self._pipeline

    def _has_local_model(self) -> bool:
        return self._model is not None or (Path(self.settings.checkpoint) / "config.json").exists()

    def _backend(self) -> RerankBackend:
        from tb_reranker.rerank.in_process import InProcessBackend
        from tb_reranker.rerank.model_info import ModelInfo, encode_texts, query_fingerprint

        if not self.is_remote:
            return InProcessBackend(self.reranker)
        from tb_reranker.remote import RemoteBackend

        model = self.model
        return RemoteBackend(
            self.remote,
            encode=functools.partial(encode_texts, model),
            info=ModelInfo.of(model),
            fingerprint=functools.partial(query_fingerprint, model),
        )

    def delete(self, ids: Sequence[str], *, missing_ok: bool = True) -> int:
        """Remove videos from the store, then from Milvus. Returns how many were removed (ids
        found in neither are not counted; logged). ``missing_ok=False``: raise NotFoundError
        naming them, and delete nothing, when any id is unknown."""
        return len(self.delete_report(ids, missing_ok=missing_ok).deleted)

    def delete_report(self, ids: Sequence[str], *, missing_ok: bool = True) -> Any:
        """``delete`` returning the ``DeleteReport`` (``deleted`` and ``not_found`` ids)."""
        from tb_reranker.index import delete
        from tb_reranker.stores import validate_video_id

        if isinstance(ids, str):
            ids = [ids]
        ids = [validate_video_id(i) for i in ids]
        if not missing_ok:
            known = set(self.index.get(ids))
            unknown = [i for i in ids if i not in known and not self.store.contains(i)]
            if unknown:
                raise NotFoundError(
                    f"{len(unknown)} video ids not found (nothing deleted): "
                    + ", ".join(unknown[:10])
                    + (" ..." if len(unknown) > 10 else "")
                )
        report = delete(ids, index=self.index, store=self.store)
        if report.not_found:
            log.info("delete: %d ids not found: %s", len(report.not_found), report.not_found[:10])
        if self._reranker is not None:
            self._reranker.invalidate(ids)
        return report

    def check(self, repair: bool = False) -> Any:
        """Find (and with ``repair=True`` fix) disagreement between Milvus and the store."""
        from tb_reranker.index import check

        return check(self.index, self.store, repair=repair)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._index is not None and hasattr(self._index, "close"):
            self._index.close()
        if self._remote is not None and hasattr(self._remote, "close"):
            self._remote.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of ``Client``: the same verbs, run off the event loop's thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._client = Client(*args, **kwargs)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(
            functools.partial(getattr(self._client, name), *args, **kwargs)
        )

    async def ingest(self, paths: Any, **options: Any) -> Any:
        return await self._call("ingest", paths, **options)

    async def search(
        self,
        text: str,
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        **options: Any,
    ) -> list[Hit]:
        """``Client.search`` (``options``: ``group``, ``moments_per_video``)."""
        return await self._call(
            "search", text, limit=limit, rerank=rerank, filter=filter, **options
        )

    async def search_many(
        self,
        texts: Sequence[str],
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        **options: Any,
    ) -> list[list[Hit]]:
        """``Client.search_many`` (``options``: ``group``, ``moments_per_video``)."""
        return await self._call(
            "search_many", texts, limit=limit, rerank=rerank, filter=filter, **options
        )

    async def delete(self, ids: Sequence[str]) -> int:
        return await self._call("delete", ids)

    async def check(self, repair: bool = False) -> Any:
        return await self._call("check", repair=repair)

    async def close(self) -> None:
        await self._call("close")

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

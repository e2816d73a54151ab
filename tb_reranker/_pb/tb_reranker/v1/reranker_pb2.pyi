from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CandidatesAre(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATES_ARE_UNSPECIFIED: _ClassVar[CandidatesAre]
    CANDIDATES_ARE_VIDEO: _ClassVar[CandidatesAre]
    CANDIDATES_ARE_SEGMENT: _ClassVar[CandidatesAre]

class MissingReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISSING_REASON_UNSPECIFIED: _ClassVar[MissingReason]
    MISSING_REASON_NOT_IN_STORE: _ClassVar[MissingReason]

class SearchGroup(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_GROUP_UNSPECIFIED: _ClassVar[SearchGroup]
    SEARCH_GROUP_VIDEO: _ClassVar[SearchGroup]
    SEARCH_GROUP_MOMENT: _ClassVar[SearchGroup]
CANDIDATES_ARE_UNSPECIFIED: CandidatesAre
CANDIDATES_ARE_VIDEO: CandidatesAre
CANDIDATES_ARE_SEGMENT: CandidatesAre
MISSING_REASON_UNSPECIFIED: MissingReason
MISSING_REASON_NOT_IN_STORE: MissingReason
SEARCH_GROUP_UNSPECIFIED: SearchGroup
SEARCH_GROUP_VIDEO: SearchGroup
SEARCH_GROUP_MOMENT: SearchGroup

class FloatTensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("queue_ns", "encode_ns", "fetch_ns", "fusion_ns", "total_ns", "batch_size")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    FETCH_NS_FIELD_NUMBER: _ClassVar[int]
    FUSION_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    encode_ns: int
    fetch_ns: int
    fusion_ns: int
    total_ns: int
    batch_size: int
    def __init__(self, queue_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., fetch_ns: _Optional[int] = ..., fusion_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("indicators", "model_fingerprint", "metadata", "query_fingerprint")
    INDICATORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    QUERY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    indicators: FloatTensor
    model_fingerprint: str
    metadata: Metadata
    query_fingerprint: str
    def __init__(self, indicators: _Optional[_Union[FloatTensor, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., metadata: _Optional[_Union[Metadata, _Mapping]] = ..., query_fingerprint: _Optional[str] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("text", "indicators", "candidates_ids", "broad_scores", "top_n", "strict", "contents_hashes", "query_fingerprint", "candidates_are")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDICATORS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_IDS_FIELD_NUMBER: _ClassVar[int]
    BROAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    CONTENTS_HASHES_FIELD_NUMBER: _ClassVar[int]
    QUERY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_ARE_FIELD_NUMBER: _ClassVar[int]
    text: str
    indicators: FloatTensor
    candidates_ids: _containers.RepeatedScalarFieldContainer[str]
    broad_scores: _containers.RepeatedScalarFieldContainer[float]
    top_n: int
    strict: bool
    contents_hashes: _containers.RepeatedScalarFieldContainer[str]
    query_fingerprint: str
    candidates_are: CandidatesAre
    def __init__(self, text: _Optional[str] = ..., indicators: _Optional[_Union[FloatTensor, _Mapping]] = ..., candidates_ids: _Optional[_Iterable[str]] = ..., broad_scores: _Optional[_Iterable[float]] = ..., top_n: _Optional[int] = ..., strict: _Optional[bool] = ..., contents_hashes: _Optional[_Iterable[str]] = ..., query_fingerprint: _Optional[str] = ..., candidates_are: _Optional[_Union[CandidatesAre, str]] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("id", "index", "score", "broad_score", "delta", "best_frame_s", "reranked", "start_s", "end_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BROAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BEST_FRAME_S_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    score: float
    broad_score: float
    delta: float
    best_frame_s: float
    reranked: bool
    start_s: float
    end_s: float
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., score: _Optional[float] = ..., broad_score: _Optional[float] = ..., delta: _Optional[float] = ..., best_frame_s: _Optional[float] = ..., reranked: _Optional[bool] = ..., start_s: _Optional[float] = ..., end_s: _Optional[float] = ...) -> None: ...

class MissingCandidate(_message.Message):
    __slots__ = ("id", "index", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    index: int
    reason: MissingReason
    def __init__(self, id: _Optional[str] = ..., index: _Optional[int] = ..., reason: _Optional[_Union[MissingReason, str]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("videos_ids", "all")
    VIDEOS_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    videos_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, videos_ids: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("ranks", "missing", "metadata")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    missing: _containers.RepeatedCompositeFieldContainer[MissingCandidate]
    metadata: Metadata
    def __init__(self, ranks: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., missing: _Optional[_Iterable[_Union[MissingCandidate, _Mapping]]] = ..., metadata: _Optional[_Union[Metadata, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "indicators", "limit", "rerank", "filter", "query_fingerprint", "group", "moments_per_video")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDICATORS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_PER_VIDEO_FIELD_NUMBER: _ClassVar[int]
    text: str
    indicators: FloatTensor
    limit: int
    rerank: bool
    filter: str
    query_fingerprint: str
    group: SearchGroup
    moments_per_video: int
    def __init__(self, text: _Optional[str] = ..., indicators: _Optional[_Union[FloatTensor, _Mapping]] = ..., limit: _Optional[int] = ..., rerank: _Optional[bool] = ..., filter: _Optional[str] = ..., query_fingerprint: _Optional[str] = ..., group: _Optional[_Union[SearchGroup, str]] = ..., moments_per_video: _Optional[int] = ...) -> None: ...

class Moment(_message.Message):
    __slots__ = ("start_s", "end_s", "score", "broad_score")
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BROAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    start_s: float
    end_s: float
    score: float
    broad_score: float
    def __init__(self, start_s: _Optional[float] = ..., end_s: _Optional[float] = ..., score: _Optional[float] = ..., broad_score: _Optional[float] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "broad_score", "delta", "rank", "reranked", "broad_rank", "best_frame_s", "metadata_json", "start_s", "end_s", "moments")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BROAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    BROAD_RANK_FIELD_NUMBER: _ClassVar[int]
    BEST_FRAME_S_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    broad_score: float
    delta: float
    rank: int
    reranked: bool
    broad_rank: int
    best_frame_s: float
    metadata_json: str
    start_s: float
    end_s: float
    moments: _containers.RepeatedCompositeFieldContainer[Moment]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., broad_score: _Optional[float] = ..., delta: _Optional[float] = ..., rank: _Optional[int] = ..., reranked: _Optional[bool] = ..., broad_rank: _Optional[int] = ..., best_frame_s: _Optional[float] = ..., metadata_json: _Optional[str] = ..., start_s: _Optional[float] = ..., end_s: _Optional[float] = ..., moments: _Optional[_Iterable[_Union[Moment, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "metadata")
    HITS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    metadata: Metadata
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., metadata: _Optional[_Union[Metadata, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_candidates", "max_text_chars", "max_texts", "max_batch", "max_wait_ms", "max_concurrency", "max_message_bytes")
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_candidates: int
    max_text_chars: int
    max_texts: int
    max_batch: int
    max_wait_ms: int
    max_concurrency: int
    max_message_bytes: int
    def __init__(self, max_candidates: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_texts: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("hits", "misses", "size", "capacity", "hit_rate")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    size: int
    capacity: int
    hit_rate: float
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., size: _Optional[int] = ..., capacity: _Optional[int] = ..., hit_rate: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("server_version", "api_version", "torch_version", "grpc_version", "model_fingerprint", "embed_dim", "num_indicators", "top_k", "num_frames", "device", "dtype", "batching", "search_enabled", "limits", "cache", "vision_fingerprint", "query_fingerprint")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRPC_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_INDICATORS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    SEARCH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    VISION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    QUERY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    api_version: str
    torch_version: str
    grpc_version: str
    model_fingerprint: str
    embed_dim: int
    num_indicators: int
    top_k: int
    num_frames: int
    device: str
    dtype: str
    batching: bool
    search_enabled: bool
    limits: Limits
    cache: CacheStats
    vision_fingerprint: str
    query_fingerprint: str
    def __init__(self, server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., grpc_version: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., embed_dim: _Optional[int] = ..., num_indicators: _Optional[int] = ..., top_k: _Optional[int] = ..., num_frames: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., batching: _Optional[bool] = ..., search_enabled: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., vision_fingerprint: _Optional[str] = ..., query_fingerprint: _Optional[str] = ...) -> None: ...

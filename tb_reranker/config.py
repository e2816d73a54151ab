"""Runtime settings: frozen dataclasses filled from arguments, then ``TB_*`` variables, then defaults.

Defaults are the embedded set-up (docs/architecture.md): a Milvus Lite database + local frame-token
store under ``./tb_data`` + the in-process reranker.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tb_reranker.numbers import COUNT, POSITIVE_INT, SECONDS

__all__ = ["Settings", "env"]

ENV_PREFIX = "TB_"

# the numeric settings: finite and in range (TB_TIMEOUT=inf is an error, not "no deadline")
_BOUNDS = {"top_k": POSITIVE_INT, "query_cache_size": COUNT, "timeout": SECONDS}


def env(name: str, default: str | None = None) -> str | None:
    """``TB_<NAME>`` from the environment (empty strings count as unset)."""
    value = os.environ.get(ENV_PREFIX + name.upper())
    return value if value not in (None, "") else default


def fields_from_env(
    cls: type,
    overrides: dict[str, Any],
    prefix: str,
    parse: Callable[[str, str, type], Any],
    what: str,
) -> dict[str, Any]:
    """Arguments for the dataclass ``cls``: each field from ``overrides`` when given (not
    None), else from ``TB_<prefix><FIELD>`` read by ``parse(name, raw, type of the default)``,
    else left out (its default). ``TypeError`` names the ``overrides`` ``cls`` has no field for."""
    unknown = set(overrides) - {f.name for f in fields(cls)}
    if unknown:
        raise TypeError(f"unknown {what}: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        given = overrides.get(f.name)
        if given is not None:
            values[f.name] = given
            continue
        raw = env(prefix + f.name)
        if raw is not None:
            values[f.name] = parse(f.name, raw, type(f.default))
    return values


def _parse_plain(name: str, raw: str, kind: type) -> Any:
    """A ``TB_*`` value as the field's type (strings as they are); a number out of range or
    unreadable is ``InvalidInputError`` naming the variable."""
    if name not in _BOUNDS:
        return raw if kind is str else kind(raw)
    from tb_reranker.errors import InvalidInputError

    try:
        return _BOUNDS[name].parse(raw)
    except ValueError as exc:
        raise InvalidInputError(f"{ENV_PREFIX}{name.upper()}={exc}") from None


@dataclass(frozen=True)
class Settings:
    """Where data lives and which services to use. Every field reads ``TB_<FIELD>``."""

    data_dir: str = "./tb_data"  # root for the embedded defaults below
    milvus_uri: str = ""  # file path (Milvus Lite) or http://host:19530; "" = <data_dir>/milvus.db
    milvus_token: str = ""  # "user:password" or API key for a Milvus server
    collection: str = "tb_videos"  # Milvus collection name
    store: str = ""  # frame store: LMDB dir or s3://bucket/prefix; "" = <data_dir>/frames
    checkpoint: str = ""  # TokenBinder checkpoint directory; "" = <data_dir>/checkpoint
    reranker: str = "local"  # "local" (in-process) or "host:port" of a gRPC sidecar
    reranker_token: str = ""  # bearer token for the sidecar
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    top_k: int = 10  # K: candidates the focused view compares jointly
    query_cache_size: int = 1024  # encoded query texts kept (LRU, ~6 KiB each); 0 = off
    timeout: float = 30.0  # seconds, default deadline of remote calls

    def __post_init__(self) -> None:
        for name, bound in _BOUNDS.items():
            object.__setattr__(self, name, bound.check(getattr(self, name), name))

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Arguments win over ``TB_*`` variables, which win over defaults. ``None`` = not given."""
        values = fields_from_env(cls, overrides, "", _parse_plain, "settings")
        return cls(**values).resolved()

    def resolved(self) -> Settings:
        """Fill the empty paths from ``data_dir``."""
        root = Path(self.data_dir)
        return replace(
            self,
            milvus_uri=self.milvus_uri or str(root / "milvus.db"),
            store=self.store or str(root / "frames"),
            checkpoint=self.checkpoint or str(root / "checkpoint"),
        )

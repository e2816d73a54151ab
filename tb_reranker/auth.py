"""Bearer tokens: one rule for the server (``tb serve --token/--token-file``) and the SDK.

A token is trimmed of surrounding whitespace (a token file usually ends in a newline) and must
then be visible ASCII (``!`` to ``~``), the characters an HTTP ``Authorization`` header and gRPC
metadata carry unchanged. ``None`` or ``""`` means "no token"; a value that is *only*
whitespace is an error, never "auth off".
"""

from __future__ import annotations

from pathlib import Path

from tb_reranker.errors import InvalidInputError

__all__ = ["check_token", "read_token_file"]


def check_token(token: str | None, *, what: str = "token") -> str:
    """The trimmed token ("" for none); ``InvalidInputError`` for a blank or unsendable one."""
    if token is None or token == "":
        return ""
    if not isinstance(token, str):
        raise InvalidInputError(f"{what} must be a string, got {type(token).__name__}")
    trimmed = token.strip()
    if not trimmed:
        raise InvalidInputError(
            f"{what} is blank (only whitespace); give a real token, or none to turn auth off"
        )
    bad = sorted({c for c in trimmed if not "!" <= c <= "~"})
    if bad:
        raise InvalidInputError(
            f"{what} contains {len(bad)} character(s) a bearer token cannot carry "
            f"(e.g. {bad[0]!r}): use visible ASCII without spaces"
        )
    return trimmed


def read_token_file(path: str | Path) -> str:
    """The token in ``path``: its one non-blank line. An empty or blank file, or several
    non-blank lines, is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInputError(f"cannot read a token from {path}: {reason}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInputError(f"token file {path} is empty or blank; refusing to turn auth off")
    if len(lines) > 1:
        raise InvalidInputError(f"token file {path} holds {len(lines)} lines; put one token in it")
    return check_token(lines[0], what=f"the token in {path}")

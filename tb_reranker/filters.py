"""Cheap checks of a Milvus filter expression before it reaches Milvus.

A filter is the caller's text: it is bounded in length and nesting (a 5.9 MB ``id in [...]``
costs Milvus seconds of CPU; 5,000 nested parentheses overflow Milvus Lite's recursive parser)
and checked for balanced brackets and terminated string literals, so that the common mistakes
are reported as :class:`InvalidInputError` naming the position, without a round trip. Whatever
passes here may still be rejected by Milvus's own parser; that error is mapped to
``InvalidInputError`` too (see ``tb_reranker.index.milvus_index``).
"""

from __future__ import annotations

from typing import Any

from tb_reranker.errors import InvalidInputError

__all__ = ["check_filter", "MAX_FILTER_CHARS", "MAX_FILTER_DEPTH"]

MAX_FILTER_CHARS = 16384  # default length limit of a filter expression (characters)
MAX_FILTER_DEPTH = 32  # default limit of nested (), [] and {} in a filter expression

_CLOSING = {")": "(", "]": "[", "}": "{"}


def check_filter(
    filter: Any,  # noqa: A002 - Milvus's name
    *,
    max_chars: int = MAX_FILTER_CHARS,
    max_depth: int = MAX_FILTER_DEPTH,
) -> str | None:
    """``filter`` when it is ``None``/``""`` (→ ``None``) or a plausible expression, else raise.

    One linear pass: type, length, control characters, string literals closed, brackets
    balanced and nested at most ``max_depth`` deep.
    """
    if filter is None:
        return None
    if not isinstance(filter, str):
        raise InvalidInputError(
            f"filter must be a string (a Milvus boolean expression), got {type(filter).__name__}"
        )
    if not filter.strip():
        return None
    if len(filter) > max_chars:
        raise InvalidInputError(
            f"filter has {len(filter)} characters, over max_filter_chars={max_chars} "
            "(filter on a field instead of listing many ids)"
        )
    stack: list[tuple[str, int]] = []
    quote: str | None = None
    quote_at = 0
    escaped = False
    for position, char in enumerate(filter):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
            continue
        if char in "\"'":
            quote, quote_at = char, position
        elif char in "([{":
            stack.append((char, position))
            if len(stack) > max_depth:
                raise InvalidInputError(
                    f"filter nests brackets more than max_filter_depth={max_depth} deep "
                    f"(at column {position + 1})"
                )
        elif char in _CLOSING:
            if not stack or stack[-1][0] != _CLOSING[char]:
                raise InvalidInputError(
                    f"invalid filter: unbalanced {char!r} at column {position + 1}"
                )
            stack.pop()
        elif ord(char) < 32 and char not in "\t\n\r":
            raise InvalidInputError(
                f"invalid filter: control character {char!r} at column {position + 1}"
            )
    if quote is not None:
        raise InvalidInputError(
            f"invalid filter: unterminated string literal starting at column {quote_at + 1}"
        )
    if stack:
        char, position = stack[-1]
        raise InvalidInputError(f"invalid filter: unclosed {char!r} at column {position + 1}")
    return filter

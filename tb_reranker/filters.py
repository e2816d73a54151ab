"""Cheap checks of a Milvus filter expression before it reaches Milvus.

A filter is the caller's text: it is bounded in length and nesting (a 5.9 MB ``id in [...]``
costs Milvus seconds of CPU; 5,000 nested parentheses overflow Milvus Lite's recursive parser)
and checked for balanced brackets and terminated string literals, so that the common mistakes
are reported as :class:`InvalidInputError` naming the position, without a round trip. Numeric
literals Milvus cannot represent are refused here too: an integer outside int64 (Milvus Lite
fails with a traceback and an internal error, ``d > 1`` followed by 30 zeros), a float that
overflows to infinity (``1e309``: silently infinite) or a non-zero one that underflows to 0.
Whatever passes here may still be rejected by Milvus's own parser; that error is mapped to
``InvalidInputError`` too (see ``tb_reranker.index.milvus_index``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from tb_reranker.errors import InvalidInputError

__all__ = ["check_filter", "MAX_FILTER_CHARS", "MAX_FILTER_DEPTH"]

MAX_FILTER_CHARS = 16384  # default length limit of a filter expression (characters)
MAX_FILTER_DEPTH = 32  # default limit of nested (), [] and {} in a filter expression

_CLOSING = {")": "(", "]": "[", "}": "{"}

INT64_MAX = 2**63 - 1
# string literals (skipped), identifiers (skipped: ``field2``), numeric literals, anything else
_TOKENS = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
    r"|(?P<name>[A-Za-z_$][\w$]*)"
    r"|(?P<number>\d+(?P<fraction>\.\d+)?(?P<exponent>[eE][+-]?\d+)?)"
    r"|(?P<other>\S)",
)


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
    _check_numbers(filter)
    return filter


def _check_numbers(filter: str) -> None:  # noqa: A002 - Milvus's name
    """``InvalidInputError`` naming the first numeric literal Milvus cannot represent."""
    previous: list[str] = []  # the last two non-space tokens before the literal
    for match in _TOKENS.finditer(filter):
        text = match.group()
        if match.group("number") is not None:
            problem = _number_problem(match, negated=_negated(previous))
            if problem:
                raise InvalidInputError(
                    f"invalid filter: the number {_shown(text)} at column {match.start() + 1} "
                    f"{problem}"
                )
        previous = [*previous[-1:], text]


def _negated(previous: list[str]) -> bool:
    """A unary minus right before the literal (``> -9223372036854775808``, ``[1, -2]``), not a
    subtraction (``x - 1``, ``2 - 1``, ``(a) - 1``)."""
    if not previous or previous[-1] != "-":
        return False
    before = previous[0] if len(previous) == 2 else ""
    return not before or before in "([,=<>!" or before.endswith("=")


def _number_problem(match: re.Match[str], *, negated: bool) -> str:
    """Why Milvus cannot take this literal ("" when it can)."""
    text = match.group()
    if match.group("fraction") is None and match.group("exponent") is None:
        digits = text.lstrip("0")
        limit = INT64_MAX + 1 if negated else INT64_MAX
        if len(digits) > 19 or int(digits or "0") > limit:
            return "is outside the 64-bit integer range Milvus compares with"
        return ""
    value = float(text)  # Python floats are IEEE doubles, as Milvus's
    if math.isinf(value):
        return "is too large for a 64-bit float (it would become infinite)"
    mantissa = text.split("e")[0].split("E")[0]
    if value == 0.0 and mantissa.strip("0.") != "":
        return "is too small for a 64-bit float (it would become 0)"
    return ""


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"

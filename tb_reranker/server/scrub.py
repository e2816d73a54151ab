"""What a remote caller may read in an error: the message without the server's file paths.

Errors raised deep inside (Milvus, the store) name the files they failed on: useful in the
server log, none of a remote caller's business. :func:`public_message` replaces absolute
paths and ``file://`` URIs with ``<path>`` (the full text is logged server-side by the caller
of this function).
"""

from __future__ import annotations

import re

__all__ = ["public_message", "scrub_paths"]

# an absolute POSIX path of two or more components (/tmp/x/milvus.db, /srv/data), a file://
# URI, a ./ ../ or ~/ relative path (./tb_data/milvus.db), or a Windows drive path (C:\\data\\x.db)
_PATH = re.compile(
    r"""(?:file://)?(?<![\w/.~-])(?:~|\.{1,2}|[A-Za-z]:)?(?:[/\\][\w.@+-]+){2,}[/\\]?"""
    r"""|file://[^\s'"]+"""
)


def scrub_paths(text: str) -> str:
    """``text`` with filesystem paths replaced by ``<path>``."""
    return _PATH.sub("<path>", text)


def public_message(exc: BaseException) -> str:
    """``str(exc)`` fit for a remote caller: paths scrubbed, at most 2,000 characters."""
    text = scrub_paths(str(exc))
    return text if len(text) <= 2000 else text[:1997] + "..."

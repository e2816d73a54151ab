"""The ``tb`` command. One module per command group in this package; each has ``register(sub)``.

Errors the user can cause end the process with exit status 2 and one readable line on stderr;
anything unexpected exits 1 with the same one line (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tb_reranker.errors import TBError

__all__ = ["main", "build_parser"]

# command group modules (tb_reranker.cli.<name>), each exposing register(subparsers)
COMMAND_MODULES = (
    "init",
    "synth",
    "train",
    "evaluate",
    "ingest",
    "search",
    "manage",
    "serve",
    "demo",
    "info",
)

log = logging.getLogger("tb_reranker")


def build_parser() -> argparse.ArgumentParser:
    from tb_reranker.cli._common import OneLineParser

    parser = OneLineParser(
        prog="tb", description="Text-to-video search with the TokenBinder reranker, on Milvus."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tb_reranker.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tb_reranker.cli.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


class _DropLiteNoise(logging.Filter):
    """Milvus Lite's in-process gRPC server logs a traceback for every ``AllocTimestamp`` call
    that pymilvus makes (an RPC Lite does not implement, and pymilvus handles); drop just those."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "Method not implemented" in str(exc))


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    """Our loggers at INFO (DEBUG with -v; WARNING for quiet commands, progress lines aside),
    third parties at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropLiteNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    ours = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    for name in ("tb_reranker", "milvus_setup"):
        logging.getLogger(name).setLevel(ours)
    # progress lines (off a terminal, in place of bars) show in quiet commands too
    logging.getLogger("tb_reranker.progress").setLevel(min(ours, logging.INFO))


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`'s yes


def _one_line(text: object) -> str:
    """``text`` with every character that does not print (a newline in a file name, a control
    character, an undecodable byte) escaped: the error stays one line and always prints."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader has gone (POLLERR), not some other broken pipe."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), no real stdout
        return True


def _stdout_gone() -> int:
    """The reader of stdout went away (``tb search ... | head``): exit quietly, as Unix tools
    do. stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout to point anywhere
        pass
    return SIGPIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, quiet=getattr(args, "quiet_logs", False))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError as exc:
        if _stdout_broken():
            return _stdout_gone()
        print(f"tb {args.command}: unexpected error: BrokenPipeError: {exc}", file=sys.stderr)
        return 1
    except TBError as exc:
        if args.debug:
            raise
        print(f"tb {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tb {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(
            f"tb {args.command}: unexpected error: {type(exc).__name__}: {_one_line(exc)}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

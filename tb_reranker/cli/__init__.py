"""The ``tb`` command. One module per command group in this package; each has ``register(sub)``.

Errors the user can cause end the process with exit status 2 and one readable line on stderr;
anything unexpected exits 1 with the same one line (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tb_reranker.errors import TBError

__all__ = ["main", "build_parser"]

# command group modules (tb_reranker.cli.<name>), each exposing register(subparsers)
COMMAND_MODULES = (
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
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except TBError as exc:
        if args.debug:
            raise
        print(f"tb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tb {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(f"tb {args.command}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Generate the gRPC stubs of ``proto/tb_reranker/v1/*.proto`` into ``tb_reranker/_pb``.

``python -m tb_reranker.server.protogen [--out DIR]`` (also ``make proto``). protoc writes imports
such as ``from tb_reranker.v1 import reranker_pb2``; they are rewritten to
``tb_reranker._pb.tb_reranker.v1`` so the stubs import from inside the package, while the proto
file name registered in the descriptor pool stays ``tb_reranker/v1/reranker.proto``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

__all__ = ["generate", "PROTO_ROOT", "PB_ROOT", "main"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"  # -I root; files live under tb_reranker/v1/
PB_ROOT = Path(__file__).resolve().parents[1] / "_pb"  # generated package root
PB_PACKAGE = "tb_reranker._pb"

_IMPORT_RE = re.compile(r"^from tb_reranker\.(v\d+) import ", re.MULTILINE)


def _fix_imports(text: str) -> str:
    return _IMPORT_RE.sub(lambda m: f"from {PB_PACKAGE}.tb_reranker.{m.group(1)} import ", text)


def generate(out_dir: Path | str = PB_ROOT, proto_root: Path | str = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) on every ``.proto`` under ``proto_root``; return written files.

    Writes ``<out_dir>/tb_reranker/v1/{name}_pb2.py``, ``_pb2.pyi``, ``_pb2_grpc.py`` and the
    ``__init__.py`` files, with imports fixed to work inside ``tb_reranker._pb``.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise RuntimeError("grpcio-tools is needed: pip install grpcio-tools") from exc
    out_dir, proto_root = Path(out_dir), Path(proto_root)
    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit status {code}: {' '.join(args)}")
    written: list[Path] = []
    for proto in protos:
        stem = out_dir / proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = stem.parent / (stem.name + suffix)
            path.write_text(_fix_imports(path.read_text()))
            written.append(path)
        package_dir = stem.parent
        while True:  # __init__.py in every package directory down from out_dir
            init = package_dir / "__init__.py"
            if not init.exists():
                init.write_text("")
            written.append(init)
            if package_dir == out_dir:
                break
            package_dir = package_dir.parent
    return sorted(set(written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(PB_ROOT), help="output root (default: tb_reranker/_pb)"
    )
    parser.add_argument(
        "--proto-root", default=str(PROTO_ROOT), help="directory holding tb_reranker/"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in generate(args.out, args.proto_root):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Stage the Milvus stand-in image's files: ``python stage_milvus.py DIR`` (build-images.sh runs it).

Writes ``DIR/bin`` (the Milvus 2.3.5 standalone binary and its libraries, decompressed from the
``milvus`` PyPI wheel, a dev dependency) and ``DIR/configs/milvus.yaml`` rendered from that
wheel's own template with its default ports, data under ``/var/lib/milvus``, etcd external and
object storage on MinIO/S3 — the layout of the official ``milvusdb/milvus`` image, whose
``ETCD_ENDPOINTS`` / ``MINIO_*`` variables then override the addresses. Re-running is cheap:
unchanged files are skipped.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

DATA_DIR = "/var/lib/milvus"  # the official image's data volume


def main(stage: Path) -> None:
    import milvus
    from milvus import MilvusServerConfig

    stage.mkdir(parents=True, exist_ok=True)
    milvus._initialize_data_files(str(stage))  # bin/: skips files whose md5 already matches
    for md5 in (stage / "bin").glob("*.md5"):
        md5.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        config = MilvusServerConfig(data_dir=tmp)
        config.resolve_storage()  # data/log paths under tmp; every port keeps the template default
        config.write_config()
        text = (Path(tmp) / "configs" / "milvus.yaml").read_text(encoding="utf-8")
        glog = (Path(tmp) / "configs" / "glog.conf").read_text(encoding="utf-8")
    text = text.replace(str(Path(tmp).resolve()), DATA_DIR).replace(tmp, DATA_DIR)
    replacements = [
        (r"(\n  use:\n    embed:) true", r"\1 false"),  # etcd is its own service
        (r"(\n  storageType:) local", r"\1 minio"),  # segments go to MinIO/S3
        (r"(\n  rootPath:) \S*logs\S*", r'\1 ""'),  # logs to stdout, as containers do
    ]
    for pattern, repl in replacements:
        text, count = re.subn(pattern, repl, text)
        if count != 1 and "rootPath" not in pattern:
            raise SystemExit(f"stage_milvus: template changed, {pattern!r} matched {count} times")
    configs = stage / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "milvus.yaml").write_text(text, encoding="utf-8")
    (configs / "glog.conf").write_text(glog, encoding="utf-8")
    print(f"staged Milvus {milvus.__version__} in {stage}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: stage_milvus.py DIR")
    main(Path(sys.argv[1]))

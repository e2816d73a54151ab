"""Read every entry of an LMDB frame-token store in a child process, surviving any damage.

A damaged LMDB page can make the LMDB library abort the process (an assertion: SIGABRT) or
touch unmapped memory (SIGBUS) instead of returning an error; no Python code can catch that.
``tb check`` therefore reads the store in a child process (``python -m
tb_reranker.stores.lmdb_scan``) that reports each entry as one JSON line as it goes; the parent
sees where the child stopped and why, and tries again from the other end of the key order and
by point reads of the ids it expects (from Milvus), skipping the id that killed a child.

Child protocol (stdout, one JSON object a line):
``{"id", "ok": true}`` / ``{"id", "ok": false, "error"}`` an entry (``ok`` false: unparsable or
non-finite tokens); ``{"bad_key", "error"}`` a key that is not a valid id; ``{"probe"}`` the id a
point read is about to read; ``{"fatal"}`` an LMDB error that ends the pass; ``{"done"}`` the
pass ended normally. Modes: ``forward``, ``reverse``, ``ids`` (a JSON list on stdin), and
``copy DEST`` (ids on stdin: copy their raw values into a fresh environment ``DEST``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tb_reranker.stores.base import StoreScan

__all__ = ["scan_lmdb", "copy_lmdb"]

log = logging.getLogger(__name__)

_MAX_RESTARTS = 64  # point-read passes restarted after a child died on one id


# ------------------------------------------------------------------------------- child side
def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _verdict(key: bytes, value: Any) -> dict[str, Any]:
    from tb_reranker.errors import StoreError
    from tb_reranker.stores.record import decode_record, validate_record_key

    try:
        video_id = validate_record_key(bytes(key).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - any bad key is reported, not fatal
        return {"bad_key": bytes(key).hex(), "error": str(exc)}
    try:
        decode_record(video_id, value)
    except StoreError as exc:
        return {"id": video_id, "ok": False, "error": str(exc)}
    return {"id": video_id, "ok": True}


def _child(path: str, mode: str, dest: str | None) -> int:
    import lmdb

    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True, readahead=False)
    except lmdb.Error as exc:
        _emit({"fatal": f"cannot open: {exc}"})
        return 3
    try:
        with env.begin(buffers=True) as txn:
            if mode in ("forward", "reverse"):
                cursor = txn.cursor()
                items = cursor.iterprev() if mode == "reverse" else cursor.iternext()
                for key, value in items:
                    _emit(_verdict(key, value))
            elif mode == "ids":
                for video_id in json.loads(sys.stdin.read()):
                    _emit({"probe": video_id})
                    value = txn.get(video_id.encode())
                    if value is not None:
                        _emit(_verdict(video_id.encode(), value))
            elif mode == "copy" and dest:
                ids = json.loads(sys.stdin.read())
                out = lmdb.open(dest, subdir=True, map_size=max(env.info()["map_size"], 1 << 30))
                with out.begin(write=True) as wtxn:
                    for video_id in ids:
                        value = txn.get(video_id.encode())
                        if value is not None:
                            wtxn.put(video_id.encode(), bytes(value))
                out.sync(True)
                out.close()
            else:
                _emit({"fatal": f"unknown mode {mode!r}"})
                return 3
    except lmdb.Error as exc:
        _emit({"fatal": f"{type(exc).__name__}: {exc}"})
        return 3
    _emit({"done": True})
    return 0


# ------------------------------------------------------------------------------ parent side
def _run(path: Path, mode: str, stdin: str = "", dest: str | None = None, timeout: float = 3600):
    """Run one child pass; returns (lines, how it ended: None when it finished normally)."""
    command = [sys.executable, "-m", "tb_reranker.stores.lmdb_scan", str(path), mode]
    if dest:
        command.append(dest)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [env.get("PYTHONPATH")])]
    )
    try:
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return [], f"the {mode} read did not finish in {timeout:.0f} s"
    lines = []
    for text in done.stdout.splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    finished = any("done" in line for line in lines)
    if finished:
        return lines, None
    fatal = [line["fatal"] for line in lines if "fatal" in line]
    if fatal:
        return lines, f"the {mode} read stopped: {fatal[0]}"
    code = done.returncode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = f"the LMDB library crashed ({name}) in the {mode} read"
    else:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {code}"]
        why = f"the {mode} read failed: {tail[0]}"
    return lines, why


def _absorb(scan: StoreScan, lines: list[dict[str, Any]]) -> set[str]:
    seen: set[str] = set()
    for line in lines:
        if "bad_key" in line:
            if line["bad_key"] not in scan.bad_keys:
                scan.bad_keys.append(line["bad_key"])
        elif "id" in line:
            video_id = line["id"]
            seen.add(video_id)
            if line.get("ok"):
                if video_id not in scan.ok:
                    scan.ok.append(video_id)
            else:
                scan.corrupt[video_id] = str(line.get("error", "unreadable"))
    return seen


def scan_lmdb(path: str | os.PathLike[str], expected: Iterable[str] = ()) -> StoreScan:
    """Read every entry of the LMDB environment at ``path`` in child processes.

    A normal store takes one child (a forward cursor pass). When a pass dies or LMDB reports
    damage, a reverse pass reads from the other end, then the ``expected`` ids not met yet are
    read one by one (a child that dies on an id marks that id lost and the rest go on).
    """
    path = Path(path)
    scan = StoreScan()
    lines, why = _run(path, "forward")
    _absorb(scan, lines)
    if why is None:
        scan.ok.sort()
        return scan
    scan.damage.append(f"{why} after {len(lines)} entries")
    lines, why = _run(path, "reverse")
    _absorb(scan, lines)
    if why is not None:
        scan.damage.append(f"{why} after {len(lines)} entries")
    todo = [i for i in dict.fromkeys(expected) if i not in scan.ok and i not in scan.corrupt]
    for _ in range(_MAX_RESTARTS):
        if not todo:
            break
        lines, why = _run(path, "ids", json.dumps(todo))
        _absorb(scan, lines)
        probed = [line["probe"] for line in lines if "probe" in line]
        if why is None:
            break
        last = probed[-1] if probed else todo[0]
        scan.corrupt[last] = f"reading it breaks the store: {why}"
        done = set(probed)
        todo = [i for i in todo if i not in done]
    scan.ok.sort()
    return scan


def copy_lmdb(source: str | os.PathLike[str], dest: str | os.PathLike[str], ids: list[str]) -> None:
    """Copy the raw entries ``ids`` (already read fine by :func:`scan_lmdb`) from ``source``
    into a fresh environment ``dest``, in a child process. Raises StoreError on failure."""
    from tb_reranker.errors import StoreError

    _, why = _run(Path(source), "copy", json.dumps(ids), dest=str(dest))
    if why is not None:
        raise StoreError(f"salvaging the frame-token store failed: {why}")


if __name__ == "__main__":  # pragma: no cover - run as the child process
    logging.disable(logging.CRITICAL)
    args = sys.argv[1:]
    sys.exit(_child(args[0], args[1], args[2] if len(args) > 2 else None))

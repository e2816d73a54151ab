"""MSVD's raw-captions.pkl is read by an unpickler that refuses every class/function lookup."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from tb_reranker.data import load_dataset, safe_pickle_load
from tb_reranker.errors import InvalidInputError, NotFoundError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


class _SystemPayload:
    """Unpickling this calls os.system(command): the classic malicious pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalPayload:
    """Unpickling this calls builtins.exec(code)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def test_plain_containers_load(tmp_path: Path) -> None:
    value = {"a": [["x", "y"], ["z"]], "b": [], "n": (1, 2.5, None, True, -(2**70)), "é": "ü"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        assert safe_pickle_load(path) == value
    # sets and bytes have their own opcodes from protocol 4 / 3 on (older ones name a class)
    path = tmp_path / "p4.pkl"
    path.write_bytes(pickle.dumps({"s": {"k"}, "b": b"\0"}, protocol=4))
    assert safe_pickle_load(path) == {"s": {"k"}, "b": b"\0"}


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_reduce_payload_is_rejected_and_never_executed(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "msvd"
    shutil.copytree(FIXTURES / "msvd", root)
    payload = {"-8y1Q0rA3n8_108_115": [_SystemPayload(f"touch {marker}")]}
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(InvalidInputError, match=r"raw-captions\.pkl.*refusing to load global"):
        load_dataset("msvd", root, "test", check_files=False)
    assert not marker.exists()
    # a payload hidden as the whole file, through builtins.exec
    (root / "raw-captions.pkl").write_bytes(
        pickle.dumps(_EvalPayload(f"open({str(marker)!r}, 'w').close()"), protocol=protocol)
    )
    with pytest.raises(InvalidInputError, match="exec"):
        safe_pickle_load(root / "raw-captions.pkl")
    assert not marker.exists()


def test_class_instances_are_refused_even_harmless_ones(tmp_path: Path) -> None:
    from collections import OrderedDict

    path = tmp_path / "od.pkl"
    path.write_bytes(pickle.dumps(OrderedDict(a=[["x"]])))
    with pytest.raises(InvalidInputError, match="collections.OrderedDict"):
        safe_pickle_load(path)


def test_corrupt_and_missing_pickles(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": ["x" * 100]}, protocol=2)[:-20])
    with pytest.raises(InvalidInputError, match=r"cut\.pkl"):
        safe_pickle_load(path)
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x05not a pickle at all")
    with pytest.raises(InvalidInputError, match=r"junk\.pkl"):
        safe_pickle_load(tmp_path / "junk.pkl")
    with pytest.raises(NotFoundError, match=r"absent\.pkl"):
        safe_pickle_load(tmp_path / "absent.pkl")


def test_python2_byte_strings_decode_as_utf8(tmp_path: Path) -> None:
    # protocol 2 as Python 2 wrote it: {"a": ["café"]} with SHORT_BINSTRING (byte) opcodes
    raw = b"\x80\x02}U\x01a]U\x05caf\xc3\xa9as."
    (tmp_path / "py2.pkl").write_bytes(raw)
    assert safe_pickle_load(tmp_path / "py2.pkl") == {"a": ["café"]}

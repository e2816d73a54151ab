"""Issue 20, round two: numbers at every edge (CLI flags, TB_* variables, SDK constructors,
server config), tensor shapes that cannot be, and tokenising only what the text tower reads."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker.cli import build_parser
from tb_reranker.config import Settings
from tb_reranker.errors import InvalidInputError
from tb_reranker.numbers import Bound
from tb_reranker.server.config import BOUNDS, ServerConfig
from tb_reranker.wire.convert import MAX_TENSOR_RANK, tensor_from_proto

NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])


# ---------------------------------------------------------------------- shapes
@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 5), max_size=MAX_TENSOR_RANK + 4),
    values=st.integers(0, 200),
)
def test_tensor_from_proto_is_an_array_of_its_bytes_or_invalid_input(shape, values):
    """Before: a zero dimension made any product "match" no bytes ([2^31, 2^31, 0]), and a
    rank numpy cannot hold escaped as ValueError (INTERNAL on the wire)."""
    message = pb.FloatTensor(shape=shape, data=b"\0" * (4 * values))
    try:
        array = tensor_from_proto(message)
    except InvalidInputError:
        assert not shape or 0 in shape or len(shape) > MAX_TENSOR_RANK or math.prod(shape) != values
        return
    assert list(array.shape) == shape and array.size == values and array.dtype == np.float32


@pytest.mark.parametrize("shape", [[2**31, 2**31, 0], [0], [4, 0, 64], [1] * 65])
def test_zero_and_too_many_dimensions_are_refused(shape):
    with pytest.raises(InvalidInputError):
        tensor_from_proto(pb.FloatTensor(shape=shape, data=b""))


# ---------------------------------------------------------------------- numbers
@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(BOUNDS)),
    value=NON_FINITE | st.floats(-1e30, -1e-3) | st.integers(-(2**40), -2) | st.floats(1e12, 1e300),
)
def test_server_config_refuses_non_finite_and_out_of_range(name, value):
    """Before: max_wait_ms=inf/nan and port 70000 were accepted. (-1.0 is a valid port: -1 =
    off; the negative range of the strategy reaches it.)"""
    bound = BOUNDS[name]
    assume(not (math.isfinite(value) and bound.low <= value <= bound.high))
    with pytest.raises(InvalidInputError, match=name):
        ServerConfig(**{name: value})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(BOUNDS)),
    text=st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "70000", "-2", "2147483648", "x"]),
)
def test_serve_flags_refuse_them(name, text):
    bound = BOUNDS[name]
    try:
        accepted = bound.parse(text)
    except ValueError:
        accepted = None
    if accepted is not None:  # e.g. 70000 for max_candidates: a valid value there
        return
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--" + name.replace("_", "-"), text])
    assert exit_info.value.code == 2


def test_every_numeric_server_setting_has_a_bound():
    import dataclasses

    numeric = {
        f.name
        for f in dataclasses.fields(ServerConfig)
        if type(f.default) in (int, float)  # bool is its own type here
    }
    assert numeric == set(BOUNDS), numeric ^ set(BOUNDS)


def _numeric_options(parser: argparse.ArgumentParser):
    """(command, flag, type) of every option whose type is a Bound's parser, per subcommand."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, subparser in sub.choices.items():
        for action in subparser._actions:
            bound = getattr(action.type, "__self__", None)
            if isinstance(bound, Bound) and action.option_strings:
                yield command, action.option_strings[0], bound


def test_every_numeric_option_of_every_command_is_checked():
    """No `type=int` / `type=float` is left: each numeric flag refuses inf, nan and a value
    past its range."""
    parser = build_parser()
    found = list(_numeric_options(parser))
    commands = {command for command, _, _ in found}
    assert {"serve", "train", "ablate", "eval", "ingest", "search", "synth", "init"} <= commands
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for subparser in sub.choices.values():
        for action in subparser._actions:
            assert action.type not in (int, float), (subparser.prog, action.option_strings)
    for command, flag, bound in found:
        for text in ("inf", "nan", str(int(bound.high) + 1) if bound.integer else "1e308"):
            with pytest.raises(SystemExit):
                parser.parse_args([command, flag, text])


def test_milvus_setup_numeric_options_are_checked():
    from milvus_setup.cli import build_parser as milvus_parser

    for flag in ("--dim", "--hnsw-m", "--ef-construction", "--timeout"):
        for text in ("inf", "nan", "-1", "0"):
            with pytest.raises(SystemExit):
                milvus_parser().parse_args(["create", flag, text])


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "70000"],
        ["serve", "--max-wait-ms", "inf"],
        ["search", "--limit", "nan", "x"],
    ],
)
def test_cli_bad_number_is_one_line_and_exit_2(args):
    result = subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tb {args[0]}: error: argument"), lines


@settings(max_examples=50, deadline=None)
@given(value=NON_FINITE | st.floats(max_value=0) | st.floats(min_value=1e7, allow_infinity=False))
def test_settings_timeout_refuses_non_finite(value):
    with pytest.raises(InvalidInputError, match="timeout"):
        Settings.from_env(timeout=value)


def test_env_variable_names_itself(monkeypatch):
    monkeypatch.setenv("TB_SERVE_MAX_WAIT_MS", "inf")
    with pytest.raises(InvalidInputError, match="TB_SERVE_MAX_WAIT_MS"):
        ServerConfig.from_env()
    monkeypatch.setenv("TB_TIMEOUT", "nan")
    with pytest.raises(InvalidInputError, match="TB_TIMEOUT"):
        Settings.from_env()

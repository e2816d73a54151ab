"""The cheap guards in front of the network surfaces: filters, tokens, targets, path scrubbing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.auth import check_token, read_token_file
from tb_reranker.errors import InvalidInputError
from tb_reranker.filters import MAX_FILTER_DEPTH, check_filter
from tb_reranker.server.scrub import public_message, scrub_paths

FAST = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------------- filters
@pytest.mark.parametrize(
    "expression",
    [
        'id == "a"',
        'id in ["a", "b"]',
        'id == "with \\" quote"',
        "id == 'single'",
        '(duration_s > 3) and (id like "vid%")',
        'json_contains(tags, "x")',
        '"(" == id',  # brackets inside a string literal do not count
    ],
)
def test_valid_filters_pass_unchanged(expression):
    assert check_filter(expression) == expression


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ('id == "', "unterminated"),
        ("id == 'a", "unterminated"),
        ('((id == "a")', "unclosed"),
        ('id == "a")', "unbalanced"),
        ('(id in ["a")]', "unbalanced"),
        ("(" * 5000 + "x" + ")" * 5000, "max_filter_depth"),
        ("x" * 20000, "max_filter_chars"),
        ('id == "a"\x00', "control character"),
    ],
)
def test_malformed_filters_are_invalid_input(expression, words):
    with pytest.raises(InvalidInputError, match=words):
        check_filter(expression)


@pytest.mark.parametrize("value", [5, 1.5, ["id"], {"id": 1}, b"id", True])
def test_non_string_filter_is_invalid_input(value):
    with pytest.raises(InvalidInputError, match="filter must be a string"):
        check_filter(value)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_filter_means_none(value):
    assert check_filter(value) is None


@FAST
@given(st.text(max_size=200))
def test_check_filter_never_raises_anything_else(text):
    with contextlib.suppress(InvalidInputError):
        assert check_filter(text) in (text, None)


@FAST
@given(depth=st.integers(1, 200))
def test_depth_limit_is_exact(depth):
    expression = "(" * depth + 'id == "a"' + ")" * depth
    if depth <= MAX_FILTER_DEPTH:
        assert check_filter(expression) == expression
    else:
        with pytest.raises(InvalidInputError, match="max_filter_depth"):
            check_filter(expression)


# ---------------------------------------------------------------------- tokens
def test_tokens_are_trimmed_and_none_means_no_auth():
    assert check_token(None) == "" and check_token("") == ""
    assert check_token("abc\n") == "abc" and check_token("  abc-DEF_123.~ ") == "abc-DEF_123.~"


@pytest.mark.parametrize(
    "token", [" ", "\n", "\t\r\n", "a b", "tab\there", "nul\x00x", "é", "a\nb"]
)
def test_blank_or_unsendable_tokens_are_refused(token):
    with pytest.raises(InvalidInputError, match="token"):
        check_token(token)


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n", "a\nb\n"])
def test_token_file_blank_or_ambiguous(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match="token file|token"):
        read_token_file(path)


def test_token_file_reads_the_one_line(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n  s3cret-token \n\n")
    assert read_token_file(path) == "s3cret-token"
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_token_file(tmp_path / "binary")


def test_server_config_refuses_a_blank_token_and_hides_it():
    from tb_reranker.server.config import ServerConfig

    with pytest.raises(InvalidInputError, match="blank"):
        ServerConfig(token="   ")
    config = ServerConfig(token="secret-value\n")
    assert config.token == "secret-value" and "secret-value" not in repr(config)
    for name in ("max_filter_chars", "max_filter_depth"):
        with pytest.raises(InvalidInputError, match=name):
            ServerConfig(**{name: 0})


# ---------------------------------------------------------------------- remote targets
@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "dns:///svc:50051", "unix:/tmp/tb.sock"],
)
def test_good_targets(target):
    from tb_reranker.remote import check_target

    assert check_target(target) == target


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("http://127.0.0.1:50051", "http:// URL"),
        ("https://tb.example.com:443", "tls=True"),
        ("grpc://host:1", "URL"),
        ("127.0.0.1", "host:port"),
        ("host:port", "host:port"),
        ("host:70000", "host:port"),
        ("", "host:port"),
        ("a b:1", "host part"),
    ],
)
def test_bad_targets_fail_at_construction(target, words):
    from tb_reranker.remote import AsyncRemoteReranker, RemoteReranker

    for kind in (RemoteReranker, AsyncRemoteReranker):
        with pytest.raises(InvalidInputError, match=words):
            kind(target)


def test_client_with_an_http_target_fails_at_construction(tmp_path):
    from tb_reranker import Client

    with pytest.raises(InvalidInputError, match="gRPC"):
        Client(data_dir=str(tmp_path), reranker="http://127.0.0.1:50051")
    with pytest.raises(InvalidInputError, match="blank"):
        Client(data_dir=str(tmp_path), reranker="127.0.0.1:50051", reranker_token=" \n")


# ---------------------------------------------------------------------- paths in messages
@pytest.mark.parametrize(
    "text",
    [
        "Milvus search failed at /tmp/pytest-1/x/milvus.db: boom",
        "cannot open frame-token store '/srv/tb/frames': denied",
        "collection 'c' does not exist at ./tb_data/milvus.db",
        "file:///var/lib/tb/milvus.db is locked",
        "reading ~/tb_data/frames failed",
    ],
)
def test_paths_are_scrubbed(text):
    scrubbed = scrub_paths(text)
    assert "<path>" in scrubbed
    assert not any(part in scrubbed for part in ("/tmp/", "/srv/", "tb_data/", "/var/"))


@pytest.mark.parametrize(
    "text",
    ["limit must be in 1..1000", "id/123 is not a valid id", "ratio 3/4", "http://127.0.0.1:1"],
)
def test_non_paths_are_kept(text):
    assert scrub_paths(text) == text


def test_public_message_is_bounded():
    assert len(public_message(ValueError("x" * 10_000))) <= 2000

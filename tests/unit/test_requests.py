"""The request objects and the one set of limits (``tb_reranker.requests``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.requests import (
    DEFAULT_LIMITS,
    Limits,
    RerankQuery,
    RerankRequest,
    SearchRequest,
    check_texts,
)
from tb_reranker.server.config import ServerConfig

SHAPE = (4, 8)
FAST = settings(max_examples=80, deadline=None)


def test_the_server_defaults_are_the_one_set_of_limits():
    assert ServerConfig().limits == DEFAULT_LIMITS
    custom = ServerConfig(max_candidates=7, max_text_chars=9, max_texts=2, max_filter_depth=3)
    assert custom.limits == dataclasses.replace(
        DEFAULT_LIMITS, max_candidates=7, max_text_chars=9, max_texts=2, max_filter_depth=3
    )
    assert Limits.sdk().max_texts is None and Limits.sdk().max_candidates == 1000


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "3", None, 1001])
def test_search_limit(limit):
    with pytest.raises(InvalidInputError, match="limit"):
        SearchRequest.build(["a dog"], limit=limit)


def test_search_request_texts_or_indicators():
    request = SearchRequest.build(["a", "b"], limit=3, filter="  ")
    assert request.texts == ["a", "b"] and request.filter is None and request.num_queries == 2
    one = SearchRequest.build(np.zeros(SHAPE), shape=SHAPE)
    assert one.indicators.shape == (1, *SHAPE) and one.texts is None
    with pytest.raises(InvalidInputError, match="shape"):
        SearchRequest.build(np.zeros((1, 3, 8)), shape=SHAPE)
    with pytest.raises(InvalidInputError, match="every query must be a string"):
        SearchRequest.build(["a", 3])
    with pytest.raises(InvalidInputError, match="every query must be a string"):
        SearchRequest.build([3, "a"], texts_only=True)
    with pytest.raises(InvalidInputError, match="no query"):
        SearchRequest.build([])
    with pytest.raises(InvalidInputError, match="max_text_chars=2048"):
        SearchRequest.build(["x" * 2049])
    syntax = Limits.syntax_only()  # the remote SDK: the server's numbers decide
    assert SearchRequest.build(["x" * 5000], limit=5000, limits=syntax).limit == 5000


def test_texts_limit_names_the_knob():
    limits = Limits(max_texts=2)
    with pytest.raises(InvalidInputError, match="max_texts=2"):
        check_texts(["a", "b", "c"], limits)
    assert check_texts(["a"] * 300, Limits.sdk()) == ["a"] * 300


def test_rerank_request_per_query_options():
    request = RerankRequest.build(
        np.zeros((2, *SHAPE)),
        [["v1", "v2"], ["v3"]],
        contents_hashes=[["h1", ""], None],
        shape=SHAPE,
    )
    assert request.broad_scores == [None, None]
    assert request.contents_hashes == [["h1", None], None]
    with pytest.raises(InvalidInputError, match="query 1: no candidates"):
        RerankRequest.build(np.zeros((2, *SHAPE)), [["v1"], []], shape=SHAPE)
    with pytest.raises(InvalidInputError, match="max_candidates=1"):
        RerankRequest.build(
            np.zeros(SHAPE), [["v1", "v2"]], shape=SHAPE, limits=Limits(max_candidates=1)
        )
    with pytest.raises(InvalidInputError, match="broad scores must lie"):
        RerankRequest.build(np.zeros(SHAPE), [["v1"]], [[1e13]], shape=SHAPE)
    with pytest.raises(InvalidInputError, match="indicator values"):
        RerankRequest.build(np.full(SHAPE, 1e5), [["v1"]], shape=SHAPE)


def test_rerank_query_needs_exactly_one_query():
    with pytest.raises(InvalidInputError, match="exactly one"):
        RerankQuery.build(candidates_ids=["v1"], shape=SHAPE)
    with pytest.raises(InvalidInputError, match="exactly one"):
        RerankQuery.build(candidates_ids=["v1"], text="a", indicators=np.zeros(SHAPE), shape=SHAPE)
    with pytest.raises(InvalidInputError, match="one query per call"):
        RerankQuery.build(candidates_ids=["v1"], indicators=np.zeros((2, *SHAPE)), shape=SHAPE)
    query = RerankQuery.build(candidates_ids=["v1"], indicators=np.zeros(SHAPE), shape=SHAPE)
    assert query.indicators.shape == SHAPE and query.top_n is None


@FAST
@given(
    ids=st.lists(st.one_of(st.text(max_size=12), st.integers(), st.none()), max_size=6),
    scores=st.one_of(st.none(), st.lists(st.floats(), max_size=6)),
    top_n=st.one_of(st.none(), st.integers(-2, 3), st.booleans(), st.floats(0, 3)),
)
def test_any_rerank_arguments_are_accepted_or_invalid_input(ids, scores, top_n):
    """Whatever a caller passes: a request, or InvalidInputError; never another exception."""
    try:
        request = RerankRequest.build(
            np.zeros(SHAPE), [ids], None if scores is None else [scores], top_n=top_n, shape=SHAPE
        )
    except InvalidInputError:
        return
    assert request.candidates_ids == [ids] and len(set(ids)) == len(ids)
    assert request.top_n is None or request.top_n > 0

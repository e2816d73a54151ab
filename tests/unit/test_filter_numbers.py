"""Numeric literals in filters: what Milvus cannot represent is InvalidInputError before Milvus.

Before: ``duration_s > 1`` followed by 30 zeros reached Milvus Lite, which failed with a Python
traceback ("int too large to convert to C long"): UNAVAILABLE on the wire and SearchService
NOT_SERVING for a caller's typo; ``1e309`` was silently infinite.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.filters import INT64_MAX, check_filter

INT64_MIN = -INT64_MAX - 1
outside_int64 = st.one_of(
    st.integers(min_value=INT64_MAX + 1),
    st.integers(max_value=INT64_MIN - 1),
    st.integers(min_value=19, max_value=4000).map(lambda n: -(10**n) if n % 2 else 10**n),
)
templates = st.sampled_from(
    ["duration_s > {}", "{} < duration_s", "fps in [1, {}, 3]", "(duration_s == {}) and fps > 1"]
)


@given(n=outside_int64, template=templates)
def test_integers_outside_int64_are_invalid_input(n, template):
    with pytest.raises(InvalidInputError, match="64-bit integer"):
        check_filter(template.format(n))


@given(n=st.integers(min_value=INT64_MIN, max_value=INT64_MAX), template=templates)
def test_integers_inside_int64_pass(n, template):
    expression = template.format(n)
    assert check_filter(expression) == expression


@given(
    x=st.floats(allow_nan=False, allow_infinity=False),
    template=templates,
    spelling=st.sampled_from([repr, lambda x: f"{x:.17e}", lambda x: f"{x:.40f}"]),
)
def test_finite_floats_pass(x, template, spelling):
    text = spelling(x)
    if float(text) == 0.0 and x != 0.0:  # a spelling that itself drops the digits
        text = repr(x)
    expression = template.format(text)
    assert check_filter(expression) == expression


@given(
    mantissa=st.from_regex(r"[1-9]\d{0,5}(\.\d{1,5})?", fullmatch=True),
    exponent=st.integers(min_value=309, max_value=10**9),
    sign=st.sampled_from(["", "-"]),
    marker=st.sampled_from(["e", "E", "e+"]),
)
def test_floats_that_overflow_are_invalid_input(mantissa, exponent, sign, marker):
    with pytest.raises(InvalidInputError, match="infinite"):
        check_filter(f"duration_s > {sign}{mantissa}{marker}{exponent}")


@given(
    mantissa=st.from_regex(r"[1-9]\d{0,5}(\.\d{1,5})?", fullmatch=True),
    exponent=st.integers(min_value=340, max_value=10**9),
)
def test_non_zero_floats_that_underflow_are_invalid_input(mantissa, exponent):
    with pytest.raises(InvalidInputError, match="become 0"):
        check_filter(f"duration_s >= {mantissa}e-{exponent}")


@given(digits=st.from_regex(r"\d{20,60}", fullmatch=True))
def test_numbers_in_strings_and_names_are_not_literals(digits):
    for expression in (f'id == "{digits}"', f"id == '{digits}e999'", f"f{digits} > 1"):
        assert check_filter(expression) == expression


def test_zero_spelled_any_way_passes():
    for text in ("0", "0.0", "0e999", "0.000e-99999", "00000000000000000000000000"):
        assert check_filter(f"duration_s > {text}") == f"duration_s > {text}"


def test_subtraction_is_not_a_unary_minus():
    check_filter("duration_s > -9223372036854775808")
    for expression in ("fps-9223372036854775808 > 0", "(fps) - 9223372036854775808 > 0"):
        with pytest.raises(InvalidInputError, match="64-bit integer"):
            check_filter(expression)

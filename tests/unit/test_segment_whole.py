"""``SegmentSpec.keeps_whole``: the one rule of which videos are not cut (shared by ingest and
the moment evaluation): no longer than the longest segment the spec makes."""

from __future__ import annotations

import math

import pytest

from tb_reranker.errors import InvalidInputError
from tb_reranker.video.segment_plan import SegmentSpec, plan_segments


def test_default_shots_keep_files_up_to_30_s_whole() -> None:
    spec = SegmentSpec()
    assert spec.max_segment_s == 30.0
    assert spec.keeps_whole(0.0) and spec.keeps_whole(12.5) and spec.keeps_whole(30.0)
    assert not spec.keeps_whole(30.001) and not spec.keeps_whole(600.0)
    # past the bound the plan really cuts: more than one segment, none longer than 30 s
    spans = plan_segments([10.0, 20.0, 31.0], 40.0, spec)
    assert len(spans) > 1 and max(b - a for a, b in spans) <= spec.max_segment_s


def test_fixed_and_none() -> None:
    fixed = SegmentSpec.parse("fixed:10,2")
    assert fixed.max_segment_s == 10.0
    assert fixed.keeps_whole(10.0) and not fixed.keeps_whole(10.5)
    none = SegmentSpec.parse("none")
    assert none.max_segment_s == math.inf and none.keeps_whole(3600.0 * 24)
    assert SegmentSpec(min_s=2.0, max_s=8.0).keeps_whole(8.0)
    assert not SegmentSpec(min_s=2.0, max_s=8.0).keeps_whole(9.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "ten", True])
def test_bad_duration_is_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="duration"):
        SegmentSpec().keeps_whole(bad)  # type: ignore[arg-type]

"""Segmentation at decode time (issue 22 §1) on real MP4s written here with PyAV, and the planning
rules as properties (Hypothesis)."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError, VideoDecodeError
from tb_reranker.video import decode_video
from tb_reranker.video.segment import Segment, _Candidates, iter_segments, segment_video
from tb_reranker.video.segment_plan import SegmentSpec, ShotPlanner, plan_segments

pytestmark = pytest.mark.timeout(180)

FPS = 20
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 50, 220), (230, 220, 50), (200, 60, 200)]


def write_shots(
    path: Path,
    shots_s: list[float],
    *,
    fps: int = FPS,
    colours: list[tuple[int, int, int]] | None = None,
    faststart: bool = False,
) -> Path:
    """H.264 MP4, 64x48: one flat colour per shot (a small moving bar inside), keyframe every
    0.5 s. Shot k lasts ``shots_s[k]`` seconds."""
    colours = colours or COLOURS
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "g": str(fps // 2)}
        for k, seconds in enumerate(shots_s):
            for i in range(int(round(seconds * fps))):
                image = np.empty((48, 64, 3), dtype=np.uint8)
                image[:] = colours[k % len(colours)]
                x = i % 56
                image[20:28, x : x + 8] = np.array(colours[k % len(colours)]) // 2
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def shot_of(frame: np.ndarray, shots_rgb: list[tuple[int, int, int]]) -> int:
    """Index of the colour a preprocessed frame [3, S, S] shows (its corner pixel)."""
    from tb_reranker.video import CLIP_MEAN, CLIP_STD

    rgb = frame[:, 0, 0] * np.array(CLIP_STD) + np.array(CLIP_MEAN)
    distances = [np.abs(rgb * 255 - np.array(c)).sum() for c in shots_rgb]
    return int(np.argmin(distances))


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # cuts at 3.0, 7.0, 9.5 s; 14.5 s in all
    return write_shots(tmp_path_factory.mktemp("seg") / "cuts.mp4", [3.0, 4.0, 2.5, 5.0])


def test_cuts_are_found_within_two_frames_and_segments_follow_them(cut_video: Path) -> None:
    result = segment_video(cut_video, "shots", num_frames=6, image_size=16)
    assert len(result.cuts) == 3
    for found, true in zip(result.cuts, [3.0, 7.0, 9.5], strict=True):
        assert abs(found - true) <= 2 / FPS
    spans = [(s.start_s, s.end_s) for s in result.segments]
    assert spans == plan_segments(result.cuts, result.duration_s, SegmentSpec())
    assert result.failures == ()
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(14.5)
    for k, segment in enumerate(result.segments):
        clip = segment.clip
        assert clip.frames.shape == (6, 3, 16, 16) and clip.mask.all()
        assert ((clip.timestamps >= segment.start_s) & (clip.timestamps < segment.end_s)).all()
        assert {shot_of(f, COLOURS) for f in clip.frames} == {k}  # no frame of another shot
        parts = segment.start_s + (np.arange(6) + 0.5) / 6 * (segment.end_s - segment.start_s)
        spacing = (segment.end_s - segment.start_s) / 6
        assert np.abs(clip.timestamps - parts).max() <= spacing / 2 + 1 / FPS


def test_segment_frames_are_preprocessed_as_decode_video_does(cut_video: Path) -> None:
    result = segment_video(cut_video, "shots", num_frames=6, image_size=24)
    matched = 0
    for segment in result.segments:
        reference = decode_video(
            cut_video, 6, 24, start_s=segment.start_s, end_s=segment.end_s, timeout_s=None
        )
        for i, t in enumerate(segment.clip.timestamps):
            same = np.flatnonzero(np.isclose(reference.timestamps, t))
            if same.size:
                np.testing.assert_array_equal(segment.clip.frames[i], reference.frames[same[0]])
                matched += 1
    assert matched >= 3  # the check ran on real frames


def test_short_shots_merge_and_long_shots_split(tmp_path: Path) -> None:
    # 3 s, a 0.8 s flash, 4 s, then 11 s: with min 2 / max 4 the flash joins the next shot and
    # the 11 s shot becomes 4 s + two halves of 3.5 s
    path = write_shots(tmp_path / "mix.mp4", [3.0, 0.8, 4.0, 11.0])
    spec = SegmentSpec(min_s=2.0, max_s=4.0)
    result = segment_video(path, spec, num_frames=4, image_size=16)
    spans = [(round(s.start_s, 2), round(s.end_s, 2)) for s in result.segments]
    assert spans == [(0.0, 3.0), (3.0, 5.4), (5.4, 7.8), (7.8, 11.8), (11.8, 15.3), (15.3, 18.8)]
    assert all(2.0 - 1e-6 <= b - a <= 4.0 + 1e-6 for a, b in spans)


def test_fixed_windows(cut_video: Path) -> None:
    result = segment_video(cut_video, "fixed:4,1", num_frames=5, image_size=16)
    spans = [(s.start_s, s.end_s) for s in result.segments]
    assert spans == plan_segments([], result.duration_s, SegmentSpec.parse("fixed:4,1"))
    assert spans[0] == (0.0, 4.0) and spans[1] == (3.0, 7.0)
    assert spans[-1][1] == pytest.approx(14.5)
    assert result.cuts == ()  # no detection in fixed mode
    for segment in result.segments:
        t = segment.clip.timestamps
        assert ((t >= segment.start_s) & (t < segment.end_s)).all()


def test_short_video_is_one_segment_equal_to_decode_video(tmp_path: Path) -> None:
    path = write_shots(tmp_path / "short.mp4", [0.75, 0.75])  # a cut, but 1.5 s < min 2 s
    result = segment_video(path, "shots", num_frames=8, image_size=16)
    reference = decode_video(path, 8, 16)
    (segment,) = result.segments
    assert (segment.start_s, segment.end_s) == (0.0, reference.duration_s)
    np.testing.assert_array_equal(segment.clip.frames, reference.frames)
    np.testing.assert_array_equal(segment.clip.mask, reference.mask)
    np.testing.assert_array_equal(segment.clip.timestamps, reference.timestamps)


def test_none_equals_decode_video(cut_video: Path) -> None:
    result = segment_video(cut_video, "none", num_frames=12, image_size=16)
    reference = decode_video(cut_video, 12, 16)
    (segment,) = result.segments
    assert (segment.start_s, segment.end_s) == (0.0, reference.duration_s)
    np.testing.assert_array_equal(segment.clip.frames, reference.frames)
    np.testing.assert_array_equal(segment.clip.mask, reference.mask)
    np.testing.assert_array_equal(segment.clip.timestamps, reference.timestamps)


def test_static_and_black_videos_are_one_segment(tmp_path: Path) -> None:
    for name, colour in (("static", (90, 120, 150)), ("black", (0, 0, 0))):
        path = write_shots(tmp_path / f"{name}.mp4", [9.0], colours=[colour])
        result = segment_video(path, "shots", num_frames=4, image_size=16)
        assert result.cuts == ()
        (segment,) = result.segments
        assert segment.start_s == 0.0 and segment.end_s == pytest.approx(9.0)
        assert segment.clip.mask.all()


def test_change_that_builds_up_between_probes_is_no_cut(tmp_path: Path) -> None:
    """Grey frames whose brightness steps by 60 a frame (up and down): ContentDetector scores
    ~20 between consecutive frames (under its threshold 27) but 40 or more between frames two
    or four apart, so the probes see changes; rerun frame by frame, none is a cut."""
    levels = [30, 90, 150, 210, 150, 90]
    path = tmp_path / "ramp.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast", "g": str(FPS)}
        for i in range(8 * FPS):
            image = np.full((48, 64, 3), levels[i % len(levels)], dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    result = segment_video(path, "shots", num_frames=4, image_size=16)
    assert result.cuts == ()
    (segment,) = result.segments
    assert segment.end_s == pytest.approx(8.0)


def test_one_frame_video_pads_like_decode_video(tmp_path: Path) -> None:
    path = write_shots(tmp_path / "one.mp4", [1 / FPS])
    (segment,) = segment_video(path, "shots", num_frames=4, image_size=16).segments
    reference = decode_video(path, 4, 16)
    assert segment.clip.mask.tolist() == [True, False, False, False] == reference.mask.tolist()
    np.testing.assert_array_equal(segment.clip.frames, reference.frames)


def test_corrupt_middle_loses_only_its_segments(tmp_path: Path) -> None:
    path = write_shots(tmp_path / "good.mp4", [4.0] * 6)  # cuts every 4 s, 24 s
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 600] = np.random.default_rng(1).integers(0, 256, 600, np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    result = segment_video(bad, "shots", num_frames=4, image_size=16)
    assert result.failures, "the corrupt stretch was not reported"
    for failure in result.failures:
        assert 0 < failure.start_s < failure.end_s < 24.0 and "\n" not in failure.reason
    covered = sorted(
        [(s.start_s, s.end_s) for s in result.segments]
        + [(f.start_s, f.end_s) for f in result.failures]
    )
    assert covered[0][0] == 0.0 and covered[-1][1] == pytest.approx(24.0)
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(covered, covered[1:], strict=False))
    assert sum(s.end_s - s.start_s for s in result.segments) >= 12.0  # the rest came back


def test_truncated_file_reports_the_missing_tail(tmp_path: Path) -> None:
    path = write_shots(tmp_path / "fs.mp4", [4.0] * 5, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    result = segment_video(cut, "shots", num_frames=4, image_size=16)
    assert result.segments and result.duration_s == pytest.approx(20.0)
    tail = result.failures[-1]
    assert tail.end_s == pytest.approx(20.0) and tail.start_s == result.segments[-1].end_s
    assert tail.start_s < 16.0


def test_bad_input_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="no such file"):
        segment_video(tmp_path / "missing.mp4")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="noise.mp4"):
        segment_video(noise)
    with pytest.raises(InvalidInputError, match="window length .* got 0"):
        segment_video(noise, "fixed:0")
    with pytest.raises(InvalidInputError, match="num_frames"):
        list(iter_segments(noise, num_frames=0))


def test_iter_segments_yields_the_same_segments(cut_video: Path) -> None:
    items = list(iter_segments(cut_video, "shots", num_frames=4, image_size=16))
    collected = segment_video(cut_video, "shots", num_frames=4, image_size=16)
    assert all(isinstance(i, Segment) for i in items)
    assert [(i.start_s, i.end_s) for i in items] == [
        (s.start_s, s.end_s) for s in collected.segments
    ]


def test_candidates_stay_bounded_on_an_endless_shot() -> None:
    candidates = _Candidates(capacity=16, base_spacing=0.01, keep_raw=True, prepare=None)
    for i in range(100_000):  # an hour at ~28 fps, no cut
        candidates.offer(i, i / 28.0)
        assert len(candidates.times) <= 17
    times, _ = candidates.pick((0.0, 100_000 / 28.0), 8)  # type: ignore[misc]
    assert times == sorted(times) and len(set(times)) == 8


# ---- planning rules (pure) ----------------------------------------------------------------

durations = st.floats(min_value=0.0, max_value=4000.0, allow_nan=False)
specs = st.builds(
    lambda low, factor: SegmentSpec(min_s=low, max_s=min(3600.0, low * factor)),
    st.floats(min_value=0.5, max_value=60.0),
    st.floats(min_value=2.0, max_value=20.0),
)


@settings(max_examples=300, deadline=None)
@given(
    duration=durations,
    cuts=st.lists(st.floats(-10, 4100, allow_nan=False), max_size=60),
    spec=specs,
)
def test_shot_plan_covers_in_order_with_lengths_in_bounds(
    duration: float, cuts: list[float], spec: SegmentSpec
) -> None:
    plan = plan_segments(cuts, duration, spec)
    assert plan[0][0] == 0.0 and math.isclose(plan[-1][1], duration, abs_tol=1e-9)
    for (_, a1), (b0, _) in zip(plan, plan[1:], strict=False):
        assert a1 == b0  # no gap, no overlap
    if duration < spec.min_s:
        assert plan == [(0.0, duration)]
    else:
        for start, end in plan:
            assert spec.min_s - 1e-9 <= end - start <= spec.max_s + 1e-9
    assert plan == plan_segments(list(reversed(cuts)), duration, spec)  # deterministic


@settings(max_examples=200, deadline=None)
@given(
    duration=st.floats(min_value=0.0, max_value=500.0),
    cuts=st.lists(st.floats(0, 500), max_size=30),
    probes=st.lists(st.floats(0, 500), max_size=30),
)
def test_online_planner_equals_the_pure_plan(
    duration: float, cuts: list[float], probes: list[float]
) -> None:
    spec = SegmentSpec(min_s=2.0, max_s=10.0)
    planner = ShotPlanner(spec.min_s, spec.max_s)
    events = sorted([(t, 1) for t in cuts if 0 < t < duration] + [(t, 0) for t in probes])
    online = []
    for t, is_cut in events:
        if t <= duration:
            online += planner.cut(t) if is_cut else planner.advance(t)
    online += planner.finish(duration)
    assert online == plan_segments(cuts, duration, spec)


@settings(max_examples=200, deadline=None)
@given(
    duration=durations,
    length=st.floats(min_value=0.5, max_value=3600.0),
    share=st.floats(min_value=0.0, max_value=0.99),
)
def test_fixed_windows_cover_the_video(duration: float, length: float, share: float) -> None:
    overlap = min(length * share, length - 0.5)
    spec = SegmentSpec(mode="fixed", length_s=length, overlap_s=max(0.0, overlap))
    plan = plan_segments([], duration, spec)
    assert plan[0][0] == 0.0 and plan[-1][1] == duration
    for (a0, a1), (b0, b1) in zip(plan, plan[1:], strict=False):
        assert a0 < b0 <= a1 + 1e-9 and a1 < b1  # in order, overlapping or touching: no gap
    assert all(end - start <= length + 1e-9 for start, end in plan)


@given(
    length=st.floats(min_value=0.5, max_value=3600.0),
    overlap=st.floats(min_value=0.0, max_value=3600.0),
)
def test_parse_fixed_round_trips(length: float, overlap: float) -> None:
    text = f"fixed:{length!r},{overlap!r}"
    if overlap < length and length - overlap >= 0.5:
        spec = SegmentSpec.parse(text)
        assert (spec.mode, spec.length_s, spec.overlap_s) == ("fixed", length, overlap)
    else:
        with pytest.raises(InvalidInputError, match="overlap|step"):
            SegmentSpec.parse(text)


@given(text=st.text(max_size=40))
def test_parse_rejects_garbage_with_one_line(text: str) -> None:
    try:
        spec = SegmentSpec.parse(text)
    except InvalidInputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("segment spec")
    else:
        assert spec.mode in ("shots", "fixed", "none")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("fixed:-1", "-1"),
        ("fixed:0", "got 0"),
        ("fixed:10,10", "got 10"),
        ("fixed:10,12", "got 12"),
        ("fixed:nan", "nan"),
        ("fixed:inf,1", "inf"),
        ("fixed:1e9", "1e+09"),
        ("fixed:ten", "ten"),
        ("fixed:", "''"),
        ("shots:3", "shots:3"),
        ("moments", "moments"),
    ],
)
def test_parse_errors_name_the_value(text: str, named: str) -> None:
    with pytest.raises(InvalidInputError, match=named.replace("+", r"\+")):
        SegmentSpec.parse(text)


def test_spec_defaults_and_bounds() -> None:
    assert SegmentSpec.parse(" Shots ") == SegmentSpec()
    assert (SegmentSpec().min_s, SegmentSpec().max_s) == (2.0, 30.0)
    assert str(SegmentSpec.parse("fixed:10,2")) == "fixed:10,2"
    with pytest.raises(InvalidInputError, match="maximum"):
        SegmentSpec(min_s=5.0, max_s=8.0)  # max must be >= 2 x min
    with pytest.raises(InvalidInputError, match="finite"):
        SegmentSpec(min_s=float("nan"))
    with pytest.raises(InvalidInputError, match="duration"):
        plan_segments([], -1.0, SegmentSpec())

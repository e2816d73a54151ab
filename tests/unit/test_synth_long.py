"""``tb synth --long``: long videos of several events with hard cuts, their time-reversed twins,
and moment annotations that match the files (read back with PyAV)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.data.moments import load_moments
from tb_reranker.errors import AlreadyExistsError, InvalidInputError
from tb_reranker.video.synth import caption, time_reversed, twin_groups
from tb_reranker.video.synth_long import (
    INDEX_FILE,
    MIN_EVENT_FRAMES,
    MIN_LEVEL_STEP,
    MOMENTS_FILE,
    SHOT_SMOOTH_FRAMES,
    _continuous,
    generate_long,
    plan_long,
)

pytestmark = pytest.mark.timeout(180)

TINY = dict(num_pairs=2, events_per_video=3, event_s=1.5, fps=4, size=32, seed=3, progress=False)


def raw_frames(path: Path) -> np.ndarray:
    """Every decoded frame, uint8 RGB [F, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stream_duration_s(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def index(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / INDEX_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("long") / "set"
    result = generate_long(root, **TINY)
    assert not result.skipped and result.created == 4
    return root


def test_layout_and_annotations_match_the_files(tiny: Path) -> None:
    records = index(tiny)
    assert [r["video_id"] for r in records] == [f"long_{i:06d}" for i in range(4)]
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["params"]["num_pairs"] == 2 and meta["num_videos"] == 4
    moments = load_moments(tiny / MOMENTS_FILE)  # the loader reads what the generator wrote
    assert len(moments) == sum(len(r["events"]) for r in records)
    for record in records:
        path = tiny / record["path"]
        frames = raw_frames(path)
        assert frames.shape == (record["num_frames"], 32, 32, 3)
        assert stream_duration_s(path) == pytest.approx(record["duration_s"], abs=1e-6)
        assert record["duration_s"] == record["num_frames"] / 4
        events = record["events"]
        assert len(events) == 3
        assert len({e["caption"] for e in events}) == 3  # unique within the video
        assert events[0]["start_frame"] == 0 and events[-1]["end_frame"] == record["num_frames"]
        for before, after in zip(events, events[1:], strict=False):
            assert before["end_frame"] == after["start_frame"]  # back to back, no gap
        for e in events:
            assert e["end_frame"] - e["start_frame"] >= MIN_EVENT_FRAMES
            assert (e["start_s"], e["end_s"]) == (e["start_frame"] / 4, e["end_frame"] / 4)
        mine = [m for m in moments if m.video_id == record["video_id"]]
        assert [(m.caption, m.start_s, m.end_s) for m in mine] == [
            (e["caption"], e["start_s"], e["end_s"]) for e in events
        ]
        assert all(m.duration_s == pytest.approx(stream_duration_s(path)) for m in mine)
    # every caption is true of exactly one video of the set, and names its span there
    captions = [m.caption for m in moments]
    assert len(set(captions)) == len(captions)
    owner = {(e["caption"]): (r["video_id"], e["start_s"], e["end_s"]) for r in records
             for e in r["events"]}  # fmt: skip
    assert {m.caption: (m.video_id, m.start_s, m.end_s) for m in moments} == owner


def test_twins_are_the_videos_played_backwards(tiny: Path) -> None:
    records = index(tiny)
    for first, second in zip(records[0::2], records[1::2], strict=True):
        assert first["twin"] == second["video_id"] and second["twin"] == first["video_id"]
        assert (first["reversed"], second["reversed"]) == (False, True)
        assert first["duration_s"] == second["duration_s"]
        fa = raw_frames(tiny / first["path"]).astype(np.float32)
        fb = raw_frames(tiny / second["path"]).astype(np.float32)
        # the twin's frames are the video's frames in reversed order (up to the codec) ...
        assert np.abs(fb - fa[::-1]).mean() < 4.0
        assert np.abs(fb - fa).mean() > 5 * np.abs(fb - fa[::-1]).mean()  # ... not in order
        # ... so its events are the video's, last first, each reversed and captioned so
        a, b = first["events"], second["events"][::-1]
        n = first["num_frames"]
        for x, y in zip(a, b, strict=True):
            assert (y["start_frame"], y["end_frame"]) == (n - x["end_frame"], n - x["start_frame"])
            assert x["start_frame"] != y["start_frame"]  # never at the same time in both
            assert x["family"] == y["family"] and x["caption"] != y["caption"]
        # whole-video mean pooling cannot tell the twins apart; frame by frame it can
        assert np.abs(fa.mean(0) - fb.mean(0)).mean() < 0.1 * np.abs(fa - fb).mean()
    planned = generate_long(tiny, **TINY).videos  # an identical rerun: the plan, nothing written
    for forward, backward in zip(planned[0::2], planned[1::2], strict=True):
        for x, y in zip(forward.events, backward.events[::-1], strict=True):
            objects, direction = time_reversed(x.family, x.objects, x.direction)
            assert (y.objects, y.direction) == (objects, direction)
            assert y.caption == caption(y.family, objects, direction)


def test_reversed_captions_read_as_the_events_played_backwards() -> None:
    red_square, blue_circle = ("red", "square"), ("blue", "circle")
    for family, objects, direction, backwards in (
        ("order", (red_square, blue_circle), "", "a blue circle then a red square"),
        ("motion", (red_square,), "left", "a red square moving right"),
        ("motion", (red_square,), "up-left", "a red square moving down-right"),
        (
            "colour",
            (("red", "square"), ("blue", "square")),
            "",
            "a square turning from blue to red",
        ),
    ):
        reverse = time_reversed(family, objects, direction)
        assert caption(family, *reverse) == backwards
        assert time_reversed(family, *reverse) == (tuple(objects), direction)  # an involution


def _changes(frames: np.ndarray) -> np.ndarray:
    """The 25th percentile over pixels of |frame t+1 - frame t| (channel mean): [F - 1]. Objects
    cover under three quarters of a frame, so this is the background's change."""
    diff = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=3)
    return np.percentile(diff.reshape(len(diff), -1), 25, axis=1)


def test_cuts_are_visible_shot_changes(tiny: Path, tmp_path: Path) -> None:
    """The background changes at every cut and stays still (noise, codec) inside events, even
    when an order event swaps its objects or a motion event moves one."""
    roots = [tiny]
    for seed in range(3):  # more events, and every family
        roots.append(tmp_path / str(seed))
        generate_long(roots[-1], **{**TINY, "num_pairs": 1, "events_per_video": 6, "seed": seed})
    for root in roots:
        for record in index(root):
            change = _changes(raw_frames(root / record["path"]))
            cuts = [e["start_frame"] - 1 for e in record["events"][1:]]  # into a new event
            inside = np.delete(change, cuts)
            assert change[cuts].min() >= 15.0, (record["video_id"], change[cuts])
            assert inside.max() <= 6.0, (record["video_id"], inside.max())


def test_an_event_is_one_continuous_shot() -> None:
    """Inside an event each frame is the mean of its neighbours (``SHOT_SMOOTH_FRAMES``): an
    order event's swap of A for B becomes a linear dissolve, the ends keep their own frames'
    content (cuts stay one-frame changes), and playing it backwards commutes with it (twins)."""
    width = SHOT_SMOOTH_FRAMES
    assert width % 2 == 1 and width >= 3
    step = np.zeros((20, 2, 2, 3), dtype=np.uint8)
    step[10:] = 210  # object A until frame 10, then B
    out = _continuous(step)
    ramp = out[:, 0, 0, 0].astype(float)
    half = width // 2
    assert (ramp[: 10 - half] == 0).all() and (ramp[10 + half :] == 210).all()
    assert np.allclose(np.diff(ramp[10 - half - 1 : 10 + half + 1]), 210 / width, atol=1)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 4, 4, 3), dtype=np.uint8)
    assert np.array_equal(_continuous(frames[::-1]), _continuous(frames)[::-1])
    noise = rng.normal(100, 4, size=(50, 8, 8, 3)).clip(0, 255).astype(np.uint8)
    change = np.abs(np.diff(_continuous(noise).astype(float), axis=0)).mean()
    assert change < 2.0 * np.abs(np.diff(noise.astype(float), axis=0)).mean() / width


def test_shot_detection_finds_exactly_the_events(tmp_path: Path) -> None:
    """The product's ``shots`` segmentation cuts a long video at its event bounds and nowhere
    else, order events (A swapped for B) included: one segment per event."""
    from tb_reranker.video.segment import segment_video

    root = tmp_path / "shots"
    generate_long(root, num_pairs=2, events_per_video=5, event_s=3.0, fps=8, size=64, seed=7,
                  progress=False)  # fmt: skip
    records = index(root)
    assert sum(e["family"] == "order" for r in records for e in r["events"]) >= 2
    for record in records:
        cut = segment_video(root / record["path"], "shots", num_frames=2, image_size=16)
        starts = [e["start_s"] for e in record["events"][1:]]
        assert list(cut.cuts) == pytest.approx(starts, abs=1e-6), record["video_id"]
        spans = [t for s in cut.segments for t in (s.start_s, s.end_s)]
        windows = [t for e in record["events"] for t in (e["start_s"], e["end_s"])]
        assert spans == pytest.approx(windows, abs=1e-6), record["video_id"]


def test_captions_read_like_the_clip_benchmark(tiny: Path) -> None:
    from tb_reranker.video.synth_long import _catalogue

    for record in index(tiny):
        for e in record["events"]:
            assert e["family"] in ("order", "motion", "colour")
    groups = _catalogue(("order", "motion", "colour"))
    assert len(groups) == 276 + 96 + 112
    assert groups == [(f, *g) for f in ("order", "motion", "colour") for g in twin_groups(f)]
    both_ways = [caption(f, o, d) for f, o, d in groups]
    both_ways += [caption(f, *time_reversed(f, o, d)) for f, o, d in groups]
    assert len(set(both_ways)) == len(both_ways) == 24 * 23 + 24 * 8 + 4 * 8 * 7


def test_a_set_needing_more_twin_groups_than_the_families_hold_is_refused(tmp_path: Path) -> None:
    videos = plan_long(24, events_per_video=4, families=("motion",), seed=5)  # all 96 groups
    assert len({e.caption for v in videos for e in v.events}) == 2 * 96
    with pytest.raises(InvalidInputError, match="96 twin groups"):
        generate_long(tmp_path / "x", **{**TINY, "num_pairs": 25, "events_per_video": 4,
                                          "families": ("motion",)})  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_deterministic_rerun_force_and_conflict(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_long(again, **TINY)
    for name in (INDEX_FILE, MOMENTS_FILE, *(f"videos/long_{i:06d}.mp4" for i in range(4))):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    clip = again / "videos" / "long_000001.mp4"
    stamp = clip.stat().st_mtime_ns
    rerun = generate_long(again, **TINY)
    assert rerun.skipped and rerun.created == 0 and clip.stat().st_mtime_ns == stamp
    with pytest.raises(AlreadyExistsError, match="--force"):
        generate_long(again, **{**TINY, "seed": 4})
    forced = generate_long(again, **{**TINY, "seed": 4, "num_pairs": 1}, force=True)
    assert forced.created == 2
    assert sorted(p.name for p in (again / "videos").iterdir()) == [
        "long_000000.mp4",
        "long_000001.mp4",
    ]
    assert (again / MOMENTS_FILE).read_bytes() != (tiny / MOMENTS_FILE).read_bytes()
    clip.with_name("long_000000.mp4").unlink()  # an incomplete output is redone, not trusted
    assert generate_long(again, **{**TINY, "seed": 4, "num_pairs": 1}).created == 2


def test_duration_min_makes_long_files(tmp_path: Path) -> None:
    root = tmp_path / "minutes"
    result = generate_long(
        root, num_pairs=1, duration_min=0.25, event_s=2.0, fps=2, size=16, progress=False
    )
    for video in result.videos:
        path = root / "videos" / f"{video.video_id}.mp4"
        assert stream_duration_s(path) >= 15.0
        assert stream_duration_s(path) == pytest.approx(video.duration_s)
        assert len(video.events) >= 4
    # a ten-minute plan (what the decode-cost benchmark needs), without rendering it
    for video in plan_long(1, duration_min=10.0, fps=8, seed=1):
        assert video.duration_s >= 600.0
        assert video.duration_s - video.events[-1].num_frames / 8 < 600.0  # no event too many
        assert len({e.caption for e in video.events}) == len(video.events)


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.integers(1, 3),
    events=st.integers(2, 9),
    event_s=st.floats(0.2, 20.0),
    fps=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    families=st.sampled_from([("order",), ("motion",), ("colour",), ("order", "motion", "colour")]),
)
def test_plan_properties(
    pairs: int, events: int, event_s: float, fps: int, seed: int, families: tuple[str, ...]
) -> None:
    videos = plan_long(
        pairs, events_per_video=events, event_s=event_s, fps=fps, seed=seed, families=families
    )
    assert len(videos) == 2 * pairs
    assert plan_long(
        pairs, events_per_video=events, event_s=event_s, fps=fps, seed=seed, families=families
    ) == videos  # fmt: skip
    captions = [e.caption for v in videos for e in v.events]
    assert len(set(captions)) == len(captions)  # each caption true of one video only
    for forward, backward in zip(videos[0::2], videos[1::2], strict=True):
        assert not any(e.reversed for e in forward.events)
        assert all(e.reversed for e in backward.events)
        assert [e.index for e in backward.events] == [e.index for e in forward.events[::-1]]
        assert [e.num_frames for e in backward.events] == [
            e.num_frames for e in forward.events[::-1]
        ]
        assert len(forward.events) == events
        assert len({e.caption for e in forward.events}) == events
        assert {e.family for e in forward.events} <= set(families)
        for e in forward.events:  # the first may be lengthened to keep twin times apart
            assert e.num_frames >= MIN_EVENT_FRAMES
            if e.index > 0:
                assert e.num_frames <= max(MIN_EVENT_FRAMES, round(1.25 * event_s * fps) + 1)
        for a, b in zip(forward.events, forward.events[1:], strict=False):
            assert abs(a.level - b.level) >= MIN_LEVEL_STEP  # every cut changes the background
        starts = {e.index: w[0] for e, w in zip(forward.events, forward.windows(), strict=True)}
        ends = {e.index: w[1] for e, w in zip(forward.events, forward.windows(), strict=True)}
        for e, w in zip(backward.events, backward.windows(), strict=True):
            assert starts[e.index] != w[0]
            assert w[0] == pytest.approx(forward.duration_s - ends[e.index])
        assert forward.windows()[-1][1] == forward.duration_s


@pytest.mark.parametrize(
    "change",
    [
        {"num_pairs": 0},
        {"events_per_video": 1},
        {"event_s": 0.0},
        {"event_s": float("nan")},
        {"duration_min": -1.0},
        {"fps": 0},
        {"size": 31},
        {"size": 8},
        {"seed": -1},
        {"families": ("order", "order")},
        {"families": ("zoom",)},
        {"background": "busy"},
        {"duration_min": 600.0, "event_s": 1.0},  # more events than distinct contents
    ],
)
def test_bad_arguments(tmp_path: Path, change: dict) -> None:
    with pytest.raises(InvalidInputError):
        generate_long(tmp_path / "x", **{**TINY, **change})
    assert not (tmp_path / "x").exists()  # refused before anything is written


def tb(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", "synth", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_long(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    flags = ["--long", "--pairs", "1", "--events", "2", "--event-s", "1", "--fps", "4"]
    done = tb(str(out), *flags, "--size", "32", "--seed", "7", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["videos"] == 2 and report["events"] == 4 and report["created"] == 2
    moments = load_moments(out / MOMENTS_FILE)
    assert {m.video_id for m in moments} == {"long_000000", "long_000001"}
    for m in moments:
        assert m.end_s <= stream_duration_s(out / "videos" / f"{m.video_id}.mp4") + 1e-9
    again = tb(str(out), *flags, "--size", "32", "--seed", "7", "--no-progress")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    for bad in (
        [*flags, "--events", "1"],  # a twin of one event is the same video
        [*flags, "--event-s", "-1"],
        [*flags, "--train", "4"],  # a clip-benchmark flag
        ["--events", "3"],  # a --long flag without --long
    ):
        refused = tb(str(tmp_path / "bad"), *bad, "--no-progress")
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2, (bad, refused.stderr)
        assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert not (tmp_path / "bad").exists()

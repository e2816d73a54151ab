"""Moment annotations (``data/moments.py``: ActivityNet Captions, Charades-STA, QVHighlights) and
the moment metrics (``metrics.temporal_iou``, ``metrics.moment_recall``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker.data.moments import Moment, load_moments
from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.metrics import moment_recall, temporal_iou

ANET = {
    "v_a": {
        "duration": 20.0,
        "timestamps": [[0.0, 5.5], [4, 20]],
        "sentences": ["a man runs.", "  he  jumps "],
    },
    "v_b": {"duration": 8, "timestamps": [[1, 2]], "sentences": ["a dog barks"]},
}
CHARADES = "3MSZA 24.3 30.4##person turn a light on.\n\nAO8RW 0.0 6.9##a person is putting a book on a shelf.\n"  # noqa: E501
QVH = [
    {"qid": 1, "query": "a cat sleeps", "vid": "vidA_60.0_210.0", "duration": 150,
     "relevant_windows": [[0, 4], [10, 24]]},
    {"qid": 2, "query": "rain on a window", "vid": "vidB", "duration": 126.5,
     "relevant_windows": [[100, 126.5]]},
]  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# -- the three formats ------------------------------------------------------------------------


def test_activitynet(tmp_path: Path) -> None:
    path = write(tmp_path / "val_1.json", json.dumps(ANET))
    moments = load_moments(path)  # format guessed
    assert moments == [
        Moment("v_a", "a man runs.", 0.0, 5.5, 20.0),
        Moment("v_a", "he jumps", 4.0, 20.0, 20.0),
        Moment("v_b", "a dog barks", 1.0, 2.0, 8.0),
    ]
    assert load_moments(path, "activitynet") == moments
    assert all(isinstance(m.start_s, float) and isinstance(m.end_s, float) for m in moments)


def test_charades(tmp_path: Path) -> None:
    path = write(tmp_path / "charades_sta_test.txt", CHARADES)
    moments = load_moments(path)
    assert moments == [
        Moment("3MSZA", "person turn a light on.", 24.3, 30.4, None),
        Moment("AO8RW", "a person is putting a book on a shelf.", 0.0, 6.9, None),
    ]
    assert load_moments(path, format="charades") == moments


def test_qvhighlights_one_moment_per_window(tmp_path: Path) -> None:
    path = write(tmp_path / "highlight_val.jsonl", jsonl(QVH))
    moments = load_moments(path)
    assert moments == [
        Moment("vidA_60.0_210.0", "a cat sleeps", 0.0, 4.0, 150.0),
        Moment("vidA_60.0_210.0", "a cat sleeps", 10.0, 24.0, 150.0),
        Moment("vidB", "rain on a window", 100.0, 126.5, 126.5),
    ]
    # one query on one line is still JSON lines, not ActivityNet
    single = write(tmp_path / "one.jsonl", jsonl(QVH[:1]))
    assert len(load_moments(single)) == 2


def test_wrong_format_named_is_an_error_not_a_guess(tmp_path: Path) -> None:
    path = write(tmp_path / "val_1.json", json.dumps(ANET))
    with pytest.raises(InvalidInputError, match="val_1.json"):
        load_moments(path, format="charades")
    with pytest.raises(InvalidInputError, match="unknown moment format"):
        load_moments(path, format="didemo")
    with pytest.raises(NotFoundError):
        load_moments(tmp_path / "absent.json")


def _anet(**changes: object) -> str:
    entry = {"duration": 10.0, "timestamps": [[1.0, 2.0]], "sentences": ["a cat"]}
    entry.update(changes)
    return json.dumps({"v_x": {k: v for k, v in entry.items() if v is not None}})


@pytest.mark.parametrize(
    ("name", "text", "fmt", "expected"),
    [
        ("a.json", _anet(timestamps=[[3.0, 2.0]]), None, r"'v_x' \[0\]: start 3 > end 2"),
        ("a.json", _anet(timestamps=[[-1, 2.0]]), None, r"'v_x' \[0\] start: must be"),
        ("a.json", _anet(timestamps=[[1.0, 12.0]]), None, r"end 12 is past the duration 10"),
        ("a.json", _anet(timestamps=[["1", 2.0]]), None, r"\[0\] start: expected a number"),
        ("a.json", _anet(timestamps=[[1.0]]), None, r"a window must be \[start, end\]"),
        ("a.json", _anet(duration=None), None, r"'v_x': missing \"duration\""),
        ("a.json", _anet(duration=0), None, r"duration: must be a finite number > 0"),
        ("a.json", _anet(sentences=["a", "b"]), None, r"1 timestamps for 2 sentences"),
        ("a.json", _anet(sentences=["   "]), None, r"empty sentence"),
        ("a.json", _anet(sentences=[3]), None, r"caption must be a string"),
        ("a.json", '{"v_x": {"duration": 1,', None, r"invalid JSON at line 1"),
        ("a.json", "[1, 2]", "activitynet", r"expected a JSON object"),
        ("c.txt", "V 1 2##ok\nV 5 4##bad\n", None, r"line 2: start 5 > end 4"),
        ("c.txt", "V 1 two##bad\n", None, r"line 1 end: 'two' is not a number"),
        ("c.txt", "V 1 nan##bad\n", None, r"line 1 end: must be a finite number"),
        ("c.txt", "V 1 1_0##bad\n", None, r"line 1 end: '1_0' is not a number"),
        ("c.txt", "V 1 2##ok\nV 1##bad\n", None, r"line 2: expected 'VIDEO START END##"),
        ("c.txt", "V 1 2 sentence\n", "charades", r"line 1: expected"),
        ("c.txt", "V 1 2##   \n", None, r"line 1: empty sentence"),
        ("q.jsonl", jsonl([QVH[0], {**QVH[1], "duration": "x"}]), None, r"line 2 duration"),
        ("q.jsonl", jsonl([{k: v for k, v in QVH[0].items() if k != "vid"}]), None, r"\"vid\""),
        ("q.jsonl", jsonl([{**QVH[0], "relevant_windows": []}]), None, r"non-empty list"),
        ("q.jsonl", jsonl([{**QVH[0], "relevant_windows": [[0, 151]]}]), None, r"line 1 \[0\]"),
        ("q.jsonl", jsonl(QVH[:1]) + "{oops\n", None, r"line 2: invalid JSON"),
        ("e.txt", "\n \n", None, r"no moments"),
        ("e.txt", "just words\n", None, r"cannot tell its format"),
    ],
)
def test_malformed_files_name_the_file_and_the_place(
    tmp_path: Path, name: str, text: str, fmt: str | None, expected: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(InvalidInputError, match=expected) as info:
        load_moments(path, fmt)
    assert str(path) in str(info.value)


def test_clip_to_duration_clips_ends_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "a.json", _anet(timestamps=[[1.0, 10.4]]))
    with pytest.raises(InvalidInputError, match="past the duration"):
        load_moments(path)
    (moment,) = load_moments(path, clip_to_duration=True)
    assert (moment.start_s, moment.end_s) == (1.0, 10.0)
    assert "1 window(s) ended past" in caplog.text
    late = write(tmp_path / "b.json", _anet(timestamps=[[11.0, 12.0]]))
    with pytest.raises(InvalidInputError):  # a window wholly past the end is not clipped
        load_moments(late, clip_to_duration=True)


# -- round trips (Hypothesis) -----------------------------------------------------------------

_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.",
    min_size=1,
    max_size=12,
)  # noqa: E501
_words = st.text(alphabet="abcdefgh XYZ,.#'é", min_size=1, max_size=30).map(" ".join)
_captions = _words.map(lambda t: " ".join(t.split())).filter(bool)
# times at millisecond resolution, as annotations give them (sub-normal gaps such as 2e-313 s
# make IoU round to exactly 1 for different intervals: float rounding, not a metric property)
_times = st.integers(0, 5_000_000).map(lambda ms: ms / 1000)


@st.composite
def moment_lists(draw: st.DrawFn, with_duration: bool) -> list[Moment]:
    moments = []
    for _ in range(draw(st.integers(1, 6))):
        start, end = sorted((draw(_times), draw(_times)))
        duration = max(end, draw(_times), 1e-3) if with_duration else None
        moments.append(Moment(draw(_ids), draw(_captions), start, end, duration))
    return moments


_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(moments=moment_lists(with_duration=False))
def test_charades_round_trip(tmp_path: Path, moments: list[Moment]) -> None:
    lines = [f"{m.video_id} {m.start_s!r} {m.end_s!r}##{m.caption}" for m in moments]
    path = write(tmp_path / "c.txt", "\n".join(lines) + "\n")
    assert load_moments(path) == moments


@_SETTINGS
@given(moments=moment_lists(with_duration=True))
def test_qvhighlights_round_trip(tmp_path: Path, moments: list[Moment]) -> None:
    records = [
        {"qid": i, "query": m.caption, "vid": m.video_id, "duration": m.duration_s,
         "relevant_windows": [[m.start_s, m.end_s]]}
        for i, m in enumerate(moments)
    ]  # fmt: skip
    path = write(tmp_path / "q.jsonl", jsonl(records))
    assert load_moments(path) == moments


@_SETTINGS
@given(moments=moment_lists(with_duration=True))
def test_activitynet_round_trip(tmp_path: Path, moments: list[Moment]) -> None:
    videos: dict[str, dict] = {}  # one duration per video: the first moment's
    expected = []
    for m in moments:
        entry = videos.setdefault(
            m.video_id, {"duration": m.duration_s, "timestamps": [], "sentences": []}
        )
        if m.end_s > entry["duration"]:
            continue
        entry["timestamps"].append([m.start_s, m.end_s])
        entry["sentences"].append(m.caption)
    for video_id, entry in videos.items():  # file order: video by video
        expected += [
            Moment(video_id, c, s, e, entry["duration"])
            for (s, e), c in zip(entry["timestamps"], entry["sentences"], strict=True)
        ]
    path = write(tmp_path / "a.json", json.dumps(videos))
    if expected:
        assert load_moments(path) == expected
    else:
        with pytest.raises(InvalidInputError, match="no moments"):
            load_moments(path)


# -- metrics ----------------------------------------------------------------------------------


def test_temporal_iou_examples() -> None:
    assert temporal_iou([0, 2], [1, 3]) == pytest.approx(1 / 3)
    assert temporal_iou((0.0, 10.0), (2.5, 5.0)) == pytest.approx(0.25)
    assert temporal_iou([0, 1], [1, 2]) == 0.0  # touching
    assert temporal_iou([0, 1], [0, 1]) == 1.0
    assert temporal_iou([3, 3], [3, 3]) == 0.0  # zero length: no NaN
    assert temporal_iou([3, 3], [0, 5]) == 0.0
    for bad in ([1, 0], [0, math.nan], [0, math.inf], "ab", [[0, 1], [2]], [[0, 1], [1, 2]], []):
        with pytest.raises(InvalidInputError):
            temporal_iou(bad, [0, 1])


_interval = st.tuples(_times, _times).map(sorted)


@settings(max_examples=300, deadline=None)
@given(a=_interval, b=_interval)
def test_temporal_iou_properties(a: list[float], b: list[float]) -> None:
    iou = temporal_iou(a, b)
    assert not math.isnan(iou) and 0.0 <= iou <= 1.0
    assert iou == temporal_iou(b, a)
    assert (iou == 1.0) == (a == b and a[1] > a[0])
    if a[1] <= b[0] or b[1] <= a[0]:
        assert iou == 0.0
    shifted = temporal_iou([a[0] + 7, a[1] + 7], [b[0] + 7, b[1] + 7])
    assert shifted == pytest.approx(iou, abs=1e-9)  # only relative position matters


@settings(max_examples=200, deadline=None)
@given(a=_interval, b=_interval, c=_interval)
def test_moment_recall_matches_a_direct_count(
    a: list[float], b: list[float], c: list[float]
) -> None:
    predicted = [a, [b, a], c]  # a ranked list: only its first window counts
    truth = [b, c, [a, c]]  # several windows: the best counts
    ious = [temporal_iou(a, b), temporal_iou(b, c), max(temporal_iou(c, a), temporal_iou(c, c))]
    got = moment_recall(predicted, truth, thresholds=(0.3, 0.5, 0.7, 1.0))
    for t in (0.3, 0.5, 0.7, 1):
        assert got[f"R1@IoU{t:g}"] == pytest.approx(100 * np.mean([i >= t for i in ious]))
    assert got["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert got["num_queries"] == 3


def test_moment_recall_default_keys_and_errors() -> None:
    predicted = np.array([[0.0, 10.0], [20.0, 30.0], [0.0, 1.0], [5.0, 7.0]])
    truth = [[0, 10], [20, 34], [[5, 6], [0, 1.5]], [0, 1]]
    assert moment_recall(predicted, truth) == {
        "R1@IoU0.5": 75.0,  # IoUs 1, 10/14, 2/3, 0
        "R1@IoU0.7": 50.0,
        "mIoU": pytest.approx(100 * (1 + 10 / 14 + 2 / 3 + 0) / 4),
        "num_queries": 4,
    }
    with pytest.raises(InvalidInputError, match="2 predictions for 1"):
        moment_recall([[0, 1], [0, 1]], [[0, 1]])
    with pytest.raises(InvalidInputError, match="no queries"):
        moment_recall([], [])
    for thresholds in ((0.0,), (1.5,), (True,), ("0.5",)):
        with pytest.raises(InvalidInputError, match="thresholds"):
            moment_recall([[0, 1]], [[0, 1]], thresholds)
    with pytest.raises(InvalidInputError, match=r"ground_truth\[0\]"):
        moment_recall([[0, 1]], [[2, 1]])
    with pytest.raises(InvalidInputError, match=r"predicted\[0\]"):
        moment_recall([[]], [[0, 1]])


def test_loaded_moments_score_against_themselves(tmp_path: Path) -> None:
    """The loader's output feeds the metric: a query's windows are its ground truth."""
    moments = load_moments(write(tmp_path / "q.jsonl", jsonl(QVH)))
    queries: dict[tuple[str, str], list[list[float]]] = {}
    for m in moments:
        queries.setdefault((m.video_id, m.caption), []).append([m.start_s, m.end_s])
    truth = list(queries.values())
    assert moment_recall([w[-1] for w in truth], truth)["R1@IoU0.7"] == 100.0
    assert moment_recall([[0, 150], [0, 10]], truth)["R1@IoU0.5"] == 0.0

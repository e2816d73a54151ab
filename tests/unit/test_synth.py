"""The synthetic hard-negative benchmark: real MP4s, determinism, splits, the twin property, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from tb_reranker.cli import main
from tb_reranker.errors import AlreadyExistsError, InvalidInputError
from tb_reranker.video import decode_video
from tb_reranker.video.synth import COLOURS, SHAPES, generate

pytestmark = pytest.mark.timeout(180)

CAPTION_WORDS = {f"a {c} {s}" for c in COLOURS for s in SHAPES}


def read_records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]


def raw_frames(path: Path) -> np.ndarray:
    """Every decoded frame, uint8 RGB [F, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "ds"
    result = generate(root, num_train=12, num_val=4, num_test=20, seed=5, workers=2, progress=False)
    assert not result.skipped and result.created == 36
    return root


def test_layout_splits_and_captions(dataset: Path) -> None:
    records = read_records(dataset)
    assert [r["split"] for r in records] == ["train"] * 12 + ["val"] * 4 + ["test"] * 20
    assert len({r["video_id"] for r in records}) == 36
    for record in records:
        assert set(record) >= {"video_id", "path", "captions", "split"}
        assert record["path"] == f"videos/{record['video_id']}.mp4"
        assert (dataset / record["path"]).is_file()
        (caption,) = record["captions"]
        first, _, second = caption.partition(" then ")
        assert first in CAPTION_WORDS and second in CAPTION_WORDS and first != second
    test_captions = [r["captions"][0] for r in records if r["split"] == "test"]
    assert len(set(test_captions)) == len(test_captions)  # unambiguous ground truth
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["counts"] == {"train": 12, "val": 4, "test": 20}
    assert meta["generator_version"]


def test_clips_are_real_mp4s_with_expected_geometry(dataset: Path) -> None:
    path = dataset / "videos" / "test_000000.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("mov,mp4")
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (32, 32)
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert raw_frames(path).shape == (16, 32, 32, 3)
    clip = decode_video(path, num_frames=12, image_size=32)
    assert clip.mask.all() and clip.duration_s == pytest.approx(2.0, abs=0.01)


def test_both_orders_of_every_test_pair(dataset: Path) -> None:
    tests = [r for r in read_records(dataset) if r["split"] == "test"]
    captions = {r["captions"][0] for r in tests}
    for a, b in zip(tests[0::2], tests[1::2], strict=True):
        first, second = a["captions"][0].split(" then ")
        assert b["captions"][0] == f"{second} then {first}"
    for caption in captions:  # every test caption's reverse is also a test caption
        first, second = caption.split(" then ")
        assert f"{second} then {first}" in captions
    train_pairs = {frozenset(r["captions"][0].split(" then ")) for r in read_records(dataset)}
    assert len(train_pairs) >= 10  # varied pairs, not one pair repeated


def test_twins_mean_pool_alike_but_frames_differ(dataset: Path) -> None:
    """The benchmark's point: A-then-B vs B-then-A have (nearly) the same mean-pooled pixels."""
    tests = [r for r in read_records(dataset) if r["split"] == "test"]
    twin_pooled, per_frame, other_pooled = [], [], []
    for j in range(0, len(tests), 2):
        a = raw_frames(dataset / tests[j]["path"]).astype(np.float32)
        b = raw_frames(dataset / tests[j + 1]["path"]).astype(np.float32)
        other = raw_frames(dataset / tests[(j + 2) % len(tests)]["path"]).astype(np.float32)
        twin_pooled.append(np.abs(a.mean(0) - b.mean(0)).mean())
        per_frame.append(np.abs(a - b).mean())
        other_pooled.append(np.abs(a.mean(0) - other.mean(0)).mean())
        assert twin_pooled[-1] < 0.35 * per_frame[-1]
    assert np.mean(twin_pooled) < 0.25 * np.mean(per_frame)
    assert np.mean(twin_pooled) < 0.25 * np.mean(other_pooled)
    # the same holds for what the model sees: T sampled, normalised frames
    a = decode_video(dataset / tests[0]["path"], num_frames=8, image_size=32).frames
    b = decode_video(dataset / tests[1]["path"], num_frames=8, image_size=32).frames
    assert np.abs(a.mean(0) - b.mean(0)).mean() < 0.35 * np.abs(a - b).mean()


def test_deterministic_and_independent_of_workers(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, num_train=12, num_val=4, num_test=20, seed=5, workers=1, progress=False)
    assert (again / "captions.jsonl").read_bytes() == (dataset / "captions.jsonl").read_bytes()
    for video_id in ("train_000003", "val_000001", "test_000010"):
        name = f"videos/{video_id}.mp4"
        np.testing.assert_array_equal(raw_frames(again / name), raw_frames(dataset / name))
    # bit-identical files, whether rendered in worker processes or in this one
    for record in read_records(dataset):
        path = record["path"]
        assert (again / path).read_bytes() == (dataset / path).read_bytes(), path
    other = tmp_path / "other"
    generate(other, num_train=12, num_val=4, num_test=20, seed=6, workers=1, progress=False)
    assert (other / "captions.jsonl").read_bytes() != (dataset / "captions.jsonl").read_bytes()


def test_idempotent_rerun_force_and_conflict(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    kwargs = {"num_train": 4, "num_val": 0, "num_test": 4, "seed": 1, "progress": False}
    first = generate(root, **kwargs)
    assert not first.skipped and first.created == 8
    clip = root / "videos" / "train_000000.mp4"
    stamp = clip.stat().st_mtime_ns
    again = generate(root, **kwargs)
    assert again.skipped and again.created == 0
    assert clip.stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(AlreadyExistsError, match="--force"):
        generate(root, **{**kwargs, "num_test": 2})
    forced = generate(root, **{**kwargs, "num_test": 2}, force=True)
    assert not forced.skipped and forced.created == 6
    assert len(read_records(root)) == 6
    assert sorted(p.name for p in (root / "videos").iterdir()) == [
        "test_000000.mp4",
        "test_000001.mp4",
    ] + [f"train_{i:06d}.mp4" for i in range(4)]
    clip.unlink()  # an incomplete output is regenerated, not trusted
    assert generate(root, **{**kwargs, "num_test": 2}, force=False).created == 6


def _object_centres(frames: np.ndarray) -> np.ndarray:
    """Centre of mass of the bright (object) pixels per frame: float [F, 2]."""
    bright = frames.astype(np.float32).max(axis=3) > 100  # [F, H, W]
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    count = bright.sum(axis=(1, 2)).clip(min=1)
    return np.stack([(bright * xs).sum((1, 2)) / count, (bright * ys).sum((1, 2)) / count], 1)


def test_jitter_frame_moves_objects_every_frame_and_keeps_twins(tmp_path: Path) -> None:
    """jitter="frame" (default): a fresh placement per frame, the same set for both twins;
    jitter="clip": one placement per object (only the 1-pixel wobble)."""
    kwargs = {"num_train": 0, "num_val": 0, "num_test": 8, "seed": 4, "progress": False}
    spread = {}
    for jitter in ("frame", "clip"):
        root = tmp_path / jitter
        generate(root, jitter=jitter, **kwargs)
        assert json.loads((root / "meta.json").read_text())["params"]["jitter"] == jitter
        tests = read_records(root)
        values = []
        for j in range(0, len(tests), 2):
            a = raw_frames(root / tests[j]["path"])
            b = raw_frames(root / tests[j + 1]["path"])
            centres = _object_centres(a[:8])  # object A's half
            values.append(np.abs(centres - centres.mean(0)).mean())
            # twin b shows A in its second half at the same per-frame placements
            np.testing.assert_allclose(_object_centres(b[8:]), centres, atol=2.5)  # 2 wobbles
        spread[jitter] = float(np.mean(values))
    assert spread["clip"] < 1.0  # the 1-pixel wobble only
    assert spread["frame"] > 2.0 * spread["clip"] + 1.0


def test_motion_family(tmp_path: Path) -> None:
    root = tmp_path / "motion"
    generate(
        root,
        num_train=0,
        num_val=0,
        num_test=8,
        seed=2,
        families=("order", "motion"),
        progress=False,
    )
    records = read_records(root)
    assert [r["family"] for r in records] == ["order", "order", "motion", "motion"] * 2
    right, left = records[2], records[3]
    assert right["captions"][0].rsplit(" ", 1)[1] in ("right", "down", "down-right", "down-left")
    assert left["captions"][0].rsplit(" ", 1)[0] == right["captions"][0].rsplit(" ", 1)[0]
    a = raw_frames(root / right["path"]).astype(np.float32)
    b = raw_frames(root / left["path"]).astype(np.float32)
    # the same positions visited in reverse order: frame t of one ≈ frame F-1-t of the other
    assert np.abs(a - b[::-1]).mean() < 0.5 * np.abs(a - b).mean()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_train": -1},
        {"num_train": 0, "num_test": 0},
        {"size": 33},
        {"size": 8},
        {"num_frames": 7},
        {"families": ("order", "size")},
        {"background": "busy"},
        {"holdout": 1.0},
        {"holdout": -0.1},
        {"families": ()},
        {"workers": 0},
        {"jitter": "pixel"},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"num_train": 2, "num_val": 0, "num_test": 2, "seed": 0, "progress": False}
    with pytest.raises(InvalidInputError):
        generate(tmp_path / "x", **{**args, **kwargs})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], tb_exit_code) -> None:
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--train", "4", "--test", "4", "--seed", "3", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"train": 4, "val": 0, "test": 4} and report["created"] == 8
    assert len(read_records(out)) == 8
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([*argv, "--size", "31"]) == 2  # odd size: typed error, exit 2
    assert "size must be even" in capsys.readouterr().err
    assert tb_exit_code(["synth", str(tmp_path / "bad"), "--train", "-3", "--no-progress"]) == 2
    assert main(["synth", str(tmp_path / "f"), "--families", "order,nope", "--no-progress"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["synth", str(out), "--train", "many"])
    assert info.value.code == 2


# the new-families dataset: one definition for the fixture and the determinism test
_FAMILIES = dict(
    num_train=120,
    num_val=0,
    num_test=24,
    seed=11,
    families=("order", "motion", "colour"),
    background="noisy",
    progress=False,
)


@pytest.fixture(scope="module")
def families_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "families"
    generate(root, **_FAMILIES, workers=2)
    return root


def test_new_families_captions_and_layout(families_dataset: Path) -> None:
    records = read_records(families_dataset)
    tests = [r for r in records if r["split"] == "test"]
    assert [r["family"] for r in tests[:6]] == ["order"] * 2 + ["motion"] * 2 + ["colour"] * 2
    captions = [r["captions"][0] for r in tests]
    assert len(set(captions)) == len(captions)  # unique ground truth
    opposite = {"right": "left", "down": "up", "down-right": "up-left", "down-left": "up-right"}
    opposite.update({v: k for k, v in opposite.items()})
    for j in range(0, len(tests), 2):
        one, two = tests[j]["captions"][0], tests[j + 1]["captions"][0]
        if tests[j]["family"] == "motion":
            (obj, d1), (obj2, d2) = one.split(" moving "), two.split(" moving ")
            assert obj == obj2 and opposite[d1] == d2
        elif tests[j]["family"] == "colour":
            shape, change = one.split(" turning from ")
            a, b = change.split(" to ")
            assert two == f"{shape} turning from {b} to {a}" and a != b


def test_held_out_combinations_never_in_train(families_dataset: Path) -> None:
    records = read_records(families_dataset)
    train = {r["captions"][0] for r in records if r["split"] == "train"}
    held = [r for r in records if r.get("heldout")]
    assert held and all(r["split"] == "test" and r["family"] != "order" for r in held)
    assert not {r["captions"][0] for r in held} & train
    # ... though every word of a held-out caption is seen in train (a new combination)
    train_words = {w for c in train for w in c.split()}
    assert all(set(r["captions"][0].split()) <= train_words for r in held)
    # test takes the held-out groups first; with holdout 0 none is held out
    seen = [r for r in records if r["split"] == "test" and r["family"] != "order"]
    assert all(r.get("heldout") for r in seen[:4])


def test_plan_held_out_share_and_zero() -> None:
    from tb_reranker.video.synth import _plan

    counts = {"train": 2000, "val": 0, "test": 200}
    for family, groups in (("motion", 96), ("colour", 112)):
        specs = _plan(counts, (family,), seed=3, holdout=0.25)
        held = {s.caption for s in specs if s.heldout}
        train = {s.caption for s in specs if s.split == "train"}
        assert len(held) == 2 * round(0.25 * groups) and not held & train
        assert len(train) == 2 * (groups - round(0.25 * groups))  # all the others are trained
        specs = _plan(counts, (family,), seed=3, holdout=0.0)
        assert not any(s.heldout for s in specs)
        assert len({s.caption for s in specs if s.split == "train"}) == 2 * groups


def test_new_family_twins_are_time_reversed(tmp_path: Path) -> None:
    """Motion and colour twins show the same frames in reverse order: they differ only in
    temporal order (up to per-clip noise and wobble), in the encoded clips."""
    root = tmp_path / "plain"
    families = ("motion", "colour")
    generate(root, num_train=0, num_val=0, num_test=8, seed=8, families=families, progress=False)
    records = read_records(root)
    for first in range(0, len(records), 2):
        family = records[first]["family"]
        a = raw_frames(root / records[first]["path"]).astype(np.float32)
        b = raw_frames(root / records[first + 1]["path"]).astype(np.float32)
        assert np.abs(a - b[::-1]).mean() < 0.5 * np.abs(a - b).mean(), family
        assert np.abs(a.mean(0) - b.mean(0)).mean() < 0.35 * np.abs(a - b).mean(), family


def test_render_twins_exactly_reversed_without_noise() -> None:
    """With the per-clip randomness removed, a colour/motion twin is exactly the original
    played backwards, and an order twin has exactly the original's frames, halves swapped."""
    from tb_reranker.video.synth import Appearance, draw_appearance, render_clip

    class NoNoise:  # the rng render_clip uses for wobble and pixel noise, silenced
        def integers(self, low: int, high: int, size: tuple[int, ...]) -> np.ndarray:
            return np.zeros(size, dtype=np.int64)

        def normal(self, mean: float, std: float, size: tuple[int, ...]) -> np.ndarray:
            return np.zeros(size)

    frames = 8
    app = draw_appearance("colour", 32, np.random.default_rng(1), frames_per_object=frames)
    rev = Appearance(app.background, app.objects, tuple(p[::-1] for p in app.frames_placements))
    red_blue = (("red", "square"), ("blue", "square"))
    a = render_clip("colour", red_blue, "", app, num_frames=frames, rng=NoNoise())
    b = render_clip("colour", red_blue[::-1], "", rev, num_frames=frames, rng=NoNoise())
    np.testing.assert_array_equal(a, b[::-1])
    assert np.abs(a.astype(float) - b).mean() > 5
    app = draw_appearance("motion", 32, np.random.default_rng(2))
    for d1, d2 in (("right", "left"), ("down", "up"), ("down-left", "up-right")):
        a = render_clip("motion", (("red", "cross"),), d1, app, num_frames=frames, rng=NoNoise())
        b = render_clip("motion", (("red", "cross"),), d2, app, num_frames=frames, rng=NoNoise())
        np.testing.assert_array_equal(a, b[::-1])


def test_new_families_deterministic(families_dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, **_FAMILIES, workers=1)  # another worker count, the same bytes
    assert (again / "captions.jsonl").read_bytes() == (
        families_dataset / "captions.jsonl"
    ).read_bytes()
    for record in read_records(families_dataset)[::7]:
        path = record["path"]
        assert (again / path).read_bytes() == (families_dataset / path).read_bytes(), path


def test_noisy_background_changes_every_frame(tmp_path: Path) -> None:
    looks = {}
    for background in ("plain", "noisy"):
        root = tmp_path / background
        generate(
            root, num_train=0, num_val=0, num_test=2, seed=4, background=background, progress=False
        )
        frames = raw_frames(root / "videos" / "test_000000.mp4").astype(np.float32)
        looks[background] = np.abs(np.diff(frames[:8], axis=0)).mean()  # object A's half
    assert looks["noisy"] > looks["plain"] + 4  # clutter and texture redrawn every frame

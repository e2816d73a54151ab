"""``tb synth --renderer camera`` (issue 24): the second renderer keeps every caption true (the
named colour first / last, the named direction of travel, the named colour change), its twins
are each other played backwards, its clips vary in frame rate, frame count and size, its plan and
captions are the default renderer's for the same seed, and the output is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError
from tb_reranker.video.synth import CHANGE_COLOURS, COLOURS, generate
from tb_reranker.video.synth_camera import camera_clip

pytestmark = pytest.mark.timeout(180)

FAMILIES = ("order", "motion", "colour")


def clip(family, objects, *, seed=0, reverse=False, step=(0, 0), noise_seed=1, size=32):
    palette = CHANGE_COLOURS if family == "colour" else COLOURS
    return camera_clip(
        family,
        objects,
        palette,
        size=size,
        num_frames=16,
        fps=8,
        look=np.random.default_rng(seed),
        noise=np.random.default_rng(noise_seed),
        step=step,
        reverse=reverse,
    )


def object_pixels(frame: np.ndarray) -> np.ndarray:
    """The saturated pixels of a frame (the object, not the grey background), [N, 3]."""
    pixels = frame.reshape(-1, 3).astype(np.float32)
    return pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]


def nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """The palette colour closest to the pixels' median, brightness aside (each scaled to its
    brightest channel: a darker yellow is still yellow)."""

    def hue(rgb) -> np.ndarray:
        rgb = np.asarray(rgb, np.float32)
        return rgb / rgb.max()

    median = hue(np.median(pixels, axis=0))
    return min(palette, key=lambda n: float(np.sum((hue(palette[n]) - median) ** 2)))


def centroid(frames: np.ndarray) -> np.ndarray:
    """(x, y) of the saturated pixels over ``frames``."""
    points = []
    for frame in frames:
        mask = frame.max(axis=2).astype(int) - frame.min(axis=2) > 60
        ys, xs = np.nonzero(mask)
        points.append((xs.mean(), ys.mean()))
    return np.mean(points, axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_order_shows_the_first_named_object_first(seed: int) -> None:
    objects = (("red", "square"), ("blue", "circle"))
    frames = clip("order", objects, seed=seed).frames
    assert nearest(object_pixels(frames[0]), COLOURS) == "red"
    assert nearest(object_pixels(frames[-1]), COLOURS) == "blue"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("step", [(1, 0), (0, -1), (1, 1), (-1, 1)])
def test_motion_travels_the_named_way(seed: int, step: tuple[int, int]) -> None:
    frames = clip("motion", (("green", "triangle"),), seed=seed, step=step).frames
    travel = centroid(frames[-3:]) - centroid(frames[:3])
    for axis, sign in enumerate(step):
        if sign:
            assert np.sign(travel[axis]) == sign and abs(travel[axis]) > 4, (step, travel)


@pytest.mark.parametrize("seed", range(4))
def test_colour_changes_from_the_first_named_colour_to_the_second(seed: int) -> None:
    frames = clip("colour", (("yellow", "cross"), ("blue", "cross")), seed=seed).frames
    assert nearest(object_pixels(frames[0]), CHANGE_COLOURS) == "yellow"
    assert nearest(object_pixels(frames[-1]), CHANGE_COLOURS) == "blue"


@pytest.mark.parametrize("family", FAMILIES)
def test_twin_one_is_twin_zero_played_backwards(family: str) -> None:
    objects = (("purple", "square"), ("white", "circle"))[: 1 if family == "motion" else 2]
    forward = clip(family, objects, seed=3, step=(1, 0)).frames.astype(np.float32)
    backward = clip(family, objects, seed=3, step=(1, 0), reverse=True, noise_seed=2).frames
    backward = backward.astype(np.float32)
    assert np.abs(forward[::-1] - backward).mean() < 8.0  # the clips' own sensor noise
    assert np.abs(forward - backward).mean() > np.abs(forward[::-1] - backward).mean() + 2.0
    assert np.allclose(forward.mean(axis=0), backward.mean(axis=0), atol=12.0)  # mean-pool alike


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("renderers")
    out = {}
    for renderer in ("shapes", "camera"):
        out[renderer] = root / renderer
        generate(
            out[renderer],
            num_train=12,
            num_val=0,
            num_test=30,
            seed=9,
            families=FAMILIES,
            renderer=renderer,
            workers=1,
            progress=False,
        )
    return out


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]


def test_the_plan_and_captions_are_the_default_renderers(both: dict[str, Path]) -> None:
    def plan(root: Path) -> list[tuple]:
        return [
            (r["video_id"], r["captions"], r["split"], r["family"], r.get("heldout", False))
            for r in records(root)
        ]

    assert plan(both["camera"]) == plan(both["shapes"])
    meta = json.loads((both["camera"] / "meta.json").read_text())
    assert meta["params"]["renderer"] == "camera"
    assert "renderer" not in json.loads((both["shapes"] / "meta.json").read_text())["params"]


def test_clips_vary_in_rate_length_and_size(both: dict[str, Path]) -> None:
    seen = set()
    for record in records(both["camera"]):
        with av.open(str(both["camera"] / "videos" / f"{record['video_id']}.mp4")) as container:
            stream = container.streams.video[0]
            frames = sum(1 for _ in container.decode(video=0))
            seen.add((int(stream.average_rate), frames, stream.codec_context.width))
    rates, counts, sides = (set(v) for v in zip(*seen, strict=True))
    assert len(rates) > 2 and len(counts) > 2 and sides == {32, 48}, seen
    assert all(12 <= c <= 24 for c in counts) and all(6 <= r <= 12 for r in rates)


def test_deterministic(both: dict[str, Path], tmp_path: Path) -> None:
    generate(
        tmp_path / "again",
        num_train=12,
        num_val=0,
        num_test=30,
        seed=9,
        families=FAMILIES,
        renderer="camera",
        workers=2,
        progress=False,
    )
    for path in sorted((both["camera"] / "videos").iterdir()):
        assert (tmp_path / "again" / "videos" / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renderer": "pencil"},
        {"renderer": "camera", "background": "noisy"},
        {"renderer": "camera", "jitter": "clip"},
    ],
)
def test_bad_renderer_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        generate(tmp_path / "x", num_train=2, num_val=0, num_test=2, progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli_renderer_flag(tmp_path: Path) -> None:
    def tb(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "tb_reranker", "synth", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    done = tb(str(tmp_path / "c"), "--train", "4", "--test", "4", "--renderer", "camera", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["params"]["renderer"] == "camera"
    done = tb(str(tmp_path / "l"), "--long", "--renderer", "camera")
    assert done.returncode == 2 and "--renderer does not apply to --long" in done.stderr
    assert "Traceback" not in done.stderr

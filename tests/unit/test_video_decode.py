"""Video decoding on real MP4s written with PyAV: sampling, preprocessing, edge cases, errors."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError, VideoDecodeError
from tb_reranker.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoClip,
    content_hash,
    decode_many,
    decode_video,
    preprocess_image,
)

pytestmark = pytest.mark.timeout(120)


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: left half red, right half blue, a grey level that encodes ``index``."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (230, 20, 20)
    image[:, width // 2 :] = (20, 20, 230)
    image[: height // 4, :, 1] = min(8 * index, 255)  # top band's green = 8 × frame index
    return image


def write_clip(
    path: Path,
    *,
    num_frames: int = 24,
    width: int = 64,
    height: int = 48,
    fps: int = 8,
    pts_ms: list[int] | None = None,
    rotation: float | None = None,
) -> Path:
    """Write an H.264 MP4; ``pts_ms`` gives variable frame times in milliseconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10", "preset": "veryfast"}
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames if pts_ms is None else len(pts_ms)):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts = pts_ms[i]
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp2", rate=16000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(16000) / 5.0) * 8000).astype(np.int16)[None, :]
        for start in range(0, 16000, 1152):
            chunk = samples[:, start : start + 1152]
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    normal = write_clip(root / "normal.mp4", num_frames=24)  # 3 s at 8 fps
    data = normal.read_bytes()
    truncated = root / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    noise = root / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {
        "normal": normal,
        "short": write_clip(root / "short.mp4", num_frames=5),
        "vfr": write_clip(
            root / "vfr.mp4", pts_ms=[0, 40, 80, 700, 1400, 1450, 1500, 2600, 2700, 3800]
        ),
        "rotated": write_clip(root / "rotated.mp4", num_frames=8, rotation=90),
        "audio": write_audio_only(root / "audio.mp4"),
        "truncated": truncated,
        "empty": empty,
        "noise": noise,
        "missing": root / "does_not_exist.mp4",
    }


def test_normal_clip_shapes_timestamps_and_normalisation(clips: dict[str, Path]) -> None:
    clip = decode_video(clips["normal"], num_frames=12, image_size=32)
    assert isinstance(clip, VideoClip)
    assert clip.frames.shape == (12, 3, 32, 32) and clip.frames.dtype == np.float32
    assert clip.timestamps.shape == (12,) and clip.timestamps.dtype == np.float64
    assert clip.mask.dtype == bool and clip.mask.all()
    assert clip.duration_s == pytest.approx(3.0, abs=0.01)
    assert np.all(np.diff(clip.timestamps) > 0)
    assert clip.timestamps[0] >= 0.0 and clip.timestamps[-1] < clip.duration_s
    # nearest frames to the centres of 12 segments of 3 s: 0.125, 0.375, ... 2.875 s
    centres = (np.arange(12) + 0.5) * 3.0 / 12
    assert np.abs(clip.timestamps - centres).max() <= 0.0625 + 1e-9  # half a frame at 8 fps
    # colours: bottom-left pixel is red, bottom-right blue, after (x/255 - mean) / std
    red = (np.array([230, 20, 20]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    blue = (np.array([20, 20, 230]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(clip.frames[0, :, -2, 2], red, atol=0.15)
    np.testing.assert_allclose(clip.frames[0, :, -2, -3], blue, atol=0.15)
    # the frame content follows the timestamps: top band green = 8 × frame index
    indices = np.rint(clip.timestamps * 8).astype(int)
    greens = clip.frames[:, 1, 2, 16] * CLIP_STD[1] + CLIP_MEAN[1]
    np.testing.assert_allclose(greens * 255, 8 * indices, atol=6)


def test_seeking_and_sequential_sampling_agree(clips: dict[str, Path]) -> None:
    sequential = decode_video(clips["normal"], num_frames=7, image_size=24)
    seeking = decode_video(clips["normal"], num_frames=7, image_size=24, seek_threshold_s=0.0)
    np.testing.assert_array_equal(sequential.timestamps, seeking.timestamps)
    np.testing.assert_allclose(sequential.frames, seeking.frames, atol=1e-6)


def test_segment_sampling(clips: dict[str, Path]) -> None:
    clip = decode_video(clips["normal"], num_frames=4, image_size=16, start_s=1.0, end_s=2.0)
    assert clip.timestamps.min() >= 1.0 - 1e-9 and clip.timestamps.max() < 2.0
    assert clip.mask.all()
    with pytest.raises(VideoDecodeError, match="outside the video"):
        decode_video(clips["normal"], num_frames=4, image_size=16, start_s=10.0, end_s=12.0)
    with pytest.raises(InvalidInputError):
        decode_video(clips["normal"], start_s=2.0, end_s=1.0)


def test_short_clip_repeats_frames_and_masks_them(clips: dict[str, Path]) -> None:
    clip = decode_video(clips["short"], num_frames=12, image_size=16)
    assert clip.frames.shape == (12, 3, 16, 16)
    assert int(clip.mask.sum()) == 5  # 5 distinct frames, 7 repeats
    assert np.all(np.diff(clip.timestamps) >= 0)
    assert len(np.unique(clip.timestamps)) == 5
    for i in np.flatnonzero(~clip.mask):  # a repeat equals the frame it repeats
        j = int(np.flatnonzero(clip.timestamps == clip.timestamps[i])[0])
        assert clip.mask[j] and j < i
        np.testing.assert_array_equal(clip.frames[i], clip.frames[j])


def test_variable_frame_rate_uses_pts(clips: dict[str, Path]) -> None:
    # frames at 0, .04, .08, .7, 1.4, 1.45, 1.5, 2.6, 2.7, 3.8 s (not index / fps)
    clip = decode_video(clips["vfr"], num_frames=4, image_size=16)
    # 4 segment centres of [0, ~3.8+) ≈ 0.49, 1.46, 2.44, 3.41 → nearest 0.7, 1.45, 2.6, 3.8
    np.testing.assert_allclose(clip.timestamps, [0.7, 1.45, 2.6, 3.8], atol=1e-6)
    assert clip.mask.all()


def test_rotation_metadata_is_applied(clips: dict[str, Path]) -> None:
    with av.open(str(clips["rotated"])) as container:
        frame = next(container.decode(video=0))
        assert frame.rotation == 90  # the display matrix really is in the file
    clip = decode_video(clips["rotated"], num_frames=2, image_size=16)
    red_channel = clip.frames[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    # 64x48 landscape rotated 90° counter-clockwise: the red left half ends at the bottom
    assert red_channel[-3:, :].mean() > 0.8
    assert red_channel[:3, :].mean() < 0.2
    plain = decode_video(clips["normal"], num_frames=2, image_size=16)
    plain_red = plain.frames[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    assert plain_red[:, :3].mean() > 0.8 and plain_red[:, -3:].mean() < 0.2


def test_preprocessing_matches_open_clip_transform() -> None:
    from open_clip.transform import image_transform
    from PIL import Image

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    reference = image_transform(32, is_train=False)(image).numpy()
    ours = preprocess_image(image, 32)
    assert ours.shape == reference.shape == (3, 32, 32)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("audio", "no video stream"),
        ("truncated", ""),
        ("empty", "empty file"),
        ("noise", "not a readable media file"),
        ("missing", "no such file"),
    ],
)
def test_bad_files_raise_typed_error_naming_the_file(
    clips: dict[str, Path], name: str, reason: str
) -> None:
    with pytest.raises(VideoDecodeError) as info:
        decode_video(clips[name], num_frames=4, image_size=16)
    assert info.value.path == str(clips[name])
    assert str(clips[name]) in str(info.value)
    assert reason in info.value.reason


def test_directory_and_bad_arguments(tmp_path: Path, clips: dict[str, Path]) -> None:
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        decode_video(tmp_path)
    with pytest.raises(InvalidInputError):
        decode_video(clips["normal"], num_frames=0)
    with pytest.raises(InvalidInputError):
        decode_video(clips["normal"], std=(0.0, 1.0, 1.0))
    with pytest.raises(InvalidInputError):
        decode_video(clips["normal"], mean=(0.5, 0.5))


def test_decode_time_limit(clips: dict[str, Path]) -> None:
    with pytest.raises(VideoDecodeError, match="longer than"):
        decode_video(clips["normal"], num_frames=4, image_size=16, timeout_s=0.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_decode_many_keeps_order_and_survives_bad_files(
    clips: dict[str, Path], workers: int
) -> None:
    names = ["normal", "noise", "short", "missing", "audio", "vfr", "truncated", "normal"]
    paths = [clips[name] for name in names]
    results = list(decode_many(paths, num_frames=4, image_size=16, workers=workers, prefetch=3))
    assert [path for path, _ in results] == [os.fspath(p) for p in paths]
    for name, (path, outcome) in zip(names, results, strict=True):
        if name in ("normal", "short", "vfr"):
            assert isinstance(outcome, VideoClip) and outcome.frames.shape == (4, 3, 16, 16)
            assert outcome.path == path
        else:
            assert isinstance(outcome, VideoDecodeError) and outcome.path == path
    np.testing.assert_array_equal(results[0][1].frames, results[-1][1].frames)


def test_decode_many_process_backend(clips: dict[str, Path]) -> None:
    paths = [clips["normal"], clips["empty"], clips["short"]]
    results = list(decode_many(paths, num_frames=3, image_size=16, workers=2, backend="process"))
    assert [type(outcome) for _, outcome in results] == [VideoClip, VideoDecodeError, VideoClip]
    assert "empty file" in results[1][1].reason


def test_content_hash(clips: dict[str, Path], tmp_path: Path) -> None:
    import hashlib

    data = clips["normal"].read_bytes()
    assert content_hash(clips["normal"]) == hashlib.sha256(data).hexdigest()
    assert content_hash(clips["normal"], chunk_size=7) == content_hash(clips["normal"])
    assert content_hash(clips["short"]) != content_hash(clips["normal"])
    with pytest.raises(VideoDecodeError, match="no such file"):
        content_hash(tmp_path / "nope.mp4")


def test_truncated_faststart_mp4_decodes_what_is_there(tmp_path: Path) -> None:
    """moov first (faststart), data cut: the readable prefix is sampled, never a crash or hang."""
    path = tmp_path / "fs.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"preset": "veryfast", "g": "4"}
        rng = np.random.default_rng(0)
        for _ in range(32):  # 4 s of noise: every frame costs bytes, so a cut drops frames
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    clip = decode_video(cut, num_frames=8, image_size=16)
    assert clip.mask.any()
    assert clip.timestamps.max() < 3.5  # frames past the cut are not invented


def _reference_preprocess(image: Any, size: int, mean: Any, std: Any) -> np.ndarray:
    """preprocess_image as first written: convert, resize, crop, per-pixel float arithmetic."""
    from PIL import Image

    from tb_reranker.video.decode import _resized_size

    mean_arr, std_arr = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    image = image.convert("RGB")
    new_w, new_h = _resized_size(*image.size, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return np.ascontiguousarray(((pixels - mean_arr) / std_arr).transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_fast_normalisation_is_bitwise_the_per_pixel_arithmetic(mode: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    stats = [
        (CLIP_MEAN, CLIP_STD),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.1, 0.9, 0.3), (0.7, 0.01, 2.0)),
    ]
    for mean, std in stats:
        for height, width in [(1, 1), (5, 300), (37, 53), (224, 224), (360, 640)]:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            for size in (1, 16, 224):
                ours = preprocess_image(image, size, mean, std)
                reference = _reference_preprocess(image, size, mean, std)
                assert ours.dtype == np.float32 and ours.flags.c_contiguous
                assert ours.tobytes() == reference.tobytes(), (mode, height, width, size)


def _write_format(
    path: Path, width: int, height: int, pix_fmt: str, rotation: float | None
) -> Path:
    """A few noisy frames (every pixel differs) in ``pix_fmt``, optionally display-rotated."""
    rng = np.random.default_rng(width + height)
    codec = "libx264rgb" if pix_fmt == "rgb24" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"crf": "20", "preset": "veryfast"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(3):
            image = frame_pattern(i, width, height)
            image = np.clip(image + rng.integers(-30, 30, image.shape), 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame.reformat(format=pix_fmt)))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(
    ("width", "height", "pix_fmt", "rotation"),
    [
        (64, 48, "yuv420p", None),
        (96, 96, "yuv420p", 90),
        (176, 144, "yuvj420p", 180),
        (640, 360, "yuv420p", -90),
        (98, 54, "yuv444p", None),
        (320, 240, "yuv422p", 270),
        (48, 64, "rgb24", None),
    ],
)
def test_reused_converter_gives_to_image_pixels(
    tmp_path: Path, width: int, height: int, pix_fmt: str, rotation: float | None
) -> None:
    """decode_video converts frames through one reused single-threaded reformatter, not
    ``frame.to_image()`` (~4 ms each): the same RGB pixels and preprocessed frames."""
    from av.video.reformatter import VideoReformatter

    from tb_reranker.video.decode import (
        _frame_rotation,
        _preprocess_frame,
        _rgb_image,
        _rotate,
        _stream_rotation,
    )

    path = _write_format(tmp_path / f"{pix_fmt}.mp4", width, height, pix_fmt, rotation)
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == {"rgb24": "gbrp"}.get(pix_fmt, pix_fmt)
        turn = _stream_rotation(stream)
        decoded = 0
        for frame in container.decode(stream):
            expected = frame.to_image()
            assert np.array_equal(np.asarray(_rgb_image(frame, reformatter)), np.asarray(expected))
            for size in (16, 224):
                reference = preprocess_image(_rotate(expected, _frame_rotation(frame, turn)), size)
                ours = _preprocess_frame(
                    frame, reformatter, turn, size, *map(np.asarray, (CLIP_MEAN, CLIP_STD))
                )
                assert ours.tobytes() == reference.tobytes()
            decoded += 1
    assert decoded == 3
    if rotation is not None:  # the rotation really is applied: a landscape file stands up
        clip = decode_video(path, num_frames=1, image_size=16)
        assert clip.frames.shape == (1, 3, 16, 16)


def test_frame_times_equal_the_fraction_arithmetic() -> None:
    """_time_of divides ints (correctly rounded) instead of building a Fraction per frame."""
    from types import SimpleNamespace

    from tb_reranker.video.decode import _time_of

    rng = np.random.default_rng(3)
    bases = [Fraction(1, 90000), Fraction(1, 25), Fraction(1001, 30000), Fraction(1, 1000)]
    bases += [Fraction(int(n), int(d)) for n, d in rng.integers(1, 10**6, (50, 2))]
    stamps = [0, 1, -1, 2**33, -(2**40), 10**15] + [
        int(v) for v in rng.integers(-(10**12), 10**12, 200)
    ]
    for base in bases:
        for pts in stamps:
            frame = SimpleNamespace(pts=pts, time=None)
            assert _time_of(frame, base) == float(pts * base)

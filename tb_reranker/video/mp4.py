"""Writing MP4 (H.264) files, bit-identical from one run or process to another.

The synthetic generators (``synth.py``, ``synth_long.py``) write their clips through here.
RGB -> yuv420p is done in numpy (BT.601, limited range), so the encoder input is exactly defined
by the rendered pixels; libx264 runs on one thread with its float-driven decisions off (psy-rd,
adaptive quantisation, macroblock tree, scene cuts, adaptive B-frames), which made streams
differ between processes. CRF 18, preset veryfast. Files are written to ``<stem>.part.mp4``
and renamed into place when complete, so a crash never leaves a truncated ``<name>.mp4``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["Mp4Writer", "rgb_to_yuv420p", "write_mp4"]

_X264_OPTIONS = {
    "crf": "18",
    "preset": "veryfast",
    "threads": "1",
    "x264-params": "scenecut=0:b-adapt=0:psy=0:aq-mode=0:mbtree=0",
}


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [F, H, W, 3] (H, W even) -> uint8 yuv420p planes [F, H * 3 // 2, W]
    (BT.601, limited range; chroma is the mean of each 2x2 block)."""
    rgb = frames.astype(np.float32)
    count, height, width, _ = rgb.shape
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + 0.256788 * r + 0.504129 * g + 0.097906 * b  # [F, H, W]
    pooled = rgb.reshape(count, height // 2, 2, width // 2, 2, 3).mean(axis=(2, 4))
    r2, g2, b2 = pooled[..., 0], pooled[..., 1], pooled[..., 2]
    u = 128.0 - 0.148223 * r2 - 0.290993 * g2 + 0.439216 * b2  # [F, H/2, W/2]
    v = 128.0 + 0.439216 * r2 - 0.367788 * g2 - 0.071427 * b2
    chroma = np.concatenate([u, v], axis=1).reshape(count, height // 2, width)
    planes = np.concatenate([y, chroma], axis=1)  # [F, H * 3/2, W]
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


class Mp4Writer:
    """An H.264 MP4 written chunk by chunk (memory bounded by the largest chunk).

    >>> with Mp4Writer(path, fps=8, width=64, height=64) as writer:   # doctest: +SKIP
    ...     writer.write(frames)  # uint8 RGB [F, 64, 64, 3], any number of calls

    The file appears at ``path`` only when the ``with`` block ends without an exception.
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: int, width: int, height: int) -> None:
        self.path = Path(path)
        self.fps = fps
        self.size = (width, height)
        self.frames_written = 0
        self._tmp = self.path.with_name(self.path.stem + ".part.mp4")
        self._container: Any = None
        self._stream: Any = None

    def __enter__(self) -> Mp4Writer:
        import av

        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=Fraction(self.fps))
        stream.width, stream.height = self.size
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_X264_OPTIONS)
        stream.codec_context.thread_count = 1
        self._stream = stream
        return self

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames [F, height, width, 3]."""
        import av

        for planes in rgb_to_yuv420p(frames):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            self._container.mux(self._stream.encode(frame))
        self.frames_written += len(frames)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int) -> None:
    """Write uint8 RGB frames [F, H, W, 3] (H, W even) as an H.264 MP4 at ``fps``, atomically."""
    with Mp4Writer(path, fps=fps, width=int(frames.shape[2]), height=int(frames.shape[1])) as out:
        out.write(frames)

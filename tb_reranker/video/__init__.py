"""Video input: PyAV decoding with uniform frame sampling, and the synthetic benchmark generator.

``from tb_reranker.video import decode_video, decode_many, VideoClip, content_hash``;
the generator is ``tb_reranker.video.synth.generate``.
"""

from __future__ import annotations

from tb_reranker.video.decode import (
    CLIP_MEAN,
    CLIP_STD,
    VideoClip,
    content_hash,
    decode_many,
    decode_video,
    preprocess_image,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VideoClip",
    "content_hash",
    "decode_many",
    "decode_video",
    "preprocess_image",
]

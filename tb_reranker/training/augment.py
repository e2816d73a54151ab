"""Training augmentations that teach the concept, not the pixels (issue 24).

Two kinds, applied to a micro-batch of decoded frames [b, T, 3, H, W] (already normalised) and
its captions, per sample, from a seeded generator:

* **Caption-preserving** (``crop``, ``colour``, ``shift``, ``zoom``, ``noise``, ``time``): a
  random resized crop of the whole clip (scale 0.6-1, aspect 3/4-4/3, resampled to the input
  size), brightness and contrast jitter that moves every channel together (so a named colour
  stays that colour), a per-frame random translation (camera shake), a zoom-out (the clip shrunk
  to 0.6-1 of its side at a random place, edges replicated: smaller objects), a texture (a smooth
  noise field constant over the clip, like a textured background, plus per-frame sensor noise),
  and a time warp (the real frames resampled at a random, monotone speed: the first and last
  frames kept, so "then", directions and "appears" stay true). Each with its probability.
* **Caption-changing** (``flip``, ``reverse``): a horizontal flip rewrites "left" <-> "right";
  time reversal (the real frames played backwards) rewrites what a clip shows played backwards:
  "X then Y" <-> "Y then X", "X before Y" <-> "Y before X", "from A to B" <-> "from B to A",
  "moving left" <-> "moving right" (every direction to its opposite), "appears" <->
  "disappears". They are **added** to the batch as extra samples beside the originals (each
  with its probability), so every batch carries its own hard negatives: the same pixels with
  the other caption. A caption no rule rewrites is never reversed (reversing "a man cooking"
  has no caption), and one a flip would not change is flipped as it is (nothing in it names a
  side).

The spec is ``"crop=0.5,colour=0.5,shift=0.5,flip=0.5,reverse=0.5"`` (``--augment``); an empty
spec or ``none`` is no augmentation. The ``synthetic`` preset's default is
``crop=0.5,colour=0.5,shift=0.5,reverse=0.5`` (``loop.SYNTHETIC_AUGMENT``); ``paper``'s is none.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from tb_reranker.errors import InvalidInputError

__all__ = ["Augment", "AugmentedBatch", "flipped_caption", "reverse_frames", "reversed_caption"]

_OPPOSITE = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "down-right": "up-left",
    "up-left": "down-right",
    "down-left": "up-right",
    "up-right": "down-left",
}
_MOVING = re.compile(  # the hyphenated directions first: "down" must not stop "down-right"
    r"\bmoving (" + "|".join(sorted(_OPPOSITE, key=len, reverse=True)) + r")\b"
)
_FROM_TO = re.compile(r"\bfrom (.+?) to (.+?)$")
_SIDES = re.compile(r"(?<![\w])(left|right)(?![\w])")


def reversed_caption(text: str) -> str | None:
    """What ``text`` says of its clip played backwards; None when no rule applies."""
    for word in (" then ", " before "):
        if word in text:
            first, second = text.split(word, 1)
            return f"{second.strip()}{word}{first.strip()}"
    if _MOVING.search(text):
        return _MOVING.sub(lambda m: f"moving {_OPPOSITE[m.group(1)]}", text)
    if _FROM_TO.search(text):
        return _FROM_TO.sub(lambda m: f"from {m.group(2)} to {m.group(1)}", text)
    if re.search(r"\b(dis)?appears\b", text):
        return re.sub(
            r"\b(dis)?appears\b", lambda m: "appears" if m.group(1) else "disappears", text
        )
    return None


def flipped_caption(text: str) -> str:
    """``text`` of the mirrored clip: "left" and "right" swapped (also inside "up-left")."""
    return _SIDES.sub(lambda m: _OPPOSITE[m.group(1)], text)


@dataclass(frozen=True)
class Augment:
    """Probabilities of each augmentation (0 = off); see the module docstring."""

    crop: float = 0.0
    colour: float = 0.0
    shift: float = 0.0
    zoom: float = 0.0
    noise: float = 0.0
    time: float = 0.0
    flip: float = 0.0
    reverse: float = 0.0

    @classmethod
    def parse(cls, spec: str | None) -> Augment:
        """``"crop=0.5,flip=0.5"`` → an :class:`Augment`; "", "none" or None → none.

        Raises:
            InvalidInputError: an unknown name or a probability outside [0, 1].
        """
        values: dict[str, float] = {}
        names = {f.name for f in fields(cls)}
        if (spec or "").strip().lower() == "none":
            return cls()
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, _, value = part.partition("=")
            name = name.strip()
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if name not in names or not 0.0 <= number <= 1.0:
                raise InvalidInputError(
                    f"invalid augmentation {part.strip()!r}: expected NAME=P with NAME one of "
                    f"{', '.join(sorted(names))} and P in [0, 1]"
                )
            values[name] = number
        return cls(**values)

    def scaled(self, factor: float) -> Augment:
        """Every probability times ``factor`` (a warm-up's ramp: 0 = none, 1 = as given)."""
        return type(self)(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in fields(self))

    def __call__(
        self,
        frames: torch.Tensor,
        masks: torch.Tensor,
        texts: list[str],
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The augmented micro-batch as pixels: (frames, masks, texts), the originals, then the
        flip twins, then the time-reversal twins (:meth:`batch`, materialised)."""
        return self.batch(frames, masks, texts, generator).materialise()

    def batch(
        self,
        frames: torch.Tensor,
        masks: torch.Tensor,
        texts: list[str],
        generator: torch.Generator,
    ) -> AugmentedBatch:
        """The augmented micro-batch, its time-reversal twins kept as references (what training
        runs: it reverses their encoded frames instead of encoding the frames again)."""
        frames = frames.clone()
        for i in range(frames.shape[0]):
            frames[i] = self._preserving(frames[i], masks[i], generator)
        flipped: list[int] = []
        flipped_texts: list[str] = []
        reversed_of: list[int] = []
        reversed_texts: list[str] = []
        for i, text in enumerate(texts):
            if self.flip and _draw(generator) < self.flip:
                flipped.append(i)
                flipped_texts.append(flipped_caption(text))
            backwards = reversed_caption(text) if self.reverse else None
            if backwards is not None and _draw(generator) < self.reverse:
                reversed_of.append(i)
                reversed_texts.append(backwards)
        if flipped:
            frames = torch.cat([frames, frames[flipped].flip(-1)])
            masks = torch.cat([masks, masks[flipped]])
        return AugmentedBatch(frames, masks, texts + flipped_texts, reversed_of, reversed_texts)

    def _preserving(
        self, clip: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """One clip [T, 3, H, W] (real frames ``mask``) through the caption-preserving ones."""
        if self.time and _draw(generator) < self.time:
            clip = _retime(clip, mask, generator)
        if self.crop and _draw(generator) < self.crop:
            clip = _resized_crop(clip, generator)
        if self.colour and _draw(generator) < self.colour:
            gain = 0.75 + 0.5 * _draw(generator)  # contrast, about the clip's mean
            offset = 0.4 * (_draw(generator) - 0.5)  # brightness, in normalised units
            mean = clip.mean()
            clip = (clip - mean) * gain + mean + offset
        if self.zoom and _draw(generator) < self.zoom:
            clip = _zoom_out(clip, generator)
        if self.shift and _draw(generator) < self.shift:
            clip = _shake(clip, generator)
        if self.noise and _draw(generator) < self.noise:
            clip = _texture(clip, generator)
        return clip


@dataclass(frozen=True)
class AugmentedBatch:
    """A micro-batch after :meth:`Augment.batch`.

    ``frames`` [b', T, 3, H, W] / ``masks`` [b', T] / ``texts`` (b') are what to encode: the
    originals, then the flip twins. The time-reversal twins are references: twin j is row
    ``reversed_of[j]`` of ``frames`` with its real frames played backwards, captioned
    ``reversed_texts[j]``. The vision tower encodes every frame on its own, so a reversed
    clip's frame tokens are the original's in reverse order: :func:`reverse_frames` on the
    encoded tokens gives exactly what encoding the reversed pixels would (at no cost).
    """

    frames: torch.Tensor
    masks: torch.Tensor
    texts: list[str]
    reversed_of: list[int]
    reversed_texts: list[str]

    def materialise(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The whole batch as pixels: the reversal twins appended as reversed frames."""
        return self.with_reversals(self.frames)

    def with_reversals(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(videos, masks, texts) with the reversal twins appended: ``videos`` is ``frames``
        or their encoded frame tokens [b', T·P, D], each twin its clip's rows reversed."""
        if not self.reversed_of:
            return videos, self.masks, self.texts
        rows = self.reversed_of
        masks = self.masks.to(videos.device)
        return (
            torch.cat([videos, reverse_frames(videos[rows], masks[rows])]),
            torch.cat([masks, masks[rows]]),
            self.texts + self.reversed_texts,
        )


def reverse_frames(clips: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each clip's real frames (``masks`` [b, T]) in reverse order, padding where it was.

    clips: [b, T, ...] frames, or [b, T·P, D] encoded frame tokens (P tokens a frame)."""
    batch, num_frames = masks.shape
    per_frame = clips.reshape(batch, num_frames, -1, *clips.shape[2:])  # [b, T, P, ...]
    steps = torch.arange(num_frames, device=masks.device)
    real = masks.sum(dim=1, keepdim=True)  # [b, 1]: the real frames come first
    index = torch.where(steps < real, real - 1 - steps, steps)  # [b, T]
    rows = torch.arange(batch, device=masks.device).unsqueeze(1)
    return per_frame[rows, index].reshape(clips.shape)


def _draw(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _resized_crop(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random crop (scale 0.6-1 of the area, aspect 3/4-4/3) of every frame, resized back."""
    _, _, height, width = clip.shape
    scale = 0.6 + 0.4 * _draw(generator)
    aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * _draw(generator))
    h = min(height, max(4, round(math.sqrt(scale * height * width / aspect))))
    w = min(width, max(4, round(math.sqrt(scale * height * width * aspect))))
    top = int(_draw(generator) * (height - h + 1))
    left = int(_draw(generator) * (width - w + 1))
    crop = clip[:, :, top : top + h, left : left + w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)


def _shake(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each frame translated by up to an eighth of the side (edges replicated)."""
    frames, _, height, width = clip.shape
    limit = max(1, min(height, width) // 8)
    pad = F.pad(clip, (limit, limit, limit, limit), mode="replicate")
    out = torch.empty_like(clip)
    offsets = torch.randint(0, 2 * limit + 1, (frames, 2), generator=generator)
    for t in range(frames):
        dy, dx = int(offsets[t, 0]), int(offsets[t, 1])
        out[t] = pad[t, :, dy : dy + height, dx : dx + width]
    return out


def _zoom_out(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The clip shrunk to 0.6-1 of its side, placed at random, the edges replicated around it."""
    _, _, height, width = clip.shape
    scale = 0.6 + 0.4 * _draw(generator)
    h, w = max(4, round(height * scale)), max(4, round(width * scale))
    small = F.interpolate(clip, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top = int(_draw(generator) * (height - h + 1))
    left = int(_draw(generator) * (width - w + 1))
    return F.pad(small, (left, width - w - left, top, height - h - top), mode="replicate")


def _texture(clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A smooth noise field fixed over the clip (mostly grey, a little colour) and per-frame
    sensor noise, in normalised units (one unit is about a quarter of the pixel range)."""
    frames, channels, height, width = clip.shape
    field = torch.zeros(1, channels, height, width)
    for cells, weight in ((3, 1.0), (6, 0.5), (12, 0.25)):
        grey = torch.randn(1, 1, cells, cells, generator=generator)
        tint = 0.3 * torch.randn(1, channels, cells, cells, generator=generator)
        up = F.interpolate(grey + tint, size=(height, width), mode="bicubic", align_corners=False)
        field += weight * up
    strength = 0.1 + 0.3 * _draw(generator)
    sensor = 0.05 + 0.15 * _draw(generator)
    grain = torch.randn(frames, channels, height, width, generator=generator)
    # drawn on the CPU generator, added on the clip's device and dtype (a CUDA run's frames)
    return clip + (strength * field / 1.75 + sensor * grain).to(clip)


def _retime(clip: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The real frames resampled at a random, monotone speed (steps of 0.25-1.75 frames, rescaled
    to span them): the first and last frames stay, their order never changes."""
    real = int(mask.sum())
    if real < 3:
        return clip
    steps = 0.25 + 1.5 * torch.rand(real - 1, generator=generator)
    positions = torch.cat([torch.zeros(1), steps.cumsum(0)])
    index = (positions * (real - 1) / positions[-1]).round().long()
    out = clip.clone()
    out[:real] = clip[index.to(clip.device)]
    return out

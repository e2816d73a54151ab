"""``tb synth --renderer camera``: a second, independent renderer of the same captions.

The default renderer (``shapes``, :mod:`tb_reranker.video.synth`) draws supersampled, axis-aligned
shapes on a flat, slightly textured background, every clip 16 frames at 8 fps, the order
family's switch at exactly half time, motion and colour changes at constant speed. What a model
learns from it may be those details rather than "then", "moving left" or "turning from red to
blue". This renderer keeps every caption true and changes how it is drawn, so that training on
one and testing on the other (both ways) measures the concept, not the pixels:

* **Rasterisation:** hard-edged (one sample per pixel, no supersampling) shapes, each turned by
  up to ±15°, circles drawn as ellipses (aspect 0.85-1.15), crosses of varying bar width,
  triangles with a shifted apex, every shape outlined by a darker one-pixel rim; sizes 30-50%
  of the side (the default's 45-60%).
* **Backgrounds:** a photographic-noise field (three octaves of smooth noise, a colour
  gradient and a vignette) instead of a flat level, plus per-frame sensor noise.
* **Camera:** the scene is drawn on a larger canvas and each frame is a crop that follows a
  random walk (hand-held shake, up to an eighth of the side).
* **Timing:** every clip runs on its own clock: progress advances by random positive steps
  (variable speed), the order family's switch is anywhere in 35-65% of the clip, objects drift
  slowly instead of jumping; frame rate 0.75-1.5× and frame count 0.75-1.5× the requested ones,
  side 1× or 1.5× (so the decoder resamples and rescales).

Twins stay hard negatives: a group's look, clock, drift and shake are drawn from the group's
RNG and twin 1 is twin 0 **played backwards** (its frames in reverse order), which is exactly its
caption (B then A; the other direction on the axis; the colour change the other way); each clip
then adds its own sensor noise. The plan (splits, groups, held-out combinations, captions) is the
default renderer's for the same seed, so a test set of this renderer can hold exactly the
compositions a model trained on the other never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RENDERERS", "CameraClip", "camera_clip"]

RENDERERS: tuple[str, ...] = ("shapes", "camera")

_MAX_TILT = np.deg2rad(15.0)


@dataclass(frozen=True)
class CameraClip:
    """One rendered clip: uint8 RGB ``frames`` [F, S, S, 3] and the ``fps`` to write them at."""

    frames: np.ndarray
    fps: int


def _even(value: float, minimum: int) -> int:
    return max(minimum, 2 * round(value / 2))


def _smooth_noise(side: int, rng: np.random.Generator) -> np.ndarray:
    """Three octaves of bilinearly upsampled noise, [side, side] in about [-1, 1]."""
    field = np.zeros((side, side), dtype=np.float32)
    for cells, weight in ((3, 1.0), (6, 0.5), (12, 0.25)):
        grid = rng.normal(0.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
        at = np.linspace(0.0, cells, side, dtype=np.float32)
        lo = np.minimum(at.astype(int), cells - 1)
        frac = at - lo
        rows = grid[lo] * (1 - frac)[:, None] + grid[lo + 1] * frac[:, None]  # [side, cells+1]
        field += weight * (rows[:, lo] * (1 - frac)[None] + rows[:, lo + 1] * frac[None])
    return field / 1.75


def _background(side: int, rng: np.random.Generator) -> np.ndarray:
    """A photographic-noise background, float32 [side, side, 3] (mid-dark, low saturation)."""
    level = rng.uniform(25.0, 95.0)
    texture = _smooth_noise(side, rng)[..., None] * rng.uniform(8.0, 22.0)
    tint = rng.uniform(-10.0, 10.0, size=3).astype(np.float32)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) - 0.5
    angle = rng.uniform(0.0, 2 * np.pi)
    gradient = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None] * rng.uniform(0.0, 30.0)
    vignette = 1.0 - rng.uniform(0.1, 0.35) * (xs * xs + ys * ys)[..., None] * 2.0
    return ((level + texture + gradient + tint) * vignette).astype(np.float32)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Which pixels, in the shape's own turned unit coordinates, the shape covers."""
    aspect, bar, apex = params
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "circle":
        return (u * aspect) ** 2 + (v / aspect) ** 2 <= 1.0
    if shape == "triangle":
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u - apex * (1 - v) / 2) <= (v + 1.0) / 2.0)
    if shape == "cross":
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= bar)) | ((np.abs(v) <= 1.0) & (np.abs(u) <= bar))
    raise ValueError(shape)  # pragma: no cover - SHAPES is closed


def _draw(
    canvas: np.ndarray,
    shape: str,
    colour: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    tilt: float,
    params: np.ndarray,
) -> None:
    """Paint one hard-edged, outlined shape onto ``canvas`` [H, W, 3] in place."""
    side = canvas.shape[0]
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    cos, sin = np.cos(tilt), np.sin(tilt)
    u, v = (cos * dx + sin * dy), (-sin * dx + cos * dy)
    outer = _inside(shape, u / radius, v / radius, params)
    inner = _inside(shape, u / max(radius - 1.0, 0.5), v / max(radius - 1.0, 0.5), params)
    canvas[outer] = colour * 0.55  # the rim
    canvas[inner] = colour


def _clock(count: int, rng: np.random.Generator) -> np.ndarray:
    """Progress 0 → 1 over ``count`` frames at a varying speed (random positive steps)."""
    steps = rng.gamma(2.0, 1.0, size=count - 1)
    return np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])


def _drift(count: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """A slow random walk of an object's centre, [count, 2] pixels around 0."""
    walk = np.cumsum(rng.normal(0.0, side * 0.02, size=(count, 2)), axis=0)
    return walk - walk.mean(axis=0)


def _shake(count: int, margin: int, rng: np.random.Generator) -> np.ndarray:
    """The crop's offset in every frame: a clipped random walk in [0, 2 * margin]."""
    walk = margin + np.cumsum(rng.normal(0.0, max(margin / 3.0, 0.5), size=(count, 2)), axis=0)
    return np.clip(np.rint(walk), 0, 2 * margin).astype(int)


def _object(shape: str, side: int, rng: np.random.Generator) -> tuple[float, float, np.ndarray]:
    """(radius, tilt, shape params: aspect, cross bar half-width, triangle apex shift)."""
    radius = side * rng.uniform(0.30, 0.50) / 2.0
    tilt = rng.uniform(-_MAX_TILT, _MAX_TILT)
    params = np.array(
        [rng.uniform(0.85, 1.15), rng.uniform(0.25, 0.4), rng.uniform(-0.3, 0.3)], np.float32
    )
    return radius, tilt, params


def camera_clip(
    family: str,
    objects: Sequence[tuple[str, str]],
    palette: dict[str, tuple[int, int, int]],
    *,
    size: int,
    num_frames: int,
    fps: int,
    look: np.random.Generator,
    noise: np.random.Generator,
    step: tuple[int, int] = (0, 0),
    reverse: bool = False,
) -> CameraClip:
    """Render what twin 0 of a group shows (``objects`` in order of appearance, as the default
    renderer takes them; ``step``, the motion family's unit direction (dx, dy), image y down)
    from the group's ``look`` RNG; ``reverse`` plays it backwards (twin 1); the clip's own
    ``noise`` RNG adds sensor noise. ``palette`` names every colour."""
    side = size if look.random() < 0.5 else _even(size * 1.5, 16)
    count = _even(num_frames * look.uniform(0.75, 1.5), 4)
    rate = max(2, round(fps * look.uniform(0.75, 1.5)))
    margin = max(1, side // 8)
    canvas_side = side + 2 * margin
    background = _background(canvas_side, look)
    clock = _clock(count, look)
    shake = _shake(count, margin, look)
    centre = canvas_side / 2.0
    drawn = [_object(shape, side, look) for _, shape in objects]
    drifts = [_drift(count, side, look) for _ in objects]
    gains = look.uniform(0.8, 1.0, size=len(objects))  # darker would blur yellow/orange
    hues = look.uniform(-6.0, 6.0, size=(len(objects), 3))
    places = [
        (
            centre + look.uniform(-1, 1) * (side / 2 - r),
            centre + look.uniform(-1, 1) * (side / 2 - r),
        )
        for r, _, _ in drawn
    ]
    switch = look.uniform(0.35, 0.65)
    frames = np.empty((count, side, side, 3), dtype=np.float32)
    for t in range(count):
        canvas = background.copy()
        p = clock[t]
        which = 1 if family == "order" and p >= switch else 0
        (colour, shape), (radius, tilt, params) = objects[which], drawn[which]
        rgb = np.asarray(palette[colour], np.float32)
        if family == "colour":
            end = np.asarray(palette[objects[1][0]], np.float32)
            rgb = rgb * (1.0 - p) + end * p
        x, y = places[which][0] + drifts[which][t, 0], places[which][1] + drifts[which][t, 1]
        if family == "motion":
            dx, dy = step
            span = side / 2.0 - radius
            x = centre + dx * span * (2 * p - 1) + (0 if dx else drifts[0][t, 0] * 0.3)
            y = centre + dy * span * (2 * p - 1) + (0 if dy else drifts[0][t, 1] * 0.3)
        rgb = np.clip(rgb * gains[which] + hues[which], 0, 255)
        _draw(canvas, shape, rgb, (x, y), radius, tilt, params)
        oy, ox = shake[t]
        frames[t] = canvas[oy : oy + side, ox : ox + side]
    if reverse:
        frames = frames[::-1]
    frames = frames + noise.normal(0.0, noise.uniform(2.0, 6.0), size=frames.shape)
    return CameraClip(np.clip(np.rint(frames), 0, 255).astype(np.uint8), rate)

"""Synthetic hard-negative text-to-video benchmark: real MP4 clips with plain-English captions.

Built so that whole-video mean pooling cannot tell hard negatives apart while frame-level
comparison can (docs/method.md §6).

Families (each clip belongs to one; hard-negative twins are consecutive clips of a split)
    ``order`` (the main family): object A (one of 6 colours × 4 shapes) in the first half of the
        clip, object B in the second half; caption ``"a red square then a blue circle"``. The
        twin shows the same two objects in the other order, so the mean-pooled frames of the
        two clips are nearly identical and only the order tells them apart.
    ``motion`` (optional): one object crossing the frame; caption ``"a red square moving
        left"`` (right / left, down / up, down-right / up-left, down-left / up-right: 24
        objects x 4 axes = 96 groups). The twin moves the other way along the same axis: the
        same positions are visited in reverse order.
    ``colour`` (optional): one shape whose colour changes linearly over the clip; caption
        ``"a square turning from red to blue"`` (4 shapes x 28 unordered pairs of the 8
        ``CHANGE_COLOURS`` = 112 groups). The twin changes the other way (blue to red) and
        visits the same per-frame placements in reverse order: frame t of one twin is frame
        F-1-t of the other, up to noise.
    Held-out combinations: a fraction ``holdout`` (default 0.25) of the motion and colour
    groups (an object with an axis; a shape with a colour pair) never appears in train, though
    each of its words does; test takes them first, marked ``"heldout": true``.
    Backgrounds: ``plain`` (default) or ``noisy`` (a texture redrawn every frame plus three
    grey distractor discs per frame, from the clip's own RNG).

Splits
    Clips ``2j`` and ``2j+1`` of every split are the two twins of group ``j`` (an odd count
    leaves the last group with one clip). Order groups are unordered object pairs (276 of them):
    the test split takes pairs from the start of a seeded permutation, val from its end, train
    cycles through all pairs in another permutation, so a train set of ≥ 552 clips covers every
    ordered pair. Test/val pairs also appear in train, but as fresh renders (different
    position, size, brightness and noise): the prototype's set-up ("3,000 training clips over
    all ordered pairs, a test set of 500 fresh renders holding both orders of 250 pairs").
    Captions are unique within val and test while their groups do not repeat (≤ 552 order
    clips, ≤ 192 motion clips, ≤ 224 colour clips); past that a warning says captions repeat (train repeats
    captions by design: many renders of each ordered pair).

Rendering
    The two twins of a group share their look (background level, tint and texture; each
    object's position, size (45-60% of the side) and brightness (80-100%)), drawn from an RNG
    seeded by ``(seed, split, group)``. With ``jitter="frame"`` (the default since generator
    version 2) each object gets a fresh position/size/brightness in every frame of its half,
    also drawn from the group's RNG, so both twins show the same set of frames; ``"clip"``
    keeps one placement per object (version 1). Each clip adds its own 1-pixel per-frame wobble
    and pixel noise from ``(seed, split, index)``. So the twins' mean-pooled frames differ by
    noise only, while a group in another split (or another group of the same pair) is a fresh
    render. The output does not depend on the worker count. Shapes fill their 2r box (version
    2: a square is larger than a circle, as in the first prototype) and are supersampled
    2× for smooth edges.
    Encoded with libx264 (yuv420p converted in numpy, CRF 18, preset veryfast, one thread,
    psy-rd / AQ / mb-tree / scene-cut / adaptive-B off: bit-identical across processes), each
    file written atomically.

Output: ``<out>/videos/<video_id>.mp4``, ``<out>/captions.jsonl`` (``video_id``, ``path``,
``captions``, ``split``, plus ``family``) and ``<out>/meta.json`` (written last: its presence
marks a complete output; re-running with the same arguments does nothing).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import AlreadyExistsError, InvalidInputError, TBError
from tb_reranker.video.mp4 import write_mp4

__all__ = [
    "GENERATOR_VERSION",
    "COLOURS",
    "SHAPES",
    "FAMILIES",
    "BACKGROUNDS",
    "CHANGE_COLOURS",
    "Appearance",
    "Content",
    "SynthResult",
    "caption",
    "draw_appearance",
    "generate",
    "render_clip",
    "time_reversed",
    "twin_groups",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "3"  # 3: colour family, 4 motion axes, noisy backgrounds, held-out combos;
# the order family's clips are bit-identical to version 2's

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (45, 85, 240),
    "yellow": (240, 220, 35),
    "purple": (165, 55, 215),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
FAMILIES: tuple[str, ...] = ("order", "motion", "colour")
BACKGROUNDS: tuple[str, ...] = ("plain", "noisy")
SPLITS: tuple[str, ...] = ("train", "val", "test")
JITTERS: tuple[str, ...] = ("frame", "clip")  # object placement drawn per frame / per clip
DIRECTIONS: dict[str, tuple[str, str]] = {
    "horizontal": ("right", "left"),
    "vertical": ("down", "up"),
    "diagonal": ("down-right", "up-left"),
    "antidiagonal": ("down-left", "up-right"),
}
# unit steps (dx, dy) of each motion direction (image y grows downwards)
_STEPS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "left": (-1, 0),
    "down": (0, 1),
    "up": (0, -1),
    "down-right": (1, 1),
    "up-left": (-1, -1),
    "down-left": (-1, 1),
    "up-right": (1, -1),
}
# the colour family's palette (wider than COLOURS, so that it holds enough distinct groups)
CHANGE_COLOURS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "orange": (245, 140, 25),
    "cyan": (40, 215, 225),
}

_OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)  # 24
_SUPERSAMPLE = 2
_CLIP_ID = re.compile(r"^(train|val|test)_\d{6}\.mp4$")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` did."""

    root: Path  # the output folder
    counts: dict[str, int]  # clips per split
    created: int  # clips written by this call (0 when the output was already complete)
    skipped: bool  # True when an identical complete output existed and nothing was done
    elapsed_s: float  # wall time of the call
    meta: dict[str, Any] = field(default_factory=dict)  # the content of meta.json


@dataclass(frozen=True)
class _ClipSpec:
    video_id: str  # "<split>_<index:06d>"
    split: str  # train | val | test
    index: int  # index within the split (RNG stream)
    family: str  # order | motion | colour
    objects: tuple[tuple[str, str], ...]  # (colour, shape) shown, in order of appearance
    direction: str  # motion family: right | left | down | up | ...; "" otherwise
    caption: str  # the one caption
    heldout: bool = False  # its combination never appears in train (motion / colour families)


def _describe(obj: tuple[str, str]) -> str:
    return f"a {obj[0]} {obj[1]}"


Content = tuple[tuple[tuple[str, str], ...], str]  # (objects in order of appearance, direction)


def caption(family: str, objects: Sequence[tuple[str, str]], direction: str) -> str:
    """The benchmark's one caption of a clip: ``"a red square then a blue circle"`` (order),
    ``"a red square moving left"`` (motion), ``"a square turning from red to blue"`` (colour)."""
    if family == "order":
        return f"{_describe(objects[0])} then {_describe(objects[1])}"
    if family == "colour":
        return f"a {objects[0][1]} turning from {objects[0][0]} to {objects[1][0]}"
    return f"{_describe(objects[0])} moving {direction}"


def time_reversed(family: str, objects: Sequence[tuple[str, str]], direction: str) -> Content:
    """What a clip shows when played backwards, which is what its twin shows: B then A
    (order), the opposite direction on the same axis (motion), the colour change the other way
    (colour). Applying it twice gives the clip back."""
    if family == "motion":
        axis = next(pair for pair in DIRECTIONS.values() if direction in pair)
        return tuple(objects), axis[1] if direction == axis[0] else axis[0]
    return tuple(objects[::-1]), ""


def twin_groups(family: str) -> list[Content]:
    """Every twin group of ``family``, as what its twin 0 shows (twin 1 shows
    :func:`time_reversed` of it): the 276 unordered object pairs (order), 24 objects x 4 axes
    (motion), 4 shapes x 28 unordered colour pairs (colour)."""
    if family == "order":
        return [((_OBJECTS[a], _OBJECTS[b]), "") for a, b in combinations(range(len(_OBJECTS)), 2)]
    return [_combination_clip(family, group, 0) for group in _family_groups(family)]


def _family_groups(family: str) -> list[tuple[Any, ...]]:
    """The twin groups of a combination family (each group = two twins, reversed in time)."""
    if family == "motion":  # 24 objects x 4 axes = 96
        return [(o, axis) for o in range(len(_OBJECTS)) for axis in DIRECTIONS]
    colours = list(CHANGE_COLOURS)  # 4 shapes x 28 unordered colour pairs = 112
    return [(shape, a, b) for shape in SHAPES for a, b in combinations(colours, 2)]


def _held_out_count(num_groups: int, holdout: float) -> int:
    """Groups of a combination family kept out of train (at least one is left to train on)."""
    if holdout <= 0:
        return 0
    return min(num_groups - 1, max(1, round(holdout * num_groups)))


def _combination_clip(family: str, group: tuple[Any, ...], twin: int) -> Content:
    """(objects, direction) of twin 0 / 1 of a motion or colour group."""
    if family == "motion":
        obj, axis = group
        first: Content = ((_OBJECTS[obj],), DIRECTIONS[axis][0])
    else:
        shape, a, b = group
        first = (((a, shape), (b, shape)), "")
    return first if twin == 0 else time_reversed(family, *first)


def _plan(
    counts: dict[str, int], families: Sequence[str], seed: int, holdout: float = 0.0
) -> list[_ClipSpec]:
    """Which clip shows what: twins in consecutive slots, group families round-robin.

    Combination families (motion, colour): a seeded permutation of their groups; with
    ``holdout`` > 0 its first ``round(holdout * groups)`` groups never appear in train, test
    takes groups from the start of the permutation (the held-out ones first), val from its end.
    """
    plan_rng = np.random.default_rng([seed, 7919])
    pairs = list(combinations(range(len(_OBJECTS)), 2))  # 276 unordered pairs
    held = [pairs[i] for i in plan_rng.permutation(len(pairs))]  # test from start, val from end
    train_pairs = [pairs[i] for i in plan_rng.permutation(len(pairs))]
    # drawn after the order family's permutations, so the order family's plan is version 2's;
    # the colour family has its own stream
    combo: dict[str, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]] = {}
    for family in ("motion", "colour"):
        groups = _family_groups(family)
        rng = plan_rng if family == "motion" else np.random.default_rng([seed, 7919, 2])
        permuted = [groups[i] for i in rng.permutation(len(groups))]
        count = _held_out_count(len(groups), holdout)
        trainable = permuted[count:]
        train_groups = [trainable[i] for i in rng.permutation(len(trainable))]
        combo[family] = (permuted, train_groups, count)

    specs: list[_ClipSpec] = []
    for split in SPLITS:
        for index in range(counts[split]):
            group, twin = divmod(index, 2)  # twins 0 and 1 of a group are hard negatives
            family = families[group % len(families)]
            k = group // len(families)  # the group's number within its family
            heldout = False
            if family == "order":
                if split == "train":
                    a, b = train_pairs[k % len(train_pairs)]
                elif split == "test":
                    a, b = held[k % len(held)]
                else:
                    a, b = held[-1 - (k % len(held))]
                first, second = (a, b) if twin == 0 else (b, a)
                objects: tuple[tuple[str, str], ...] = (_OBJECTS[first], _OBJECTS[second])
                direction = ""
            else:
                permuted, train_groups, count = combo[family]
                if split == "train":
                    position = -1
                    chosen = train_groups[k % len(train_groups)]
                elif split == "val":
                    position = len(permuted) - 1 - (k % len(permuted))
                    chosen = permuted[position]
                else:
                    position = k % len(permuted)
                    chosen = permuted[position]
                heldout = 0 <= position < count
                objects, direction = _combination_clip(family, chosen, twin)
            specs.append(
                _ClipSpec(
                    video_id=f"{split}_{index:06d}",
                    split=split,
                    index=index,
                    family=family,
                    objects=objects,
                    direction=direction,
                    caption=caption(family, objects, direction),
                    heldout=heldout,
                )
            )
    return specs


def _shape_masks(
    shape: str, size_px: int, xs: np.ndarray, ys: np.ndarray, radius: float | np.ndarray
) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (xs[k], ys[k]) with radius (one or per k),
    supersampled: float32 [K, S, S]."""
    radius = np.asarray(radius, dtype=np.float32).reshape(-1, 1, 1)  # [1 or K, 1, 1]
    n = size_px * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    v = (coords[None, :, None] - ys[:, None, None].astype(np.float32)) / radius  # [K, n, 1] rows
    u = (coords[None, None, :] - xs[:, None, None].astype(np.float32)) / radius  # [K, 1, n] cols
    # version 2 geometry (the first prototype's): every shape spans the full 2r box, so
    # a square (area 4r²) is larger than a circle (πr²); version 1 shrank the square to equal
    # areas, which the tiny 32² ViT (patch 8) told apart far worse (results_synthetic.md)
    if shape == "square":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    elif shape == "circle":
        inside = u * u + v * v <= 1.0
    elif shape == "triangle":
        inside = (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    elif shape == "cross":
        inside = ((np.abs(u) <= 1.0) & (np.abs(v) <= 1.0 / 3.0)) | (
            (np.abs(v) <= 1.0) & (np.abs(u) <= 1.0 / 3.0)
        )
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    count = len(xs)
    cover = inside.astype(np.float32).reshape(count, size_px, _SUPERSAMPLE, size_px, _SUPERSAMPLE)
    return cover.mean(axis=(2, 4))  # [K, S, S]


@dataclass(frozen=True)
class Appearance:
    """How a twin group looks; both twins of a group share it (only order/direction differ)."""

    background: np.ndarray  # float32 [S, S, 3], dark level + tint + static texture
    objects: tuple[tuple[float, float, float, float], ...]  # per object: cx, cy, radius, gain
    # per object, per frame of its half: float64 [F/2, 4] (cx, cy, radius, gain) drawn afresh
    # for every frame (``jitter="frame"``); None = the object keeps ``objects[i]`` all along
    frames_placements: tuple[np.ndarray, ...] | None = None


def _placement(family: str, size: int, rng: np.random.Generator) -> tuple[float, ...]:
    """One random (cx, cy, radius, gain) of an object in a ``size`` frame."""
    radius = size * rng.uniform(0.45, 0.6) / 2.0
    if family == "motion":
        radius = min(radius, size * 0.25)  # leave room to move
    slack = max(size / 2.0 - radius - 1.0, 0.0)
    cx = size / 2.0 + rng.uniform(-slack, slack)
    cy = size / 2.0 + rng.uniform(-slack, slack)
    return (cx, cy, radius, rng.uniform(0.8, 1.0))


def draw_appearance(
    family: str, size: int, rng: np.random.Generator, *, frames_per_object: int = 0
) -> Appearance:
    """Random background and object placement/size/brightness for one twin group.

    ``frames_per_object > 0`` also draws a fresh placement for every frame of each object's
    span (``Appearance.frames_placements``), shared by both twins: the order family's objects
    (half a clip each) and the colour family's one object (the whole clip).
    """
    level = rng.uniform(15.0, 55.0)
    tint = rng.uniform(-6.0, 6.0, size=3)
    texture = rng.normal(0.0, 6.0, size=(size, size, 1))
    background = (level + tint + texture).astype(np.float32)
    placed = tuple(_placement(family, size, rng) for _ in range(2 if family == "order" else 1))
    frames_placements = None
    if frames_per_object > 0 and family in ("order", "colour"):
        frames_placements = tuple(
            np.array([_placement(family, size, rng) for _ in range(frames_per_object)])
            for _ in placed
        )
    return Appearance(background, placed, frames_placements)


def _clutter(size: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy background of ``count`` frames: (additive texture [F, S, S, 1] redrawn every frame,
    grey distractor discs: coverage [F, S, S, 1] and grey level [F, 1, 1, 1])."""
    texture = rng.normal(0.0, 10.0, size=(count, size, size, 1)).astype(np.float32)
    cover = np.zeros((count, size, size, 1), dtype=np.float32)
    level = rng.uniform(70.0, 150.0, size=(count, 1, 1, 1)).astype(np.float32)
    for _ in range(3):  # three grey discs per frame at fresh places (no hue: never an object)
        xs = rng.uniform(0.0, size, size=count)
        ys = rng.uniform(0.0, size, size=count)
        radii = rng.uniform(size * 0.06, size * 0.12, size=count)
        cover = np.maximum(cover, _shape_masks("circle", size, xs, ys, radii)[..., None])
    return texture, np.concatenate([cover, level * np.ones_like(cover)], axis=-1)


def render_clip(
    family: str,
    objects: Sequence[tuple[str, str]],
    direction: str,
    appearance: Appearance,
    *,
    num_frames: int,
    rng: np.random.Generator,
    background: str = "plain",
) -> np.ndarray:
    """Render one clip: uint8 RGB frames [F, S, S, 3].

    ``order``: ``objects[i]`` drawn with ``appearance.objects[i]`` in half i of the clip.
    ``motion``: ``objects[0]`` crossing the frame towards ``direction``. ``colour``: one shape
    (``objects[0][1]``) whose colour goes linearly from ``objects[0][0]`` at the first frame to
    ``objects[1][0]`` at the last. ``rng`` adds the per-frame 1-pixel wobble and pixel noise,
    and with ``background="noisy"`` a texture redrawn every frame plus three grey distractor
    discs per frame at fresh places.
    """
    size = appearance.background.shape[0]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    backgrounds = np.broadcast_to(appearance.background, (num_frames, size, size, 3))
    if background == "noisy":
        texture, clutter = _clutter(size, num_frames, rng)
        cover, level = clutter[..., :1], clutter[..., 1:]
        backgrounds = (backgrounds + texture) * (1.0 - cover) + level * cover
    if family == "order":
        half = num_frames // 2
        spans = [(0, half), (half, num_frames)]
    else:
        spans = [(0, num_frames)]
    for i, ((first, stop), (colour, shape), (cx, cy, radius, gain)) in enumerate(
        zip(spans, objects, appearance.objects, strict=False)
    ):
        count = stop - first
        xs = np.full(count, cx, dtype=np.float64)
        ys = np.full(count, cy, dtype=np.float64)
        radii = np.full(count, radius, dtype=np.float64)
        gains = np.full(count, gain, dtype=np.float64)
        if appearance.frames_placements is not None and family in ("order", "colour"):
            per_frame = appearance.frames_placements[i][:count]  # [count, 4]
            xs, ys, radii, gains = (per_frame[:, j].copy() for j in range(4))
        if family == "colour":  # from objects[0]'s colour to objects[1]'s, linearly
            start = np.asarray(CHANGE_COLOURS[objects[0][0]], dtype=np.float32)
            end = np.asarray(CHANGE_COLOURS[objects[1][0]], dtype=np.float32)
            mix = np.linspace(0.0, 1.0, count, dtype=np.float32)[:, None]
            base = start[None] * (1.0 - mix) + end[None] * mix  # [count, 3]
        else:
            base = np.asarray(COLOURS[colour], dtype=np.float32)[None]
        rgb = base * gains[:, None]  # [count, 3]
        if family == "motion":  # edge to edge along the direction's axis (both for diagonals)
            track = np.linspace(radius, size - radius, num_frames)
            dx, dy = _STEPS[direction]
            if dx:
                xs = (track if dx > 0 else track[::-1])[first:stop].copy()
            if dy:
                ys = (track if dy > 0 else track[::-1])[first:stop].copy()
        wobble = rng.integers(-1, 2, size=(count, 2))  # 1-pixel jitter per frame
        covers = _shape_masks(shape, size, xs + wobble[:, 0], ys + wobble[:, 1], radii)
        covers = covers[..., None]  # [K, S, S, 1]
        noise = rng.normal(0.0, 4.0, size=(count, size, size, 3))
        colours = rgb[:, None, None, :].astype(np.float32)  # [K, 1, 1, 3]
        images = backgrounds[first:stop] * (1.0 - covers) + colours * covers + noise
        frames[first:stop] = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return frames


def _make_clip(job: tuple[_ClipSpec, str, int, int, int, int, str, str, str]) -> str:
    spec, videos_dir, seed, size, num_frames, fps, jitter, background, renderer = job
    if renderer == "camera":
        return _make_camera_clip(spec, videos_dir, seed, size, num_frames, fps)
    split_code = SPLITS.index(spec.split)
    group, twin = divmod(spec.index, 2)
    # both twins of a group share the appearance; wobble and noise are per clip
    appearance = draw_appearance(
        spec.family,
        size,
        np.random.default_rng([seed, split_code, group, 0]),
        frames_per_object=(num_frames if spec.family == "colour" else num_frames // 2)
        if jitter == "frame"
        else 0,
    )
    if twin == 1 and spec.family == "order":  # B then A: B keeps its look, A keeps its look
        placements = appearance.frames_placements
        appearance = Appearance(
            appearance.background,
            appearance.objects[::-1],
            placements[::-1] if placements is not None else None,
        )
    if twin == 1 and spec.family == "colour" and appearance.frames_placements is not None:
        # the reversed colour change visits the same placements in reverse order: frame t of
        # one twin is frame F-1-t of the other (up to per-clip noise)
        reversed_placements = tuple(p[::-1].copy() for p in appearance.frames_placements)
        appearance = Appearance(appearance.background, appearance.objects, reversed_placements)
    rng = np.random.default_rng([seed, split_code, spec.index, 1])
    frames = render_clip(
        spec.family,
        spec.objects,
        spec.direction,
        appearance,
        num_frames=num_frames,
        rng=rng,
        background=background,
    )
    write_mp4(Path(videos_dir) / f"{spec.video_id}.mp4", frames, fps)
    return spec.video_id


def _make_camera_clip(
    spec: _ClipSpec, videos_dir: str, seed: int, size: int, num_frames: int, fps: int
) -> str:
    """One clip by the second renderer: twin 0's content drawn from the group's RNG, played
    backwards for twin 1 (:mod:`tb_reranker.video.synth_camera`)."""
    from tb_reranker.video.synth_camera import camera_clip

    split_code = SPLITS.index(spec.split)
    group, twin = divmod(spec.index, 2)
    objects, direction = (
        (spec.objects, spec.direction)
        if twin == 0
        else time_reversed(spec.family, spec.objects, spec.direction)
    )
    clip = camera_clip(
        spec.family,
        objects,
        CHANGE_COLOURS if spec.family == "colour" else COLOURS,
        size=size,
        num_frames=num_frames,
        fps=fps,
        look=np.random.default_rng([seed, split_code, group, 2]),
        noise=np.random.default_rng([seed, split_code, spec.index, 3]),
        step=_STEPS.get(direction, (0, 0)),
        reverse=twin == 1,
    )
    write_mp4(Path(videos_dir) / f"{spec.video_id}.mp4", clip.frames, clip.fps)
    return spec.video_id


def _params(
    counts: dict[str, int],
    seed: int,
    size: int,
    num_frames: int,
    fps: int,
    families: Sequence[str],
    jitter: str,
    background: str = "plain",
    holdout: float = 0.0,
    renderer: str = "shapes",
) -> dict[str, Any]:
    params = {
        "generator": "tb_reranker.video.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "counts": dict(counts),
        "size": size,
        "num_frames": num_frames,
        "fps": fps,
        "families": list(families),
        "jitter": jitter,
        "codec": "libx264",
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
    }
    # only where they matter, so the default benchmark's arguments read as before
    if background != "plain":
        params["background"] = background
    if renderer != "shapes":
        params["renderer"] = renderer
    if any(f in ("motion", "colour") for f in families):
        params["holdout"] = holdout
    return params


def _is_complete(root: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json of an identical, complete earlier run; None when there is none."""
    meta_path = root / "meta.json"
    captions_path = root / "captions.jsonl"
    if not meta_path.is_file() or not captions_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("params") != params:
        return None
    try:
        with captions_path.open() as handle:
            for line in handle:
                if line.strip() and not (root / json.loads(line)["path"]).is_file():
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _holds_other_dataset(root: Path, params: dict[str, Any]) -> bool:
    """True when ``root`` has a captions.jsonl or meta.json not made with ``params``.

    An output of ours with the same arguments that lost files is simply regenerated.
    """
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return True
        return not (isinstance(meta, dict) and meta.get("params") == params)
    return (root / "captions.jsonl").exists()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _checked_counts(num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    """Clips per split, checked (at least one clip in all)."""
    counts = {
        "train": _check("num_train", num_train, 0),
        "val": _check("num_val", num_val, 0),
        "test": _check("num_test", num_test, 0),
    }
    if sum(counts.values()) == 0:
        raise InvalidInputError("nothing to generate: all split counts are 0")
    return counts


def _check_clip(seed: int, size: int, num_frames: int, fps: int, jitter: str) -> None:
    """Check the seed and the look of the clips."""
    _check("seed", seed, 0)
    if _check("size", size, 16) % 2:
        raise InvalidInputError(f"size must be even (yuv420p), got {size}")
    if _check("num_frames", num_frames, 4) % 2:
        raise InvalidInputError(f"num_frames must be even (two equal halves), got {num_frames}")
    _check("fps", fps, 1)
    if jitter not in JITTERS:
        raise InvalidInputError(f"jitter must be one of {list(JITTERS)}, got {jitter!r}")


def _checked_families(families: Sequence[str]) -> tuple[str, ...]:
    """The hard-negative families, checked: distinct names from ``FAMILIES``, at least one."""
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown or len(set(families)) != len(families):
        raise InvalidInputError(
            f"families must be distinct names from {list(FAMILIES)}, got {list(families)}"
        )
    return families


def _clear_output(root: Path, videos_dir: Path) -> None:
    """Create ``videos_dir``; remove the index files and the clips this generator names."""
    videos_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("meta.json", "captions.jsonl"):
        (root / stale).unlink(missing_ok=True)  # the output is incomplete from here on
    for old in videos_dir.iterdir():  # only files this generator names, never anything else
        if _CLIP_ID.match(old.name) or old.name.endswith(".part.mp4"):
            old.unlink()


def _warn_repeated_captions(specs: Sequence[_ClipSpec]) -> None:
    """Warn when a val/test split repeats a caption (ambiguous retrieval ground truth)."""
    for split in ("val", "test"):  # train repeats captions by design (many renders per pair)
        captions = [s.caption for s in specs if s.split == split]
        if len(set(captions)) < len(captions):
            log.warning(
                "split %s: %d clips but only %d distinct captions (more groups than the"
                " families hold): retrieval ground truth is ambiguous for repeats",
                split,
                len(captions),
                len(set(captions)),
            )


def _write_index(
    root: Path,
    specs: Sequence[_ClipSpec],
    params: dict[str, Any],
    seed: int,
    counts: dict[str, int],
    started: float,
) -> tuple[dict[str, Any], float]:
    """Write ``captions.jsonl``, then ``meta.json`` (last: it marks the output complete);
    return the meta and the seconds since ``started`` (``time.perf_counter``)."""
    lines = [
        json.dumps(
            {
                "video_id": s.video_id,
                "path": f"videos/{s.video_id}.mp4",
                "captions": [s.caption],
                "split": s.split,
                "family": s.family,
                **({"heldout": True} if s.heldout else {}),
            }
        )
        for s in specs
    ]
    _write_atomic(root / "captions.jsonl", "\n".join(lines) + "\n")
    elapsed = time.perf_counter() - started
    meta = {
        "params": params,
        "seed": seed,
        "counts": counts,
        "generator_version": GENERATOR_VERSION,
        "num_clips": len(specs),
        "clips_per_s": round(len(specs) / max(elapsed, 1e-9), 1),
    }
    _write_atomic(root / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta, elapsed


def generate(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    size: int = 32,
    num_frames: int = 16,
    fps: int = 8,
    families: Sequence[str] = ("order",),
    jitter: str = "frame",
    background: str = "plain",
    holdout: float = 0.25,
    renderer: str = "shapes",
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> SynthResult:
    """Generate the synthetic benchmark into ``out_dir`` (deterministic for a given ``seed``).

    Args:
        out_dir: output folder (created).
        num_train, num_val, num_test: clips per split (twins are consecutive; use even counts).
        seed: everything (plan, renders) follows from it.
        size: frame side in pixels (even, >= 16).
        num_frames: frames per clip (even, >= 4; object A fills the first half).
        fps: frame rate of the written clips.
        families: hard-negative families, from ``FAMILIES``; groups are assigned round-robin.
        jitter: ``"frame"``: order-family objects get a fresh position, size and brightness in
            every frame (shared by both twins); ``"clip"``: one placement per object for the
            whole clip (generator version 1's look) plus the 1-pixel wobble.
        background: ``"plain"`` (a static textured level) or ``"noisy"`` (plus a texture
            redrawn every frame and three grey distractor discs per frame).
        holdout: fraction of the motion / colour families' combinations never shown in train
            (test takes them first; ``captions.jsonl`` marks them ``"heldout": true``). The
            order family is unaffected.
        renderer: ``"shapes"`` (this module's drawing) or ``"camera"``: the same plan and
            captions drawn another way (:mod:`tb_reranker.video.synth_camera`: hard-edged turned
            shapes, photographic-noise backgrounds, camera shake, variable speed, frame rate,
            frame count and size), for cross-renderer evaluation. It draws its own backgrounds
            and motion, so it takes ``background="plain"`` and ``jitter="frame"`` only.
        workers: processes for rendering+encoding (default: CPU count; 1 = in this process).
        force: regenerate even if an output exists (identical or not).
        progress: show progress: a bar on a terminal, log lines elsewhere.

    Raises:
        InvalidInputError: bad counts, sizes or families.
        AlreadyExistsError: ``out_dir`` holds another dataset (different arguments) and not force.
    """
    started = time.perf_counter()
    counts = _checked_counts(num_train, num_val, num_test)
    _check_clip(seed, size, num_frames, fps, jitter)
    families = _checked_families(families)
    _check_scene(background, holdout, renderer, jitter)
    workers = (os.cpu_count() or 1) if workers is None else _check("workers", workers, 1)

    root = Path(out_dir)
    params = _params(
        counts, seed, size, num_frames, fps, families, jitter, background, holdout, renderer
    )
    done = _existing(root, params, force)
    if done is not None:
        return SynthResult(root, counts, 0, True, time.perf_counter() - started, done)

    videos_dir = root / "videos"
    _clear_output(root, videos_dir)

    specs = _plan(counts, families, seed, holdout)
    _warn_repeated_captions(specs)
    jobs = [
        (spec, str(videos_dir), seed, size, num_frames, fps, jitter, background, renderer)
        for spec in specs
    ]
    _run_jobs(jobs, workers, progress)

    meta, elapsed = _write_index(root, specs, params, seed, counts, started)
    log.info("wrote %d clips to %s in %.1f s", len(specs), root, elapsed)
    return SynthResult(root, counts, len(specs), False, elapsed, meta)


def _existing(root: Path, params: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """meta.json when ``root`` already holds this very dataset (nothing to do); None when it
    is to be written.

    Raises:
        InvalidInputError: ``root`` is a file.
        AlreadyExistsError: ``root`` holds another dataset and not ``force``.
    """
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"output path exists and is not a folder: {root}")
    done = _is_complete(root, params)
    if done is not None and not force:
        log.info("%s already holds this dataset (same arguments): nothing to do", root)
        return done
    if not force and _holds_other_dataset(root, params):
        raise AlreadyExistsError(
            f"{root} already holds a dataset made with other arguments (or an unfinished one);"
            " pass --force (force=True) to replace it"
        )
    return None


def _check_scene(background: str, holdout: float, renderer: str, jitter: str) -> None:
    from tb_reranker.video.synth_camera import RENDERERS

    if renderer not in RENDERERS:
        raise InvalidInputError(f"renderer must be one of {list(RENDERERS)}, got {renderer!r}")
    if renderer == "camera" and (background != "plain" or jitter != "frame"):
        raise InvalidInputError(
            "the camera renderer draws its own background and motion: leave background and "
            "jitter at their defaults"
        )
    if background not in BACKGROUNDS:
        raise InvalidInputError(
            f"background must be one of {list(BACKGROUNDS)}, got {background!r}"
        )
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise InvalidInputError(f"holdout must be a number in [0, 1), got {holdout!r}")


def _run_jobs(jobs: list[tuple[Any, ...]], workers: int, progress: bool) -> None:
    """Render+encode every job, in ``workers`` processes (fork: workers need no torch)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tb_reranker.progress import progress as show

    bar = show(total=len(jobs), desc="synth", unit="clip", enabled=progress)
    try:
        if workers == 1 or len(jobs) < 16:
            for job in jobs:
                _make_clip(job)
                bar.update(1)
            return
        # fork, not spawn: a spawned worker re-imports the caller's __main__, which loops
        # forever in scripts without a main guard; the workers only use numpy and PyAV.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        chunksize = max(1, min(32, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for _ in pool.map(_make_clip, jobs, chunksize=chunksize):
                bar.update(1)
    except BrokenProcessPool as exc:
        raise TBError(f"a synth worker process died: {exc}") from exc
    except OSError as exc:
        raise TBError(f"cannot write synthetic clips: {exc}") from exc
    finally:
        bar.close()

"""``tb synth``: generate the synthetic hard-negative benchmark (real MP4s + captions.jsonl);
``tb synth --long``: long videos of several events with moment annotations
(``tb_reranker.video.synth_long``).

Every flag also reads ``TB_SYNTH_<FLAG>`` (e.g. ``TB_SYNTH_SEED``) when it is not given.
"""

from __future__ import annotations

import argparse
from typing import Any

from tb_reranker.config import env
from tb_reranker.errors import InvalidInputError
from tb_reranker.numbers import COUNT, FRACTION, POSITIVE_INT, REAL, SECONDS, SEED, WORKERS

__all__ = ["register", "run"]

# flag dest -> (type, default); defaults can be overridden by TB_SYNTH_<DEST>
_DEFAULTS: dict[str, tuple[type, Any]] = {
    "train": (int, 3000),
    "val": (int, 0),
    "test": (int, 500),
    "seed": (int, 0),
    "size": (int, 32),
    "frames": (int, 16),
    "fps": (int, 8),
    "families": (str, "order"),
    "jitter": (str, "frame"),
    "background": (str, "plain"),
    "holdout": (float, 0.25),
    "renderer": (str, "shapes"),
    "workers": (int, 0),
}
# --long: its own flags, and its own defaults of the shared ones (size, families)
_LONG_DEFAULTS: dict[str, tuple[type, Any]] = {
    "pairs": (int, 2),
    "events": (int, 4),
    "event_s": (float, 10.0),
    "duration_min": (float, 0.0),
    "seed": (int, 0),
    "size": (int, 64),
    "fps": (int, 8),
    "families": (str, "order,motion,colour"),
    "background": (str, "plain"),
}
_CLIP_ONLY = ("train", "val", "test", "frames", "holdout", "jitter", "renderer", "workers")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic hard-negative benchmark (MP4 clips + captions.jsonl)",
        description=(
            "Clips show object A then object B (6 colours x 4 shapes); the test split holds "
            "both orders of each pair, so mean pooling cannot tell them apart. Writes "
            "OUT_DIR/videos/<id>.mp4, OUT_DIR/captions.jsonl and OUT_DIR/meta.json. Re-running "
            "with the same arguments does nothing; --force regenerates."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder")
    parser.add_argument("--train", type=COUNT.parse, default=None, help="training clips (3000)")
    parser.add_argument("--val", type=COUNT.parse, default=None, help="validation clips (0)")
    parser.add_argument(
        "--test", type=COUNT.parse, default=None, help="test clips (500 = 250 pairs)"
    )
    parser.add_argument("--seed", type=SEED.parse, default=None, help="random seed (0)")
    parser.add_argument(
        "--size", type=POSITIVE_INT.parse, default=None, help="frame side in pixels (32)"
    )
    parser.add_argument(
        "--frames", type=POSITIVE_INT.parse, default=None, help="frames per clip (16)"
    )
    parser.add_argument(
        "--fps", type=POSITIVE_INT.parse, default=None, help="frames per second (8)"
    )
    parser.add_argument(
        "--families",
        default=None,
        help="comma-separated hard-negative families: order, motion, colour (order)",
    )
    parser.add_argument(
        "--background",
        default=None,
        choices=("plain", "noisy"),
        help="plain, or noisy: a texture redrawn every frame + grey distractor discs (plain)",
    )
    parser.add_argument(
        "--holdout",
        type=FRACTION.parse,
        default=None,
        help="fraction of motion/colour combinations never shown in train (0.25)",
    )
    parser.add_argument(
        "--jitter",
        default=None,
        choices=("frame", "clip"),
        help="object placement drawn afresh every frame, or once per clip (frame)",
    )
    parser.add_argument(
        "--renderer",
        default=None,
        choices=("shapes", "camera"),
        help="how clips are drawn: shapes, or camera (hard-edged turned shapes, photographic "
        "noise, camera shake, variable speed/fps/size; the same captions) (shapes)",
    )
    parser.add_argument(
        "--workers", type=WORKERS.parse, default=None, help="worker processes (0 = one per CPU)"
    )
    _add_long_arguments(parser)
    parser.add_argument("--force", action="store_true", help="regenerate an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def _add_long_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "long videos (--long)",
        "OUT_DIR/videos/long_<n>.mp4: events cut one after another, each video followed by "
        "its twin, the same video played backwards (every caption true of one video only); "
        "OUT_DIR/videos.jsonl, "
        "OUT_DIR/moments.json (ActivityNet Captions format) and OUT_DIR/meta.json. Size "
        "defaults to 64 and families to order,motion,colour.",
    )
    group.add_argument("--long", action="store_true", help="write long videos with moments")
    group.add_argument("--pairs", type=POSITIVE_INT.parse, default=None, help="video pairs (2)")
    group.add_argument(
        "--events", type=POSITIVE_INT.parse, default=None, help="events per video, >= 2 (4)"
    )
    group.add_argument(
        "--event-s",
        type=SECONDS.parse,
        default=None,
        help="mean event length in seconds (10: four events make a 40 s file, past the 30 s up to which ingest keeps a file whole)",
    )
    group.add_argument(
        "--duration-min",
        type=REAL.parse,
        default=None,
        help="make every video at least this many minutes long by adding events (0 = off)",
    )


def _resolve(
    args: argparse.Namespace, name: str, defaults: dict[str, tuple[type, Any]] = _DEFAULTS
) -> Any:
    given = getattr(args, name)
    if given is not None:
        return given
    kind, default = defaults[name]
    raw = env(f"SYNTH_{name}")
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise InvalidInputError(
            f"TB_SYNTH_{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from tb_reranker.cli._common import print_json
    from tb_reranker.video.synth import generate

    if args.long:
        return _run_long(args)
    given = [name for name in _LONG_DEFAULTS if name not in _DEFAULTS]
    given = [name for name in given if getattr(args, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise InvalidInputError(f"{flag} applies to long videos only: add --long")
    values = {name: _resolve(args, name) for name in _DEFAULTS}
    families = tuple(f.strip() for f in values["families"].split(",") if f.strip())
    if values["workers"] < 0:
        raise InvalidInputError(f"--workers must be >= 0, got {values['workers']}")
    result = generate(
        args.out_dir,
        num_train=values["train"],
        num_val=values["val"],
        num_test=values["test"],
        seed=values["seed"],
        size=values["size"],
        num_frames=values["frames"],
        fps=values["fps"],
        families=families,
        jitter=values["jitter"],
        background=values["background"],
        holdout=values["holdout"],
        renderer=values["renderer"],
        workers=values["workers"] or None,
        force=args.force or (env("SYNTH_FORCE") or "").lower() in ("1", "true", "yes", "on"),
        progress=not args.no_progress,
    )
    total = sum(result.counts.values())
    if args.json:
        print_json(
            {
                "root": str(result.root),
                "counts": result.counts,
                "created": result.created,
                "skipped": result.skipped,
                "elapsed_s": round(result.elapsed_s, 3),
                "clips_per_s": round(result.created / max(result.elapsed_s, 1e-9), 1),
            }
        )
    elif result.skipped:
        print(f"{result.root}: already complete ({total} clips), nothing to do (--force to redo)")
    else:
        counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
        print(
            f"wrote {result.created} clips ({counts}) to {result.root} in "
            f"{result.elapsed_s:.1f} s ({result.created / max(result.elapsed_s, 1e-9):.0f} clips/s)"
        )
    return 0


def _run_long(args: argparse.Namespace) -> int:
    """``tb synth --long``: the long videos and their moments."""
    from tb_reranker.cli._common import print_json
    from tb_reranker.video.synth_long import generate_long

    for name in _CLIP_ONLY:
        if getattr(args, name) is not None:
            raise InvalidInputError(f"--{name} does not apply to --long")
    values = {name: _resolve(args, name, _LONG_DEFAULTS) for name in _LONG_DEFAULTS}
    result = generate_long(
        args.out_dir,
        num_pairs=values["pairs"],
        events_per_video=values["events"],
        event_s=values["event_s"],
        duration_min=values["duration_min"],
        fps=values["fps"],
        size=values["size"],
        seed=values["seed"],
        families=tuple(f.strip() for f in values["families"].split(",") if f.strip()),
        background=values["background"],
        force=args.force or (env("SYNTH_FORCE") or "").lower() in ("1", "true", "yes", "on"),
        progress=not args.no_progress,
    )
    longest = max(v.duration_s for v in result.videos)
    if args.json:
        print_json(
            {
                "root": str(result.root),
                "videos": len(result.videos),
                "events": sum(len(v.events) for v in result.videos),
                "longest_s": longest,
                "created": result.created,
                "skipped": result.skipped,
                "elapsed_s": round(result.elapsed_s, 3),
            }
        )
    elif result.skipped:
        print(f"{result.root}: already complete ({len(result.videos)} long videos), nothing to do")
    else:
        print(
            f"wrote {result.created} long videos (up to {longest:.1f} s each) and their moments "
            f"to {result.root} in {result.elapsed_s:.1f} s"
        )
    return 0

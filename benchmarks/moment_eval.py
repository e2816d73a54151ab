"""Moments from a model trained on short clips only (issue 22 §5's quality target).

    python -m benchmarks.moment_eval [--train-seed 11] [--test-seeds 101,202] [--epochs N]
        [--families order,motion,colour] [--pairs 30] [--work tb_data/moment_eval]

1. ``tb synth`` short clips (``--train`` clips of ``--families``, seed ``--train-seed``);
2. the tiny model trained on them with the ``synthetic`` preset (``--epochs``: the preset's
   unless given), reused from ``--work`` when made with the same settings;
3. per test seed (never used for anything else), a ``tb synth --long`` set of ``--pairs`` pairs
   (its defaults: 4 events of 10 s x [0.75, 1.25], 64 px, 8 fps, the same families);
4. ``evaluate_moments`` (segments ``shots``, K = the model's top_k): video R@k and moment
   R1@IoU, broad vs reranked, per seed, their mean, and per family (pooled over the seeds);
5. the short-clip reference of the same checkpoint: t2v R@k, broad vs reranked, on a ``tb
   synth`` test split of ``--short-test`` clips of the same families, seed ``--short-seed``
   (0 clips: skipped).

A long set left in ``--work`` by other arguments or another generator version is regenerated.

Targets: reranked video R@1 >= broad + 15 points; moment IoU >= 0.5 in >= 80 % of the queries
whose top video is right. Prints the JSON and writes it with a bar plot under
``--out`` (benchmarks/results/moment_eval/).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_OUT, emit, environment

log = logging.getLogger("moment_eval")

COMMAND = "python -m benchmarks.moment_eval " + " ".join(sys.argv[1:])


def _checkpoint(args: argparse.Namespace, families: tuple[str, ...]) -> tuple[Path, float]:
    """The trained checkpoint (reused when the stamp matches); returns (dir, training seconds)."""
    from tb_reranker.training import PRESETS, TrainConfig, train
    from tb_reranker.video.synth import generate

    work = Path(args.work)
    data = work / f"train_{args.train_seed}"
    generate(data, num_train=args.train, num_val=0, num_test=0, seed=args.train_seed,
             families=families, progress=False)  # fmt: skip
    preset = dict(PRESETS["synthetic"]) | ({"epochs": args.epochs} if args.epochs else {})
    wanted = {"seed": args.train_seed, "train": args.train, "families": list(families),
              "preset": preset}  # fmt: skip
    checkpoint, stamp = work / "checkpoint", work / "checkpoint.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return checkpoint, float(json.loads((work / "trained_s").read_text()))
    started = time.perf_counter()
    run = work / "train"
    shutil.rmtree(run, ignore_errors=True)
    trained = train(
        TrainConfig(data_root=str(data), out_dir=str(run), model_config="tiny",
                    preset="synthetic", seed=args.train_seed, epochs=args.epochs,
                    cache_dir=str(work / "cache"), threads=args.threads, progress=False)
    )  # fmt: skip
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.copytree(trained, checkpoint)
    seconds = time.perf_counter() - started
    (work / "trained_s").write_text(json.dumps(round(seconds, 1)))
    stamp.write_text(json.dumps(wanted))
    return checkpoint, seconds


def _long_set(root: Path, args: argparse.Namespace, seed: int, families: tuple[str, ...]) -> None:
    """The long test set of ``seed`` in ``root``, regenerated when it was made otherwise."""
    from tb_reranker.errors import AlreadyExistsError
    from tb_reranker.video.synth_long import generate_long

    kwargs = {"num_pairs": args.pairs, "seed": seed, "families": families, "progress": False}
    try:
        generate_long(root, **kwargs)
    except AlreadyExistsError:
        log.info("%s holds a long set made otherwise (an older generator): regenerating", root)
        generate_long(root, force=True, **kwargs)


def _short_reference(model: Any, args: argparse.Namespace, families: tuple[str, ...]) -> Any:
    """t2v R@1/5/10, broad vs reranked, of ``model`` on short test clips (None: skipped)."""
    from tb_reranker.training.evaluate import evaluate
    from tb_reranker.training.features import load_video_captions
    from tb_reranker.video.synth import generate

    if not args.short_test:
        return None
    root = Path(args.work) / f"short_test_{args.short_seed}"
    generate(root, num_train=0, num_val=0, num_test=args.short_test, seed=args.short_seed,
             families=families, progress=False)  # fmt: skip
    data = load_video_captions("generic", str(root), "test")
    result = evaluate(model, data, cache_dir=Path(args.work) / "cache", workers=args.threads)
    return {
        "what": f"t2v on a tb synth test split of {args.short_test} short clips of "
        f"{','.join(families)}, seed {args.short_seed} (training.evaluate, pessimistic ties)",
        "t2v": {
            view: {k: round(result["t2v"][view][k], 1) for k in ("R@1", "R@5", "R@10")}
            for view in ("broad", "reranked")
        },
    }


def _families_of(root: Path) -> dict[tuple[str, str], str]:
    """(video_id, caption) -> family, from videos.jsonl."""
    out = {}
    for line in (root / "videos.jsonl").read_text().splitlines():
        row = json.loads(line)
        for event in row["events"]:
            out[(row["video_id"], event["caption"])] = event["family"]
    return out


def _summary(queries: list[dict[str, Any]]) -> dict[str, Any]:
    """Video R@1 and moment figures of a list of per-query records, both views."""
    out: dict[str, Any] = {"num_queries": len(queries)}
    for view in ("broad", "reranked"):
        ranks = np.array([q[f"{view}_rank"] for q in queries])
        ious = np.array([q[f"{view}_iou"] for q in queries])
        right = ranks == 1
        out[view] = {
            "video_R@1": round(float(100 * right.mean()), 1),
            "R1@IoU0.5": round(float(100 * np.mean(ious >= 0.5)), 1),
            "R1@IoU0.5_of_top_video_right": round(float(100 * np.mean(ious[right] >= 0.5)), 1)
            if right.any()
            else None,
        }
    return out


def _mean(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over seeds of every figure of the moment table, both views."""
    from tb_reranker.training.evaluate_moments import _ROWS

    return {
        view: {
            f"{level} {name}": round(float(np.mean([r[view][level][name] for r in results])), 2)
            for level, name in _ROWS
        }
        for view in ("broad", "reranked")
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tb_reranker.model import load_checkpoint
    from tb_reranker.training.evaluate_moments import evaluate_moments

    torch.set_num_threads(args.threads)
    families = tuple(f for f in args.families.split(",") if f)
    checkpoint, trained_s = _checkpoint(args, families)
    model = load_checkpoint(checkpoint)
    per_seed, pooled = {}, []
    for seed in args.test_seeds:
        root = Path(args.work) / f"long_{seed}"
        _long_set(root, args, seed, families)
        started = time.perf_counter()
        result = evaluate_moments(model, root, workers=args.threads, details=True)
        result["eval_s"] = round(time.perf_counter() - started, 1)
        family = _families_of(root)
        for q in result["queries"]:
            q["family"] = family[(q["video_id"], q["caption"])]
        pooled += result.pop("queries")
        per_seed[str(seed)] = result
    mean = _mean(list(per_seed.values()))
    broad, reranked = mean["broad"], mean["reranked"]
    gain = reranked["video R@1"] - broad["video R@1"]
    conditional = reranked["moment R1@IoU0.5_of_top_video_right"]
    return {
        "command": COMMAND,
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"epochs_used": args.epochs or 30, "checkpoint": str(checkpoint)},
        "training_s": trained_s,
        "per_seed": per_seed,
        "mean_over_seeds": mean,
        "per_family": {f: _summary([q for q in pooled if q["family"] == f]) for f in families},
        "short_clip_reference": _short_reference(model, args, families),
        "targets": {
            "video_R@1_gain": {"measured": round(gain, 2), "target": 15.0, "met": gain >= 15.0},
            "moment_IoU0.5_of_top_video_right": {
                "measured": conditional,
                "target": 80.0,
                "met": conditional is not None and conditional >= 80.0,
            },
        },
        "environment": environment(),
    }


def _plot(report: dict[str, Any], path: Path) -> None:
    from tb_reranker.training.evaluate_moments import _ROWS, plot_moment_metrics

    mean = report["mean_over_seeds"]
    as_result = {
        view: {
            level: {name: mean[view][f"{level} {name}"] for lv, name in _ROWS if lv == level}
            for level in ("video", "moment")
        }
        for view in ("broad", "reranked")
    }
    seeds = ", ".join(report["per_seed"])
    plot_moment_metrics(
        as_result, path, title=f"trained on short clips; long sets of seeds {seeds}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-seed", type=int, default=11)
    parser.add_argument("--test-seeds", type=lambda t: [int(s) for s in t.split(",")],
                        default=[101, 202])  # fmt: skip
    parser.add_argument("--train", type=int, default=3000, help="short training clips")
    parser.add_argument("--epochs", type=int, default=None, help="(the synthetic preset's: 30)")
    parser.add_argument("--families", default="order,motion,colour")
    parser.add_argument("--pairs", type=int, default=30, help="long video pairs per test seed")
    parser.add_argument("--short-seed", type=int, default=303, help="short-clip reference")
    parser.add_argument("--short-test", type=int, default=480, help="its clips (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="tb_data/moment_eval")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "moment_eval")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(report, args.out / "moment_eval.png")
    emit("moment_eval", report, args.out)


if __name__ == "__main__":
    main()

"""Issue 24: does a training recipe learn the concept or the renderer? Arms × training seeds,
each trained on one renderer and tested on held-out compositions of both renderers.

    python -m benchmarks.robust_training --work tb_data/robust --data-seed 41 \
        --seeds 1,2 --arms none,augment [--train-renderer shapes] [--epochs 30]

For each data seed: ``tb synth`` writes a training set (``--train`` clips of the order, motion
and colour families, ``--train-renderer``) and a test set of ``--test`` clips with the same seed
on **each** renderer (the same plan: the held-out compositions are the ones training never saw).
Each (arm, training seed) trains the tiny model with the synthetic preset (runs are reused when
their stamp matches) and is evaluated per family with ``benchmarks.synth_eval`` (t2v R@1, broad
and reranked, all queries and held-out compositions) on both test sets, at the epochs in
``--eval-epochs`` (the last by default; several give R@1 per epoch: a run that never takes off
is told from one that learns late). Prints JSON; writes ``--json`` and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

ARMS: dict[str, str] = {
    "none": "",
    "augment": "crop=0.5,colour=0.5,shift=0.5,flip=0.5,reverse=0.5",
    "preserving": "crop=0.5,colour=0.5,shift=0.5",
    "twins": "flip=0.5,reverse=0.5",
    # augment plus the renderer-gap ones: smaller objects, textured backgrounds, variable speed
    "wide": "crop=0.5,colour=0.5,shift=0.5,zoom=0.5,noise=0.5,time=0.5,flip=0.5,reverse=0.5",
    # wide without the added twins: no larger batches, so about the training time of none
    "keep": "crop=0.5,colour=0.5,shift=0.5,zoom=0.5,noise=0.5,time=0.5",
    # augment without the flip twins: the reversal twins are the hard negatives of the default
    # family and cost no vision encoding, the flip twins cost a whole clip each
    "light": "crop=0.5,colour=0.5,shift=0.5,reverse=0.5",
}
WARMUP: dict[str, int] = {"warm": 10}  # epochs of --augment-warmup, per arm (else 0)
ARMS["warm"] = ARMS["wide"]  # wide, its probabilities ramped up over the first 10 epochs
# model levers, per arm (TokenBinderConfig overrides through TrainConfig; else the tiny default)
MODEL: dict[str, dict[str, Any]] = {"diff": {"frame_motion": True}}
ARMS["diff"], WARMUP["diff"] = ARMS["warm"], WARMUP["warm"]  # warm + frame differences
# warm without the flip twins (light plus the renderer-gap augmentations, ramped up the same
# way): warm's robustness to the renderer at about light's cost
ARMS["warm_light"] = "crop=0.5,colour=0.5,shift=0.5,zoom=0.5,noise=0.5,time=0.5,reverse=0.5"
WARMUP["warm_light"] = WARMUP["warm"]
ARMS["light_wide"] = ARMS["warm_light"]  # the same spec from the first epoch (no warm-up)
# light plus the renderer-gap augmentations at half light_wide's probability
ARMS["gentle"] = "crop=0.5,colour=0.5,shift=0.5,zoom=0.25,noise=0.25,time=0.25,reverse=0.5"
FAMILIES = ("order", "motion", "colour")
RENDERERS = ("shapes", "camera")


def _data(work: Path, args: argparse.Namespace, seed: int) -> dict[str, Path]:
    from tb_reranker.video.synth import generate

    tag = "" if args.families == FAMILIES else "_" + "-".join(args.families)
    train = work / f"train_{args.train_renderer}_{seed}{tag}"
    generate(train, num_train=args.train, num_val=0, num_test=0, seed=seed,
             families=args.families, renderer=args.train_renderer, progress=False)  # fmt: skip
    out = {"train": train}
    for renderer in RENDERERS:
        out[renderer] = work / f"test_{renderer}_{seed}{tag}"
        generate(out[renderer], num_train=0, num_val=0, num_test=args.test, seed=seed,
                 families=args.families, renderer=renderer, progress=False)  # fmt: skip
    return out


def _train(work: Path, data: Path, arm: str, seed: int, args: argparse.Namespace) -> Path:
    """The run's folder of epoch checkpoints (reused when its stamp matches)."""
    from tb_reranker.training import TrainConfig, train

    run = work / f"run_{data.name}_{arm}_s{seed}"
    wanted = {"data": data.name, "arm": ARMS[arm], "seed": seed, "epochs": args.epochs}
    if WARMUP.get(arm):
        wanted["augment_warmup"] = WARMUP[arm]
    if MODEL.get(arm):
        wanted["model"] = MODEL[arm]
    stamp = run / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return run
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    train(
        TrainConfig(data_root=str(data), out_dir=str(run), model_config="tiny",
                    preset="synthetic", seed=seed, epochs=args.epochs, augment=ARMS[arm],
                    augment_warmup=WARMUP.get(arm, 0),
                    **MODEL.get(arm, {}),
                    cache_dir=str(work / "cache"), threads=args.threads, progress=False)
    )  # fmt: skip
    wanted["seconds"] = round(time.perf_counter() - started, 1)
    stamp.write_text(json.dumps(wanted))
    return run


def _evaluate(checkpoint: Path, test: Path, work: Path, threads: int) -> dict[str, Any]:
    from benchmarks.synth_eval import run

    result = run(argparse.Namespace(checkpoint=str(checkpoint), data=str(test),
                                    cache_dir=str(work / "cache"), k=None, threads=threads,
                                    diagnose=False))  # fmt: skip
    t2v = result["t2v"]
    return {
        group: {view: t2v[group][view]["R@1"] for view in ("broad", "reranked")}
        for group in ("all", "heldout", *FAMILIES)  # those the test set has
        if group in t2v
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": args.command, "families": list(args.families),
                              "train_renderer": args.train_renderer,
                              "epochs": args.epochs, "arms": {a: ARMS[a] for a in args.arms},
                              "augment_warmup": {a: WARMUP[a] for a in args.arms if a in WARMUP},
                              "model": {a: MODEL[a] for a in args.arms if a in MODEL},
                              "runs": []}  # fmt: skip
    for data_seed in args.data_seeds:
        data = _data(work, args, data_seed)
        for arm in args.arms:
            for seed in args.seeds:
                folder = _train(work, data["train"], arm, seed, args)
                stamp = json.loads((folder / "stamp.json").read_text())
                entry = {"data_seed": data_seed, "arm": arm, "seed": seed,
                         "train_s": stamp.get("seconds"), "eval": {}}  # fmt: skip
                epochs = args.eval_epochs or [args.epochs]
                for epoch in epochs:
                    entry["eval"][epoch] = {
                        renderer: _evaluate(
                            folder / f"epoch-{epoch}", data[renderer], work, args.threads
                        )  # fmt: skip
                        for renderer in RENDERERS
                    }
                report["runs"].append(entry)
                logging.getLogger("robust").warning("%s", json.dumps(entry))
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RENDERERS), figsize=(10, 4), sharey=True)
    for ax, renderer in zip(axes, RENDERERS, strict=True):
        labels, broad, reranked = [], [], []
        for entry in report["runs"]:
            scores = entry["eval"][max(entry["eval"], key=int)][renderer]
            last = scores.get("heldout", scores["all"])
            labels.append(f"{entry['arm']}\nd{entry['data_seed']} s{entry['seed']}")
            broad.append(last["broad"])
            reranked.append(last["reranked"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], broad, 0.4, label="broad")
        ax.bar([x + 0.2 for x in xs], reranked, 0.4, label="reranked")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(f"held-out compositions (else all), {renderer} test", fontsize=9)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("t2v R@1")
    axes[0].legend()
    fig.suptitle(f"trained on {report['train_renderer']} ({report['epochs']} epochs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="tb_data/robust")
    parser.add_argument("--data-seeds", default="41")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--arms", default="none,augment")
    parser.add_argument("--train-renderer", default="shapes", choices=RENDERERS)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-epochs", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/robust_training.json")
    args = parser.parse_args()
    args.command = "python -m benchmarks.robust_training " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("json",)
    )
    args.data_seeds = [int(s) for s in args.data_seeds.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = args.arms.split(",")
    args.families = tuple(args.families.split(","))
    args.eval_epochs = [int(e) for e in args.eval_epochs.split(",") if e]
    logging.basicConfig(level=logging.WARNING)
    report = run(args)
    text = json.dumps(report, indent=1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text + "\n")
    _plot(report, Path(args.json).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()

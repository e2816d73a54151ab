"""The main job, end to end on the embedded default: ``tb demo`` / ``make demo``.

1. generate a small synthetic library of real MP4s (hard negatives: the same two objects in
   either order, so a mean-pooled video vector cannot tell them apart);
2. train a tiny TokenBinder on its train split (or reuse the cached checkpoint);
3. ingest the test split into Milvus Lite + the local frame-token store;
4. run a few example queries, showing broad vs reranked positions;
5. search every test caption through the SDK and report broad vs reranked R@1/R@5.

Every step reuses what a previous run left (same seed and sizes), so a re-run takes seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    data_dir: str = "./tb_data/demo"  # everything the demo writes lives here
    seed: int = 0  # generation and training seed
    num_train: int = 3000  # synthetic training clips
    num_test: int = 500  # synthetic test clips (both orders of 250 pairs)
    epochs: int | None = None  # None = the synthetic preset's default
    examples: int = 3  # example queries printed
    progress: bool = True  # progress bars


def _recall(ranks: list[int], k: int) -> float:
    return 100.0 * sum(1 for r in ranks if r <= k) / max(len(ranks), 1)


def _checkpoint(root: Path, config: DemoConfig) -> tuple[Path, bool]:
    """The demo's checkpoint under ``root``: reused when made with the same settings, else
    trained. Returns (directory, reused)."""
    from tb_reranker.training import PRESETS, train_synthetic

    checkpoint = root / "checkpoint"
    stamp = root / "checkpoint.json"
    # the resolved training settings: a changed preset (e.g. more epochs) retrains
    preset = dict(PRESETS["synthetic"])
    if config.epochs is not None:
        preset["epochs"] = config.epochs
    wanted = {"seed": config.seed, "num_train": config.num_train, "preset": preset}
    reuse = (
        (checkpoint / "config.json").exists()
        and stamp.exists()
        and (json.loads(stamp.read_text()) == wanted)
    )
    if not reuse:
        shutil.rmtree(root / "train", ignore_errors=True)  # the demo's own run of other settings
        trained = train_synthetic(
            root / "synth",
            root / "train",
            seed=config.seed,
            epochs=config.epochs,
            progress=config.progress,
        )
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        shutil.copytree(trained, checkpoint)
        stamp.write_text(json.dumps(wanted))
    return checkpoint, reuse


def _show_examples(client: Any, examples: list[tuple[str, str]], out: Callable[[str], None]):
    out("[4/5] example queries (rank: reranked position, broad: position before rerank)")
    for text, gt in examples:
        hits = client.search(text, limit=5)
        out(f'  query: "{text}"   (ground truth: {gt})')
        for hit in hits:
            mark = "  <-- ground truth" if hit.id == gt else ""
            out(
                f"    rank {hit.rank}  broad {hit.broad_rank:>2}  score {hit.score:+.3f} "
                f"(broad {hit.broad_score:+.3f}, delta {hit.delta:+.3f})  {hit.id}{mark}"
            )


def _ranks(captions: list[tuple[str, str]], results: list[list[Any]], limit: int) -> list[int]:
    """1-based rank of each query's ground truth (``limit + 1`` when not returned)."""
    found = []
    for (_, gt), hits in zip(captions, results, strict=True):
        ids = [hit.id for hit in hits]
        found.append(ids.index(gt) + 1 if gt in ids else limit + 1)
    return found


def _forget_library(milvus_db: Path, frames: Path) -> None:
    """Drop the demo's collection (through Milvus Lite: its server may still hold the file) and
    its frame store."""
    from tb_reranker.index import VideoIndex

    if milvus_db.exists():
        index = VideoIndex(str(milvus_db), collection="tb_videos")
        try:
            index.drop()
        finally:
            index.close()
    shutil.rmtree(frames, ignore_errors=True)


def run_demo(
    config: DemoConfig = DemoConfig(), out: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the demo; print a readable account through ``out``; return the figures."""
    from tb_reranker.client import Client
    from tb_reranker.data import load_dataset
    from tb_reranker.video.synth import generate

    root = Path(config.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    synth = generate(
        root / "synth",
        num_train=config.num_train,
        num_val=0,
        num_test=config.num_test,
        seed=config.seed,
        progress=config.progress,
    )
    timings["generate_s"] = time.perf_counter() - t0
    out(
        f"[1/5] synthetic library: {sum(synth.counts.values())} clips in {synth.root} "
        f"({'reused' if synth.skipped else f'made in {synth.elapsed_s:.0f} s'})"
    )

    t0 = time.perf_counter()
    checkpoint, reuse = _checkpoint(root, config)
    timings["train_s"] = time.perf_counter() - t0
    how = "reused" if reuse else f"trained in {timings['train_s']:.0f} s"
    out(f"[2/5] checkpoint: {checkpoint} ({how})")

    test = load_dataset("folder", root / "synth", split="test")
    milvus_db, frames = root / "milvus.db", root / "frames"  # the demo's own, whatever TB_* say
    if not reuse:  # a new checkpoint has another vision side: its library is ingested afresh
        _forget_library(milvus_db, frames)
    with Client(
        str(milvus_db),
        collection="tb_videos",
        store=str(frames),
        data_dir=str(root),
        checkpoint=str(checkpoint),
    ) as client:
        t0 = time.perf_counter()
        report = client.ingest([video.path for video in test.videos], progress=config.progress)
        timings["ingest_s"] = time.perf_counter() - t0
        out(f"[3/5] ingest into Milvus Lite + local store: {report.summary()}")

        captions = [(video.captions[0], video.video_id) for video in test.videos]
        _show_examples(client, captions[: config.examples], out)

        t0 = time.perf_counter()
        texts = [text for text, _ in captions]
        limit = max(10, client.model.top_k)
        broad = client.search_many(texts, limit=limit, rerank=False)
        reranked = client.search_many(texts, limit=limit, rerank=True)
        timings["search_s"] = time.perf_counter() - t0

    broad_ranks = _ranks(captions, broad, limit)
    reranked_ranks = _ranks(captions, reranked, limit)
    figures = {
        "queries": len(captions),
        "broad": {"R@1": _recall(broad_ranks, 1), "R@5": _recall(broad_ranks, 5)},
        "reranked": {"R@1": _recall(reranked_ranks, 1), "R@5": _recall(reranked_ranks, 5)},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    out(f"[5/5] text→video over the whole test split ({len(captions)} queries, via Client.search):")
    out(f"  {'':10} {'R@1':>6} {'R@5':>6}")
    for name in ("broad", "reranked"):
        out(f"  {name:10} {figures[name]['R@1']:6.1f} {figures[name]['R@5']:6.1f}")
    example = captions[0][0] if captions else "a red circle then a blue square"
    out(f'next: tb search "{example}" --data-dir {root} --checkpoint {checkpoint}')
    return figures

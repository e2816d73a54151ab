"""What ``tb train --augment`` costs per training step, and what encoding a time-reversal twin
from its clip's tokens saves (issue 24).

    .venv/bin/python -m benchmarks.augment_cost [--threads 2] [--steps 20] [--quick]

The tiny model of the ``synthetic`` preset, one optimizer step (forward, backward, AdamW) on a
batch of 64 random clips (T = 8, 32×32, the default family's captions, each with its word-order
twin). Arms, timed round-robin step by step (the machine is shared and noisy: read the ratios):

* ``none``: no augmentation;
* ``augment_pixels``: ``crop,colour,shift,flip,reverse`` at 0.5 with every twin encoded from
  its pixels (``AugmentedBatch.materialise``: the training path before this benchmark);
* ``augment``: the same spec as training runs it now, each reversal twin its clip's encoded
  tokens reversed (``loop._encode_with_reversals``);
* ``order``: ``crop,colour,shift,reverse`` at 0.5 (no flip twins), tokens path.

Prints JSON (median ms per step and the ratio to ``none``) and writes ``augment_cost.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

from benchmarks.common import add_common_arguments, configure_threads, emit, environment

SPECS = {
    "none": "",
    "augment_pixels": "crop=0.5,colour=0.5,shift=0.5,flip=0.5,reverse=0.5",
    "augment": "crop=0.5,colour=0.5,shift=0.5,flip=0.5,reverse=0.5",
    "order": "crop=0.5,colour=0.5,shift=0.5,reverse=0.5",
}


def _batch(size: int, seed: int) -> tuple[Any, Any, list[str]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(size, 8, 3, 32, 32, generator=generator)
    masks = torch.ones(size, 8, dtype=torch.bool)
    colours = ("red", "green", "blue", "white", "purple", "yellow", "orange", "cyan")
    texts = [
        f"a {colours[i % 8]} square then a {colours[(i // 8 + i + 1) % 8]} circle"
        for i in range(size)
    ]
    return frames, masks, texts


def _step(model: Any, optimizer: Any, arm: str, batch: Any, generator: Any) -> float:
    from tb_reranker.model import tokenbinder_loss
    from tb_reranker.training.augment import Augment
    from tb_reranker.training.loop import _encode_with_reversals

    frames, masks, texts = batch
    started = time.perf_counter()
    augment = Augment.parse(SPECS[arm])
    if augment:
        augmented = augment.batch(frames, masks, texts, generator)
        if arm == "augment_pixels":
            frames, masks, texts = augmented.materialise()
        else:
            frames, masks, texts = _encode_with_reversals(model, augmented)
    optimizer.zero_grad(set_to_none=True)
    tokenbinder_loss(model, texts, frames, frames_mask=masks)["loss"].backward()
    optimizer.step()
    return (time.perf_counter() - started) * 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig

    configure_threads(args.threads)
    model = TokenBinder(TokenBinderConfig.tiny(gumbel_scale=0.0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch(args.batch, args.seed)
    generators = {arm: torch.Generator().manual_seed(args.seed) for arm in SPECS}
    samples: dict[str, list[float]] = {arm: [] for arm in SPECS}
    for step in range(args.steps + 1):  # the first round warms up and is dropped
        for arm in SPECS:
            elapsed = _step(model, optimizer, arm, batch, generators[arm])
            if step:
                samples[arm].append(elapsed)
    median = {arm: statistics.median(values) for arm, values in samples.items()}
    return {
        "benchmark": "augment_cost",
        "environment": environment(),
        "batch": args.batch,
        "steps": args.steps,
        "specs": SPECS,
        "median_ms_per_step": {arm: round(value, 1) for arm, value in median.items()},
        "ratio_to_none": {arm: round(value / median["none"], 2) for arm, value in median.items()},
        "tokens_over_pixels": round(median["augment"] / median["augment_pixels"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--batch", type=int, default=64, help="clips per step")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 2, 8
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    emit("augment_cost", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

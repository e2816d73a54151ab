"""Per-family evaluation of a checkpoint on a ``tb synth`` folder, and the listwise diagnostics.

    python -m benchmarks.synth_eval --checkpoint RUN/epoch-20 --data SYNTH --cache-dir CACHE \
        [--diagnose] [--json OUT.json]

Retrieval runs over the whole test split (every caption against every clip, as ``tb eval``);
the R@k of each family's queries (and of the held-out combinations) are then reported apart.
``--diagnose`` adds, text→video, the no-training diagnostics of issue 13 §1: the head's Δ
averaged per candidate slot, R@1 when each candidate is scored alone (K = 1, pointwise, the
same weights), and for queries whose reversed twin (the other clip of the twin group) is among
the top-K: Δ(ground truth) − Δ(twin) in the joint pass vs pointwise, and the attention mass on
the ground truth vs the twin.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("synth_eval")


def _records(root: Path) -> dict[str, dict[str, Any]]:
    lines = (root / "captions.jsonl").read_text().splitlines()
    return {r["video_id"]: r for r in (json.loads(line) for line in lines if line.strip())}


def _recall(ranks: np.ndarray) -> dict[str, float]:
    if len(ranks) == 0:
        return {}
    # R@10: with K = 10 candidates, the broad view's R@10 is the most the rerank can reach
    return {f"R@{k}": round(float(100 * np.mean(ranks <= k)), 1) for k in (1, 5, 10)} | {
        "n": int(len(ranks))
    }


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    from tb_reranker.model import load_checkpoint
    from tb_reranker.training.evaluate import _ranks, encode_texts, score_matrices
    from tb_reranker.training.features import (
        load_features,
        load_model_frames,
        load_video_captions,
    )

    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    model.eval()
    videos = load_video_captions("generic", args.data, "test")
    frame_set = load_model_frames(model, videos, cache_dir=args.cache_dir, progress=False)
    videos = frame_set.videos
    features = load_features(model, frame_set, cache_dir=args.cache_dir, progress=False)
    texts = [c for caps in videos.captions for c in caps]
    indicators = encode_texts(model, texts, 64, False)
    k = args.k or model.top_k
    mats = score_matrices(model, indicators, features.cls, features.frames_tokens, k=k)
    ranks = _ranks(mats, videos.captions)
    records = _records(Path(args.data))
    family = np.array([records[v].get("family", "order") for v in videos.videos_ids])
    heldout = np.array([bool(records[v].get("heldout")) for v in videos.videos_ids])
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "k": k, "head": model.config.head}
    groups = {"all": np.ones(len(family), bool)}
    for name in sorted(set(family)):
        groups[name] = family == name
    if heldout.any():
        groups["heldout"] = heldout
        groups["seen (non-order)"] = (~heldout) & (family != "order")
    for direction in ("t2v", "v2t"):
        out[direction] = {
            g: {view: _recall(r[mask]) for view, r in ranks[direction].items()}
            for g, mask in groups.items()
        }
    if args.diagnose:
        out["diagnose"] = _diagnose(model, indicators, features, mats, k)
    return out


@torch.no_grad()
def _diagnose(model: Any, indicators: torch.Tensor, features: Any, mats: dict, k: int) -> dict:
    """No-training diagnostics of the focused view, text→video (one caption per clip)."""
    cls, tokens = features.cls, features.frames_tokens
    cands = mats["candidates"]  # [M, K] by broad score
    num = cands.shape[0]
    truth = torch.arange(num)
    twin = truth ^ 1
    joint = model.focused_scores(indicators, cls[cands], tokens[cands])
    delta = joint.delta  # [M, K]
    mass = joint.frame_attention.sum(-1)  # [M, K]
    # pointwise: each candidate alone, in slot 0 (K = 1)
    flat_ind = indicators.repeat_interleave(cands.shape[1], 0)  # [M*K, m, D]
    flat = cands.reshape(-1)
    point = model.focused_scores(flat_ind, cls[flat][:, None], tokens[flat][:, None])
    delta_point = point.delta.view(num, -1)
    broad = joint.broad

    def r1(scores: torch.Tensor) -> float:
        best = cands[torch.arange(num), scores.argmax(1)]
        return round(float(100 * (best == truth).float().mean()), 1)

    has_gt = (cands == truth[:, None]).any(1)
    has_twin = (cands == twin[:, None]).any(1)
    both = has_gt & has_twin
    gt_pos = (cands == truth[:, None]).float().argmax(1)
    tw_pos = (cands == twin[:, None]).float().argmax(1)
    rows = torch.nonzero(both).squeeze(1)

    def pick(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x[rows, pos[rows]]

    gap_joint = pick(delta, gt_pos) - pick(delta, tw_pos)
    gap_point = pick(delta_point, gt_pos) - pick(delta_point, tw_pos)
    # swap test: exchange the ground truth and the twin slots in the joint pass
    swapped = cands.clone()
    swapped[rows, gt_pos[rows]] = twin[rows]
    swapped[rows, tw_pos[rows]] = truth[rows]
    joint_sw = model.focused_scores(indicators, cls[swapped], tokens[swapped]).delta
    swap_change = pick(joint_sw, tw_pos) - pick(delta, gt_pos)  # Δ of the slot the GT moved to
    return {
        "queries_with_twin_in_topk": int(both.sum()),
        "delta_mean_per_slot": [round(float(x), 4) for x in delta.mean(0)],
        "delta_std_per_slot": [round(float(x), 4) for x in delta.std(0)],
        "r1_broad_topk": r1(broad),
        "r1_joint": r1(broad + delta),
        "r1_pointwise_same_weights": r1(broad + delta_point),
        "pairwise_acc_joint": round(float((gap_joint > 0).float().mean() * 100), 1),
        "pairwise_acc_pointwise": round(float((gap_point > 0).float().mean() * 100), 1),
        "mean_abs_gap_joint": float(gap_joint.abs().mean()),
        "mean_abs_gap_pointwise": float(gap_point.abs().mean()),
        "mean_abs_delta_change_on_gt_twin_swap": float(swap_change.abs().mean()),
        "mass_gt": float(pick(mass, gt_pos).mean()),
        "mass_twin": float(pick(mass, tw_pos).mean()),
        "mass_gt_gt_twin_pct": round(
            float((pick(mass, gt_pos) > pick(mass, tw_pos)).float().mean() * 100), 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--diagnose", action="store_true")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

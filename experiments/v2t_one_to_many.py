"""Video→text focused scoring: pointwise (K = 1 per pass, the model's) vs one-to-many.

Issue 13 §1 asks whether video→text reranking should compare the K candidate texts jointly, as
text→video compares the K candidate videos. In text→video the one-to-many step is one softmax of
each fused indicator over all K·T candidate tokens; the symmetric head reads each candidate's
share of that attention (``K · mass``) beside its attended summary. In video→text the query is a
video, which has no indicators, so the module keeps its roles (the candidate texts' indicators
are the queries, the video's frame tokens the keys/values). The one-to-many variant measured
here makes the K texts compete in the same way: for indicator q and head h, one softmax over the
K texts × T tokens, ``mass_k = Σ_t exp(l_{k,t}) / Σ_{k',t} exp(l_{k',t})``, and the symmetric head
reads ``K · mass_k`` where the pointwise pass reads 1. Each text's fused indicators and summary
are its own either way (a text's indicators attend over the video alone). The listwise head has
no video-side queries to read, so only the symmetric head has a one-to-many variant.

The study trains two tiny models end to end on a ``tb synth`` set with the synthetic preset, one
per variant (the variant also drives ℓ_focus,t), and evaluates both with both scorers:

    PYTHONPATH=. python experiments/v2t_one_to_many.py --data DIR --out OUT --epochs 12

``--variants joint --checkpoint pointwise=DIR`` scores an existing (pointwise-trained) checkpoint
instead of training that arm again; ``--variants`` with no value trains nothing.

It prints JSON: video→text and text→video R@1/R@5, broad → reranked, per (trained, scored) pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tb_reranker.model import TokenBinder, load_checkpoint
from tb_reranker.model.fusion import FocusedScores, _head_logits

log = logging.getLogger("experiments.v2t_one_to_many")


def joint_v2t_scores(
    model: TokenBinder,
    frames_tokens: torch.Tensor,
    video_cls: torch.Tensor,
    cand_indicators: torch.Tensor,
    cand_mask: torch.Tensor | None = None,
    *,
    frames_mask: torch.Tensor | None = None,
) -> FocusedScores:
    """``focused_scores_v2t`` with the K candidate texts competing for the video (symmetric
    head): the same passes, plus the last block's joint mass over the K texts as head input."""
    fusion = model.fusion
    if fusion.head_type != "symmetric":
        raise ValueError("the one-to-many video→text variant needs the symmetric head")
    device = model.device
    frames_tokens, video_cls = frames_tokens.to(device).float(), video_cls.to(device).float()
    cand_indicators = F.normalize(cand_indicators.to(device).float(), dim=-1)
    batch_size, num_candidates, num_indicators, width = cand_indicators.shape
    pairs = batch_size * num_candidates
    kv = fusion.project_candidates(frames_tokens, frames_mask)  # [B, n, 2, T', D]
    pair_kv = (
        kv.unsqueeze(1).expand(-1, num_candidates, *kv.shape[1:]).reshape(pairs, 1, *kv.shape[1:])
    )
    tokens_mask = None
    if frames_mask is not None:
        tokens_mask = fusion.tokens_mask(frames_mask.to(device))
        tokens_mask = tokens_mask.unsqueeze(1).expand(-1, num_candidates, -1).reshape(pairs, 1, -1)
    queries = model._fusion_queries(cand_indicators.reshape(pairs, num_indicators, width))
    gumbel_scale = fusion.gumbel_scale if fusion.training else 0.0
    for index, block in enumerate(fusion.blocks):
        keys, values = pair_kv[:, :, index, 0], pair_kv[:, :, index, 1]  # [B*K, 1, T', D]
        if index == fusion.num_blocks - 1:  # each text's total attention logit on the video
            logits = _head_logits(block._head_queries(queries), keys[:, 0], False)  # [BK,H,Q,T']
            logits = logits / math.sqrt(block.head_dim) / fusion.gumbel_tau
            if tokens_mask is not None:
                logits = logits.masked_fill(~tokens_mask[:, :, None, :], float("-inf"))
            strength = torch.logsumexp(logits, dim=-1)  # [B*K, H, Q]
        queries, _, _, summary = block(
            queries,
            keys,
            values,
            None,
            tau=fusion.gumbel_tau,
            gumbel_scale=gumbel_scale,
            tokens_mask=tokens_mask,
        )
    strength = strength.view(batch_size, num_candidates, *strength.shape[1:])  # [B, K, H, Q]
    if cand_mask is not None:
        cand_mask = cand_mask.to(device)
        strength = strength.masked_fill(~cand_mask[:, :, None, None], float("-inf"))
        real = cand_mask.sum(dim=1).float().view(batch_size, 1, 1, 1)
    else:
        real = torch.full((batch_size, 1, 1, 1), float(num_candidates), device=device)
    mass = torch.softmax(strength, dim=1) * real  # [B, K, H, Q]: K·share, 1 when uniform
    mass = mass.reshape(pairs, *mass.shape[2:]).unsqueeze(-1)  # [B*K, H, Q, 1]
    delta = fusion._symmetric_delta(queries, mass, summary, None).view(batch_size, num_candidates)
    broad = torch.einsum(
        "bkd,bd->bk", F.normalize(cand_indicators[:, :, 0], dim=-1), F.normalize(video_cls, dim=-1)
    )
    if cand_mask is not None:
        delta = delta.masked_fill(~cand_mask, 0.0)
        broad = broad.masked_fill(~cand_mask, float("-inf"))
    attention = torch.zeros(batch_size, num_candidates, model.num_frames, device=device)
    return FocusedScores(broad=broad, delta=delta, final=broad + delta, frame_attention=attention)


@contextmanager
def scorer(variant: str):
    """``TokenBinder.focused_scores_v2t`` is the ``variant``'s inside the block."""
    original = TokenBinder.focused_scores_v2t
    if variant == "joint":
        TokenBinder.focused_scores_v2t = joint_v2t_scores  # type: ignore[method-assign]
    try:
        yield
    finally:
        TokenBinder.focused_scores_v2t = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    from tb_reranker.training import TrainConfig, evaluate, train
    from tb_reranker.training.features import load_video_captions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a tb synth folder (train and test)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, result)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=["pointwise", "joint"])
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="score an existing checkpoint too (no training), e.g. pointwise=runs/epoch-12",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    base = TrainConfig(
        data_root=args.data,
        out_dir="",
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
        cache_dir=str(out / "cache"),
        workers=2,
        progress=False,
        gumbel_scale=0.0,
    )
    test = load_video_captions("generic", args.data, "test")
    rows: dict[str, Any] = {}
    runs = [tuple(spec.split("=", 1)) for spec in args.checkpoint] + [
        (trained, None) for trained in args.variants
    ]
    for trained, given in runs:
        started = time.monotonic()
        if given is None:
            with scorer(trained):
                checkpoint = train(replace(base, out_dir=str(out / trained)))
        else:
            checkpoint = Path(given)
        seconds = round(time.monotonic() - started, 1)
        model = load_checkpoint(checkpoint)
        for scored in ("pointwise", "joint"):
            with scorer(scored):
                result = evaluate(model, test, cache_dir=out / "cache", progress=False)
            rows[f"trained {trained}, scored {scored}"] = {
                d: {v: [result[d][v]["R@1"], result[d][v]["R@5"]] for v in ("broad", "reranked")}
                for d in ("t2v", "v2t")
            } | {"train_s": seconds}
            log.info("%s / %s: %s", trained, scored, rows[f"trained {trained}, scored {scored}"])
    text = json.dumps(rows, indent=1)
    (out / "result.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

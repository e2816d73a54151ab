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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tb_reranker.model import FocusedScores, TokenBinder, load_checkpoint

log = logging.getLogger("experiments.v2t_one_to_many")


class JointV2TBinder(TokenBinder):
    """A TokenBinder whose video→text focused view lets the K candidate texts compete for the
    video (symmetric head): the same passes as ``focused_scores_v2t``, plus the last block's
    joint mass over the K texts as the head's input. Built on the public fusion API only."""

    def focused_scores_v2t(
        self,
        frames_tokens: torch.Tensor,
        video_cls: torch.Tensor,
        cand_indicators: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        *,
        frames_mask: torch.Tensor | None = None,
    ) -> FocusedScores:
        fusion = self.fusion
        if fusion.head_type != "symmetric":
            raise ValueError("the one-to-many video→text variant needs the symmetric head")
        device = self.device
        frames_tokens, video_cls = frames_tokens.to(device).float(), video_cls.to(device).float()
        cand_indicators = F.normalize(cand_indicators.to(device).float(), dim=-1)
        batch_size, num_candidates, num_indicators, width = cand_indicators.shape
        pairs = batch_size * num_candidates
        kv = fusion.project_candidates(frames_tokens, frames_mask)  # [B, n, 2, T', D]
        pair_kv = kv.unsqueeze(1).expand(-1, num_candidates, *kv.shape[1:])
        pair_kv = pair_kv.reshape(pairs, 1, *kv.shape[1:])  # each (video, text) pair: K = 1
        pair_frames_mask = None
        if frames_mask is not None:
            pair_frames_mask = frames_mask.to(device).unsqueeze(1).expand(-1, num_candidates, -1)
            pair_frames_mask = pair_frames_mask.reshape(pairs, 1, -1)
        queries = self.fusion_queries(cand_indicators.reshape(pairs, num_indicators, width))
        fused = fusion.attend(queries, pair_kv, None, frames_mask=pair_frames_mask)
        # each text's total attention logit on the video: [B*K, H, Q, 1, T'] -> [B, K, H, Q]
        strength = torch.logsumexp(fused.logits, dim=-1).squeeze(-1)
        strength = strength.view(batch_size, num_candidates, *strength.shape[1:])
        if cand_mask is not None:
            cand_mask = cand_mask.to(device)
            strength = strength.masked_fill(~cand_mask[:, :, None, None], float("-inf"))
            real = cand_mask.sum(dim=1).float().view(batch_size, 1, 1, 1)
        else:
            real = torch.full((batch_size, 1, 1, 1), float(num_candidates), device=device)
        mass = torch.softmax(strength, dim=1) * real  # [B, K, H, Q]: K·share, 1 when uniform
        mass = mass.reshape(pairs, *mass.shape[2:]).unsqueeze(-1)  # [B*K, H, Q, 1]
        delta = fusion.delta(fused.queries, mass, fused.summary).view(batch_size, num_candidates)
        broad = torch.einsum(
            "bkd,bd->bk",
            F.normalize(cand_indicators[:, :, 0], dim=-1),
            F.normalize(video_cls, dim=-1),
        )
        if cand_mask is not None:
            delta = delta.masked_fill(~cand_mask, 0.0)
            broad = broad.masked_fill(~cand_mask, float("-inf"))
        attention = torch.zeros(batch_size, num_candidates, self.num_frames, device=device)
        return FocusedScores(
            broad=broad, delta=delta, final=broad + delta, frame_attention=attention
        )


VARIANTS: dict[str, type[TokenBinder]] = {"pointwise": TokenBinder, "joint": JointV2TBinder}


def as_variant(model: TokenBinder, variant: str) -> TokenBinder:
    """The same weights as ``model``, scored by ``variant``'s class."""
    scored = VARIANTS[variant](model.config, load_pretrained=False)
    scored.load_state_dict(model.state_dict())
    return scored.eval()


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
            checkpoint = train(
                replace(base, out_dir=str(out / trained)), model_class=VARIANTS[trained]
            )
        else:
            checkpoint = Path(given)
        seconds = round(time.monotonic() - started, 1)
        model = load_checkpoint(checkpoint)
        for scored in ("pointwise", "joint"):
            result = evaluate(
                as_variant(model, scored), test, cache_dir=out / "cache", progress=False
            )
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

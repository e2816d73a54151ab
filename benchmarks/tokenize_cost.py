"""Tokenizing cost against word length, and the device time one Encode call can take.

    .venv/bin/python -m benchmarks.tokenize_cost [--quick] [--threads 2] [--out DIR]

ViT-B/32's tokenizer (open_clip's ``SimpleTokenizer``, context 77, m = 4 indicators: 73 text
positions). For words of random letters (nothing cached: every word is new) it times, per word:

* ``open_clip``: open_clip's own ``tokenizer([word])`` (BPE over the whole word, about n²);
* ``ours``: ``tb_reranker.model.tokens.tokenize`` (the word cut at (73 - 1) x 32 = 2,304
  characters, BPE from a heap of pairs, identical pieces).

Then one Encode call at the sidecar's limits (``max_texts`` = 256 texts of ``max_text_chars`` =
2,048 random letters) through a TokenBinder with ViT-B/32's text tower (random weights): the
tokenizer's time for the whole call (open_clip's estimated from the per-word median, ours
measured), and the model's time for one device chunk (``ENCODE_CHUNK_TEXTS`` texts) and for
the whole call in one piece: how long a concurrent Rerank could wait behind it, chunked or not.
Prints JSON, writes ``tokenize_cost.json``. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import logging
import random
import string
import time
from typing import Any

from benchmarks.common import (
    add_common_arguments,
    configure_threads,
    emit,
    environment,
    summarize,
)

__all__ = ["main", "random_word", "WORD_LENGTHS"]

log = logging.getLogger(__name__)

WORD_LENGTHS = (16, 64, 256, 512, 1024, 2048, 2304)
CONTEXT = 73  # ViT-B/32's 77 positions less m = 4 indicators
MAX_TEXTS, MAX_TEXT_CHARS = 256, 2048  # the sidecar's defaults


def random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(length))


def _per_word_ms(tokenize: Any, rng: random.Random, length: int, repeats: int) -> dict[str, Any]:
    """Median and spread of tokenizing one new random word of ``length`` letters."""
    samples = []
    for _ in range(repeats):
        word = random_word(rng, length)  # new every time: no cache hit
        started = time.perf_counter_ns()
        tokenize([word])
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return summarize(samples).to_dict()


def measure_words(lengths: tuple[int, ...], repeats: int, seed: int) -> list[dict[str, Any]]:
    import open_clip

    from tb_reranker.model.tokens import tokenize

    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = open_clip.get_tokenizer("ViT-B-32")
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        clip_ms = _per_word_ms(lambda t: reference(t, context_length=CONTEXT), rng, length, repeats)
        ours_ms = _per_word_ms(lambda t: tokenize(ours, t, CONTEXT), rng, length, repeats)
        rows.append(
            {
                "word_chars": length,
                "open_clip": clip_ms,
                "ours": ours_ms,
                "speedup_p50": round(clip_ms["median_ms"] / ours_ms["median_ms"], 1),
            }
        )
        log.info(
            "%d letters: open_clip %.2f ms, ours %.2f ms",
            length,
            clip_ms["median_ms"],
            ours_ms["median_ms"],
        )
    return rows


def measure_call(texts_count: int, chunk: int, seed: int, whole: bool) -> dict[str, Any]:
    """One Encode call of ``texts_count`` texts of 2,048 random letters: tokenizer time, model
    time of one chunk, and (``whole``) of all texts in one device call."""
    import torch

    from benchmarks.text_encode import build_text_model

    model = build_text_model("cpu").prepare_for_inference()
    rng = random.Random(seed)
    texts = [random_word(rng, MAX_TEXT_CHARS) for _ in range(texts_count)]
    model.tokenize(["warm up"])  # builds the tokenizer (reads the BPE merges)
    started = time.perf_counter_ns()
    model.tokenize(texts)
    tokenize_ms = (time.perf_counter_ns() - started) / 1e6
    result: dict[str, Any] = {"texts": texts_count, "text_chars": MAX_TEXT_CHARS}
    result["tokenize_all_ms"] = round(tokenize_ms, 1)
    with torch.inference_mode():
        model.encode_text(texts[:chunk])  # warm-up, same shapes
        started = time.perf_counter_ns()
        model.encode_text(texts[:chunk])
        result["encode_one_chunk_ms"] = round((time.perf_counter_ns() - started) / 1e6, 1)
        if whole:
            started = time.perf_counter_ns()
            model.encode_text(texts)
            result["encode_whole_call_ms"] = round((time.perf_counter_ns() - started) / 1e6, 1)
    result["chunk_texts"] = chunk
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tb_reranker.server.engine import ENCODE_CHUNK_TEXTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="words timed per length")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads(args.threads)
    started = time.perf_counter()
    lengths = (16, 256, 2048) if args.quick else WORD_LENGTHS
    words = measure_words(lengths, 2 if args.quick else args.repeats, args.seed)
    texts = 8 if args.quick else MAX_TEXTS
    call = measure_call(texts, min(ENCODE_CHUNK_TEXTS, texts), args.seed, whole=not args.quick)
    longest = next(row for row in words if row["word_chars"] == MAX_TEXT_CHARS)
    call["tokenize_all_open_clip_estimated_ms"] = round(
        longest["open_clip"]["median_ms"] * texts, 1
    )
    result = {
        "benchmark": "tokenize_cost",
        "quick": args.quick,
        "tokenizer": "open_clip ViT-B-32 SimpleTokenizer, context 73 (77 - m 4)",
        "environment": environment(),
        "words": words,
        "encode_call": call,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    emit("tokenize_cost", result, args.out)
    return result


if __name__ == "__main__":
    main()

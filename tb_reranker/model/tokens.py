"""Tokenising query texts with a bound on the work: only what the text tower reads is BPE-encoded.

open_clip's ``SimpleTokenizer`` runs byte-pair encoding over every word of a text, then keeps
the first ``context_length`` tokens. BPE of one word costs about the square of its length (a
2,048-letter word: ≈ 0.25 s), so a long text cost seconds for tokens that were thrown away.
:func:`tokenize` gives the same rows while encoding only:

* the words up to the ``context_length - 1``-th body token (BPE is per word: the later words
  cannot change the row, only whether it is cut, which that many tokens already decide);
* of each word, its first ``(context_length - 1) × L`` characters, ``L`` the longest vocabulary
  token. A longer word has more body tokens than fit whole or cut, so the row is cut either way.

A text whose tokens fit the context therefore gives the identical row (its words are all
shorter and all read); a text that does not fit may differ only in how BPE splits a single
overlong word. Other tokenizers (Hugging Face ones) are called as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["tokenize"]

_PARTS = ("bpe", "pat", "clean_fn", "byte_encoder", "encoder", "sot_token_id", "eot_token_id")


def _is_simple(tokenizer: Any) -> bool:
    """open_clip's BPE tokenizer with plain truncation (the parts :func:`_row` uses)."""
    return all(hasattr(tokenizer, part) for part in _PARTS) and (
        getattr(tokenizer, "reduction_fn", None) is None
    )


def _longest_token(tokenizer: Any) -> int:
    """Characters of the longest vocabulary token (``</w>`` marks a word end, not text)."""
    cached = getattr(tokenizer, "_tb_longest_token", None)
    if cached is None:
        special = set(getattr(tokenizer, "all_special_ids", ()))
        cached = max(
            len(piece.removesuffix("</w>"))
            for piece, index in tokenizer.encoder.items()
            if index not in special
        )
        tokenizer._tb_longest_token = cached
    return int(cached)


def _body(tokenizer: Any, text: str, needed: int, word_chars: int) -> list[int]:
    """The first BPE tokens of ``text``: at least ``needed`` of them when it has that many."""
    import regex  # open_clip's own dependency (its word pattern needs \\p{L})

    tokens: list[int] = []
    for match in regex.finditer(tokenizer.pat, tokenizer.clean_fn(text)):
        word = match.group()[:word_chars]
        word = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
        tokens.extend(tokenizer.encoder[piece] for piece in tokenizer.bpe(word).split(" "))
        if len(tokens) >= needed:
            break
    return tokens


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """``tokenizer(texts, context_length=context_length)``, computed on the part of each text
    that decides its row (see the module docstring): ``[B, context_length]`` int64."""
    if not _is_simple(tokenizer):
        return tokenizer(list(texts), context_length=context_length).long()
    needed = context_length - 1  # body tokens that decide the row: [SOT] body[:L-2] [EOT]
    word_chars = needed * _longest_token(tokenizer)
    rows = torch.zeros(len(texts), context_length, dtype=torch.long)
    for n, text in enumerate(texts):
        tokens = [
            tokenizer.sot_token_id,
            *_body(tokenizer, text, needed, word_chars),
            tokenizer.eot_token_id,
        ]
        if len(tokens) > context_length:  # open_clip's truncation: cut, EOT last
            tokens = tokens[:context_length]
            tokens[-1] = tokenizer.eot_token_id
        rows[n, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return rows

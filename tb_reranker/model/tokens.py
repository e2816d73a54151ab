"""Tokenising query texts with a bound on the work and on the memory it keeps.

open_clip's ``SimpleTokenizer`` runs byte-pair encoding over every word of a text, then keeps
the first ``context_length`` tokens. Its BPE loop costs about the square of a word's length (a
2,048-letter word: 0.4 s on this machine, ``benchmarks/tokenize_cost.py``), and it remembers
every word it ever encoded in a dict that never forgets (a stream of random words grows it
without limit). :func:`tokenize` gives the same rows while:

* encoding only the words up to the ``context_length - 1``-th body token (BPE is per word: the
  later words cannot change the row, only whether it is cut, which that many tokens already
  decide), and of each word its first ``(context_length - 1) × L`` characters, ``L`` the
  longest vocabulary token (a longer word has more body tokens than fit, so the row is cut
  either way);
* running the same merges as open_clip's ``bpe`` (lowest-ranked pair first, all of its
  occurrences left to right, then the next) from a heap of the word's adjacent pairs: about
  ``n log n`` steps for ``n`` characters instead of ``n²`` (a 2,048-letter word in milliseconds);
* keeping its own cache of encoded words, least recently used first out, at most
  :data:`BPE_CACHE_WORDS` words of at most :data:`BPE_CACHE_WORD_CHARS` characters (a few MB at
  most). open_clip's own ``cache`` is neither read nor written: other users of the tokenizer see
  it behave as before.

A text whose tokens fit the context therefore gives the identical row (its words are all
shorter and all read); a text that does not fit may differ only in how BPE splits a single
overlong word. Other tokenizers (Hugging Face ones) are called as they are.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["tokenize", "bpe", "bpe_cache", "BpeCache", "BPE_CACHE_WORDS", "BPE_CACHE_WORD_CHARS"]

BPE_CACHE_WORDS = 10_000  # encoded words remembered per tokenizer (least recently used out)
BPE_CACHE_WORD_CHARS = 64  # longer words are encoded every time, never remembered

_PARTS = (
    "bpe_ranks",
    "pat",
    "clean_fn",
    "byte_encoder",
    "encoder",
    "all_special_ids",
    "sot_token_id",
    "eot_token_id",
)


def _is_simple(tokenizer: Any) -> bool:
    """open_clip's BPE tokenizer with plain truncation (the parts :func:`tokenize` reads)."""
    return all(hasattr(tokenizer, part) for part in _PARTS) and (
        getattr(tokenizer, "reduction_fn", None) is None
    )


class BpeCache:
    """Encoded words → their token ids, least recently used first out; thread-safe.

    Holds at most ``words`` words, each of at most ``word_chars`` characters (a longer word is
    encoded every time: it is rare, and it would make the bound one of memory no longer)."""

    def __init__(self, words: int = BPE_CACHE_WORDS, word_chars: int = BPE_CACHE_WORD_CHARS):
        self.words = int(words)
        self.word_chars = int(word_chars)
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, word: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._ids.get(word)
            if ids is not None:
                self._ids.move_to_end(word)
            return ids

    def put(self, word: str, ids: tuple[int, ...]) -> None:
        if len(word) > self.word_chars:
            return
        with self._lock:
            self._ids[word] = ids
            self._ids.move_to_end(word)
            while len(self._ids) > max(self.words, 0):
                self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, word: object) -> bool:
        return word in self._ids


class _Vocabulary:
    """What :func:`tokenize` reads from one open_clip tokenizer, computed on first use."""

    def __init__(self, tokenizer: Any) -> None:
        special = set(tokenizer.all_special_ids)
        encoder = tokenizer.encoder
        self.specials = {piece: (index,) for piece, index in encoder.items() if index in special}
        self.longest = max(
            len(piece.removesuffix("</w>"))
            for piece, index in encoder.items()
            if index not in special
        )
        self.cache = BpeCache()


# per tokenizer object, kept outside it: copies and pickles of a tokenizer (a deepcopy of the
# model) carry nothing of ours and start their own on first use
_VOCABULARIES: weakref.WeakKeyDictionary[Any, _Vocabulary] = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def _vocabulary(tokenizer: Any) -> _Vocabulary:
    with _VOCABULARIES_LOCK:
        found = _VOCABULARIES.get(tokenizer)
        if found is None:
            found = _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
        return found


def bpe_cache(tokenizer: Any) -> BpeCache:
    """The cache of encoded words :func:`tokenize` keeps for ``tokenizer`` (an open_clip
    ``SimpleTokenizer``): its size, and its bound to lower."""
    return _vocabulary(tokenizer).cache


def _pair(ranks: Mapping[tuple[str, str], int], pieces: list[str | None], left: int, right: int):
    """The heap entry of the adjacent pieces at ``left`` and ``right`` (None: no merge)."""
    rank = ranks.get((pieces[left], pieces[right]))  # type: ignore[arg-type]
    return None if rank is None else (rank, left, pieces[left], pieces[right])


def bpe(ranks: Mapping[tuple[str, str], int], word: str) -> list[str]:
    """open_clip's ``SimpleTokenizer.bpe(word).split(" ")`` for a non-empty byte-encoded word.

    open_clip repeats: take the lowest-ranked adjacent pair, merge every occurrence of it left
    to right (an occurrence overlapping one just merged is skipped), until no pair has a rank.
    Here the pairs sit in a heap keyed by (rank, position): all entries of the lowest rank are
    applied in position order, each only if its two pieces are still adjacent and unchanged, and
    a merge pushes the two pairs it forms. A pair formed by a merge never has that merge's own
    rank (its pieces are longer than the merged ones), so each round applies exactly the
    occurrences open_clip's pass does.
    """
    pieces: list[str | None] = [*word[:-1], word[-1] + "</w>"]
    after = [*range(1, len(pieces)), -1]
    before = list(range(-1, len(pieces) - 1))
    heap = [e for i in range(len(pieces) - 1) if (e := _pair(ranks, pieces, i, i + 1))]
    heapq.heapify(heap)
    while heap:
        rank = heap[0][0]
        round_ = []
        while heap and heap[0][0] == rank:
            round_.append(heapq.heappop(heap))
        for _, left, first, second in round_:  # in position order
            right = after[left]
            if pieces[left] != first or right < 0 or pieces[right] != second:
                continue  # merged away or overlapping an occurrence merged in this round
            pieces[left], pieces[right] = first + second, None
            after[left] = after[right]
            if after[left] >= 0:
                before[after[left]] = left
            for a, b in ((before[left], left), (left, after[left])):
                if a >= 0 and b >= 0 and (entry := _pair(ranks, pieces, a, b)):
                    heapq.heappush(heap, entry)
    return [piece for piece in pieces if piece is not None]


def _word_ids(tokenizer: Any, vocabulary: _Vocabulary, word: str) -> tuple[int, ...]:
    """Token ids of one byte-encoded word (a special token stays whole, as in open_clip)."""
    special = vocabulary.specials.get(word)
    if special is not None:
        return special
    ids = vocabulary.cache.get(word)
    if ids is None:
        encoder = tokenizer.encoder
        ids = tuple(encoder[piece] for piece in bpe(tokenizer.bpe_ranks, word))
        vocabulary.cache.put(word, ids)
    return ids


def _body(tokenizer: Any, text: str, needed: int, vocabulary: _Vocabulary) -> list[int]:
    """The first BPE tokens of ``text``: at least ``needed`` of them when it has that many."""
    import regex  # open_clip's own dependency (its word pattern needs \\p{L})

    word_chars = needed * vocabulary.longest
    byte_encoder = tokenizer.byte_encoder
    tokens: list[int] = []
    for match in regex.finditer(tokenizer.pat, tokenizer.clean_fn(text)):
        word = match.group()[:word_chars]
        word = "".join(byte_encoder[b] for b in word.encode("utf-8"))
        tokens.extend(_word_ids(tokenizer, vocabulary, word))
        if len(tokens) >= needed:
            break
    return tokens


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """``tokenizer(texts, context_length=context_length)``, computed on the part of each text
    that decides its row (see the module docstring): ``[B, context_length]`` int64."""
    if not _is_simple(tokenizer):
        return tokenizer(list(texts), context_length=context_length).long()
    vocabulary = _vocabulary(tokenizer)
    needed = context_length - 1  # body tokens that decide the row: [SOT] body[:L-2] [EOT]
    rows = torch.zeros(len(texts), context_length, dtype=torch.long)
    for n, text in enumerate(texts):
        tokens = [
            tokenizer.sot_token_id,
            *_body(tokenizer, text, needed, vocabulary),
            tokenizer.eot_token_id,
        ]
        if len(tokens) > context_length:  # open_clip's truncation: cut, EOT last
            tokens = tokens[:context_length]
            tokens[-1] = tokenizer.eot_token_id
        rows[n, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return rows

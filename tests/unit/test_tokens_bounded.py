"""Tokenising reads only what the text tower reads (issue 20): the rows equal open_clip's for
every text whose tokens fit the context, and the work per text is bounded."""

from __future__ import annotations

import random
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import SimpleTokenizer

from tb_reranker.model import TokenBinder, TokenBinderConfig, tokens
from tb_reranker.model.tokens import BPE_CACHE_WORDS, BpeCache, bpe, bpe_cache, tokenize

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = st.sampled_from(["a", "red", "square", "then", "blue", "circle", "dog's", "x"])
PIECES = st.one_of(
    WORDS,
    st.text(string.ascii_letters, min_size=1, max_size=40),
    st.text(string.digits + string.punctuation, min_size=1, max_size=6),
    st.sampled_from(["&amp;", "&lt;", "\u00a0", "\ufb01", "İ", "é", "日本", "🙂", "<end_of_text>"]),
    st.text(min_size=1, max_size=8),  # any unicode
)
SEPARATORS = st.sampled_from([" ", "  ", "\n", "\t", "", " \u3000 "])


@pytest.fixture(scope="module")
def tokenizers():
    return {length: SimpleTokenizer(context_length=length) for length in (8, 16, 73)}


@st.composite
def texts(draw):
    pieces = draw(st.lists(PIECES, min_size=1, max_size=90))
    return "".join(piece + draw(SEPARATORS) for piece in pieces)


@SETTINGS
@given(text=texts(), length=st.sampled_from([8, 16, 73]))
def test_rows_equal_open_clip_for_texts_that_fit(tokenizers, text, length):
    tokenizer = tokenizers[length]
    expected = tokenizer([text], context_length=length)
    got = tokenize(tokenizer, [text], length)
    if len(tokenizer.encode(text)) <= length - 2:  # fits: identical, always
        assert torch.equal(got, expected)
    else:  # cut either way: same length, SOT first, EOT last
        assert got.shape == expected.shape
        assert got[0, 0] == tokenizer.sot_token_id and got[0, -1] == tokenizer.eot_token_id


@SETTINGS
@given(words=st.lists(st.text(string.ascii_lowercase, min_size=1, max_size=12), min_size=1))
def test_many_short_words_give_open_clips_row_fitting_or_not(tokenizers, words):
    """Cutting at a word (BPE is per word) is exact even for texts that overflow."""
    tokenizer = tokenizers[16]
    text = " ".join(words)
    assert torch.equal(tokenize(tokenizer, [text], 16), tokenizer([text], context_length=16))


class _BpeRecorder:
    """Records the words ``tokenize`` BPE-encodes (the costly step)."""

    def __init__(self, monkeypatch) -> None:
        self.words: list[str] = []
        self._bpe = tokens.bpe
        monkeypatch.setattr(tokens, "bpe", self)

    def __call__(self, ranks, word: str) -> list[str]:
        self.words.append(word)
        return self._bpe(ranks, word)


def test_bpe_reads_a_bounded_part_of_any_text(monkeypatch):
    """Before: BPE ran over every word of the text: all 2,048 letters of a random word (about
    0.25 s each), every word of a long sentence. Now at most context - 1 words, each cut to
    (context - 1) x the longest vocabulary token."""
    tokenizer = SimpleTokenizer(context_length=16)
    recorder = _BpeRecorder(monkeypatch)
    rng = random.Random(9)
    word = "".join(rng.choice(string.ascii_letters) for _ in range(2048))
    sentence = " ".join(["dog"] * 1000)
    rows = tokenize(tokenizer, [word, sentence], 16)
    assert max(len(w) for w in recorder.words) <= 15 * 32
    assert len(recorder.words) <= 1 + 15
    assert bool((rows[:, -1] == tokenizer.eot_token_id).all())


def test_the_model_tokenizes_through_it(monkeypatch):
    model = TokenBinder(TokenBinderConfig.tiny())
    text = "a red square then a blue circle"
    reference = SimpleTokenizer(context_length=model.context_length)
    expected = reference([text], context_length=model.context_length)
    assert torch.equal(model.tokenize([text]), expected)
    recorder = _BpeRecorder(monkeypatch)
    model.tokenize(["x" * 5000 + " then more words " * 100])
    assert max(len(w) for w in recorder.words) < 5000 and len(recorder.words) < 20


# ---------------------------------------------------------------------- BPE: exact, bounded
_REFERENCE = SimpleTokenizer()  # open_clip's own, for the expected results
_SPECIALS = dict(_REFERENCE.cache)  # what open_clip seeds its cache with


def _uncached_reference_bpe(word: str) -> list[str]:
    """open_clip's merge loop itself, not a result it remembered."""
    _REFERENCE.cache = dict(_SPECIALS)
    return _REFERENCE.bpe(word).split(" ")


ALPHABETS = [
    string.ascii_lowercase,
    "ab",
    "aeiou",
    "abcdefghij",
    "éèàüßçø日本語한국어",
    "".join(_REFERENCE.byte_encoder.values()),  # every byte, as BPE sees it
]


@st.composite
def bpe_words(draw):
    """Byte-encoded words as the tokenizer hands them to BPE: small alphabets repeat pairs
    (many merges of one rank in one word, overlapping ones: "aaa"), the byte alphabet is any
    UTF-8 text."""
    alphabet = draw(st.sampled_from(ALPHABETS))
    word = draw(st.text(alphabet, min_size=1, max_size=60))
    return "".join(_REFERENCE.byte_encoder[b] for b in word.encode("utf-8"))


@SETTINGS
@given(word=bpe_words())
def test_bpe_equals_open_clips_merge_loop(word):
    assert bpe(_REFERENCE.bpe_ranks, word) == _uncached_reference_bpe(word)


def test_bpe_equals_open_clip_on_every_vocabulary_piece():
    """Each piece of the vocabulary as a word (the words BPE merges furthest)."""
    ranks = _REFERENCE.bpe_ranks
    for piece in _REFERENCE.encoder:
        word = piece.removesuffix("</w>")
        if word and not word.startswith("<"):
            assert bpe(ranks, word) == _uncached_reference_bpe(word), word


def test_bpe_of_a_long_word_equals_open_clip():
    rng = random.Random(3)
    for length in (100, 700, 2304):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        assert bpe(_REFERENCE.bpe_ranks, word) == _uncached_reference_bpe(word)


def _random_texts(rng: random.Random, count: int, words: int = 60) -> list[str]:
    return [
        " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 12)))
            for _ in range(words)
        )
        for _ in range(count)
    ]


def test_a_stream_of_random_words_keeps_memory_bounded():
    """Before: open_clip's tokenizer kept every word it encoded (its ``cache`` dict never
    forgets), so a stream of distinct random words grew the server without limit. Now neither
    open_clip's dict nor ours holds more than the bound, and the rows are open_clip's."""
    tokenizer = SimpleTokenizer(context_length=77)
    reference = SimpleTokenizer(context_length=77)
    rng = random.Random(11)
    texts = _random_texts(rng, count=1000, words=30)  # about 18,000 distinct words are read
    for start in range(0, len(texts), 20):
        chunk = texts[start : start + 20]
        rows = tokenize(tokenizer, chunk, 77)
        assert torch.equal(rows, reference(chunk, context_length=77))
    assert len(tokenizer.cache) <= BPE_CACHE_WORDS  # open_clip's: what grew before
    assert len(tokenizer.cache) == 2  # untouched: the special tokens it is seeded with
    assert 0 < len(bpe_cache(tokenizer)) <= BPE_CACHE_WORDS


@settings(max_examples=25, deadline=None)
@given(bound=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_any_cache_bound_gives_open_clips_rows(bound, seed):
    """A small bound evicts all the time (least recently used first); rows never change, and
    the special tokens are always whole."""
    tokenizer = SimpleTokenizer(context_length=32)
    bpe_cache(tokenizer).words = bound
    rng = random.Random(seed)
    vocabulary = ["red", "dog", "then", "a", "blue", "<end_of_text>", "<start_of_text>"]
    texts = [
        " ".join(
            rng.choice(vocabulary + [rng.choice(string.ascii_lowercase) * 3]) for _ in range(9)
        )
        for _ in range(30)
    ]
    for text in texts:
        assert torch.equal(tokenize(tokenizer, [text], 32), _REFERENCE([text], context_length=32))
    assert len(bpe_cache(tokenizer)) <= bound


def test_cache_is_least_recently_used_first_out():
    cache = BpeCache(words=2, word_chars=8)
    cache.put("a", (1,))
    cache.put("b", (2,))
    assert cache.get("a") == (1,)  # a is now the most recent
    cache.put("c", (3,))
    assert "b" not in cache and cache.get("a") == (1,) and cache.get("c") == (3,)
    cache.put("x" * 9, (4,))  # longer than word_chars: never kept
    assert "x" * 9 not in cache and len(cache) == 2


def test_threads_sharing_a_tokenizer_get_open_clips_rows():
    """The device thread and a client's threads may tokenize at once with one tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = SimpleTokenizer(context_length=40)
    bpe_cache(tokenizer).words = 16  # eviction all the time
    texts = _random_texts(random.Random(4), count=64, words=12)
    expected = _REFERENCE(texts, context_length=40)
    with ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(lambda text: tokenize(tokenizer, [text], 40)[0], texts))
    assert torch.equal(torch.stack(rows), expected)


def test_copies_of_a_model_do_not_share_or_carry_the_cache():
    import copy

    model = TokenBinder(TokenBinderConfig.tiny())
    model.tokenize(["a red square"])
    twin = copy.deepcopy(model)  # a tokenizer holding a lock could not be copied
    assert torch.equal(twin.tokenize(["a red square"]), model.tokenize(["a red square"]))
    assert bpe_cache(twin._tokenizer) is not bpe_cache(model._tokenizer)

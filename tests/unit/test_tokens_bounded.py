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

from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.model.tokens import tokenize

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
    """Records the words a tokenizer's BPE is asked to encode (the costly step)."""

    def __init__(self, tokenizer) -> None:
        self.words: list[str] = []
        self._bpe = tokenizer.bpe
        tokenizer.bpe = self

    def __call__(self, word: str) -> str:
        self.words.append(word)
        return self._bpe(word)


def test_bpe_reads_a_bounded_part_of_any_text():
    """Before: BPE ran over every word of the text: all 2,048 letters of a random word (about
    0.25 s each), every word of a long sentence. Now at most context - 1 words, each cut to
    (context - 1) x the longest vocabulary token."""
    tokenizer = SimpleTokenizer(context_length=16)
    recorder = _BpeRecorder(tokenizer)
    rng = random.Random(9)
    word = "".join(rng.choice(string.ascii_letters) for _ in range(2048))
    sentence = " ".join(["dog"] * 1000)
    rows = tokenize(tokenizer, [word, sentence], 16)
    assert max(len(w) for w in recorder.words) <= 15 * 32
    assert len(recorder.words) <= 1 + 15
    assert bool((rows[:, -1] == tokenizer.eot_token_id).all())


def test_the_model_tokenizes_through_it():
    model = TokenBinder(TokenBinderConfig.tiny())
    text = "a red square then a blue circle"
    reference = SimpleTokenizer(context_length=model.context_length)
    expected = reference([text], context_length=model.context_length)
    assert torch.equal(model.tokenize([text]), expected)
    recorder = _BpeRecorder(model._tokenizer)
    model.tokenize(["x" * 5000 + " then more words " * 100])
    assert max(len(w) for w in recorder.words) < 5000 and len(recorder.words) < 20

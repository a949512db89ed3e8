"""A long text encoded in pieces (data/text_pieces.py) gets exactly the ids of encoding it whole, for the tokenizer
kinds nanoseek meets: its own byte-level BPE with the chat markers, a DeepSeek/Llama-3-style Split sequence with a
BOS template and stripping added tokens, and GPT-2's with the offset-trimming ByteLevel post-processor."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from helpers import fuzz
from nanoseek.data import text_pieces
from nanoseek.data.chat_format import add_chat_tokens
from nanoseek.data.tokenizer import encode_ids, train_tokenizer

# Llama 3's (cl100k's) split, which DeepSeek's pre-tokenizer follows after its own digit and CJK splits
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+"
)
CORPUS = ["It's the year 2026: héllo, wörld!\n\n  日本語 🙂 lord's men   run\t\tfast 1234567. It'll, we'll\r\n" * 30]
FRAGMENTS = [
    "a",
    "lord",
    " my",
    "It's",
    "'ll",
    "2026",
    "1234567",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\n\n  ",
    "é",
    "日本語",
    "🙂",
    "!",
    "...",
    ",",
    "  x",
    "<|endoftext|>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<mark>",
    "<tie>",
    "\u00a0",
    " " * 20,
    "\n" * 12,
]


def _split_sequence() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
            pre_tokenizers.Split(Regex(SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<bos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer.add_tokens([AddedToken("<mark>", lstrip=True, rstrip=True), AddedToken("lord's", single_word=True)])
    return tokenizer


def _gpt2_trimming() -> Tokenizer:
    tokenizer = train_tokenizer(CORPUS, 350)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.add_tokens([AddedToken("<tie>", lstrip=True), AddedToken("<mark>", rstrip=True)])
    return tokenizer


def _nanoseek_chat() -> Tokenizer:
    tokenizer = train_tokenizer(CORPUS, 350)
    add_chat_tokens(tokenizer)
    return tokenizer


TOKENIZERS = {"split-sequence": _split_sequence(), "gpt2-trimming": _gpt2_trimming(), "nanoseek-chat": _nanoseek_chat()}


@fuzz(
    60,
    600,
    name=st.sampled_from(sorted(TOKENIZERS)),
    piece_chars=st.integers(4, 40),
    margin=st.integers(4, 16),
    parts=st.lists(st.sampled_from(FRAGMENTS), min_size=20, max_size=300),
)
def test_pieces_give_the_whole_texts_ids(name, piece_chars, margin, parts):
    """Small margins, so that whitespace runs reach past a window's end, where only the cut's own guards keep a
    stripping added token from swallowing across it."""
    tokenizer, text = TOKENIZERS[name], "".join(parts)
    expected = tokenizer.encode(text, add_special_tokens=False).ids
    assert text_pieces.encode_in_pieces(tokenizer, text, piece_chars, margin) == expected


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_the_default_margin_covers_the_splits_lookahead(name):
    """GPT-2's split takes "'ll" whole but "'l" as two pre-tokens: a window ending between the l's must not cut."""
    text = "It'll be  there, won't it?\n" * 60
    for piece_chars in range(6, 40):
        assert (
            text_pieces.encode_in_pieces(TOKENIZERS[name], text, piece_chars)
            == TOKENIZERS[name].encode(text, add_special_tokens=False).ids
        )


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_special_tokens_wrap_the_pieces(name):
    tokenizer, text = TOKENIZERS[name], "good morrow, my lord. " * 40
    for special in (False, True):
        assert encode_ids(tokenizer, text, special, 32) == tokenizer.encode(text, add_special_tokens=special).ids


class _Counting:
    """A tokenizer that counts the windows encode_in_pieces encodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.windows = tokenizer, 0

    def encode_batch(self, *args, **kwargs):
        self.windows += 1
        return self.tokenizer.encode_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_a_long_text_is_cut(name):
    """The pieces path really cuts (else the test above would pass on a whole-text encode)."""
    text = "good morrow, my lord. " * 400
    counting = _Counting(TOKENIZERS[name])
    assert text_pieces.splits_locally(TOKENIZERS[name])
    assert (
        text_pieces.encode_in_pieces(counting, text, 256) == TOKENIZERS[name].encode(text, add_special_tokens=False).ids
    )
    assert counting.windows >= len(text) // 256 - 2


def test_one_endless_pre_token_is_encoded_whole():
    text = "x" + " " * 5000 + "y"  # a single whitespace pre-token longer than any window: no clean cut
    tokenizer = TOKENIZERS["nanoseek-chat"]
    assert encode_ids(tokenizer, text, piece_chars=64) == tokenizer.encode(text).ids


def test_tokenizers_that_split_globally_are_encoded_whole():
    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()  # prepends ▁ to each piece it is given
    normalized = _nanoseek_chat()
    normalized.normalizer = normalizers.NFKC()
    dropout = Tokenizer(models.BPE(dropout=0.1))
    dropout.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    prefixed = Tokenizer(models.BPE())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    for tokenizer in (metaspace, normalized, dropout, prefixed):
        assert not text_pieces.splits_locally(tokenizer)

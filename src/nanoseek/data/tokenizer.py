"""Byte-level BPE tokenizer (HF `tokenizers`): trained on the corpus, or loaded from a tokenizer.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanoseek.data import text_pieces
from nanoseek.errors import NanoseekError, first_line

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


# ASCII, punctuation, whitespace runs, accents, CJK and an emoji: what a user's first prompt may hold
PROBE_TEXT = "Hello, world!\n\tthe  year 2026: héllo, 日本語 🙂"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json, checked by encoding and decoding a probe text: a file can parse and still describe a
    pipeline that fails (or makes the Rust library panic) on the first real input."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.decode(tokenizer.encode(PROBE_TEXT).ids)
        return tokenizer
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers' errors are Exceptions; a Rust panic arrives as a BaseException
        raise NanoseekError(f"cannot load tokenizer {path}: {first_line(e)}") from None


def encode_ids(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool = False, piece_chars: int = text_pieces.PIECE_CHARS
) -> list[int]:
    """One text's ids, through the batch call: it releases the GIL while it works (the single-text `encode` holds it
    for seconds on a long text, freezing every other thread) and skips the offsets nobody reads. A long text goes
    through in exact pieces (text_pieces.py), so its peak memory is a piece's, not ~110 bytes per input byte."""
    wrap = None
    if len(text) > 2 * piece_chars and text_pieces.splits_locally(tokenizer):
        wrap = text_pieces.special_wrap(tokenizer) if add_special_tokens else ([], [])
    if wrap is None:
        return tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
    return wrap[0] + text_pieces.encode_in_pieces(tokenizer, text, piece_chars) + wrap[1]


class TextEncoder:
    """Text → ids with the text taken as text: a control token's spelling inside it (a user typing the assistant or
    end-of-sentence marker) is encoded as ordinary characters, never as the token, as transformers'
    `split_special_tokens` does. Only a text that spells one pays for it (a copy of the tokenizer without its added
    tokens, built on first need)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.control_ids = frozenset(added)
        self.controls = sorted((t.content for t in added.values()), key=len, reverse=True)  # longest match first
        self._plain: Tokenizer | None = None

    def __call__(self, text: str) -> list[int]:
        ids = encode_ids(self.tokenizer, text)
        if self.control_ids.isdisjoint(ids):
            return ids
        if self._plain is None:
            spec = json.loads(self.tokenizer.to_str())
            spec["added_tokens"] = []
            self._plain = Tokenizer.from_str(json.dumps(spec))
        return encode_ids(self._plain, text)


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    for token in (END_OF_TEXT, "<｜end▁of▁sentence｜>", "</s>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def end_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every end marker the tokenizer has (a pretrained run's end of text, the chat format's end of sentence):
    generation stops at any of them."""
    ids = (tokenizer.token_to_id(t) for t in (END_OF_TEXT, "<｜end▁of▁sentence｜>", "</s>"))
    return tuple(i for i in ids if i is not None)


def write_tokenizer_files(
    tokenizer: Tokenizer,
    directory: Path,
    bos: str | None = None,
    eos: str | None = None,
    chat_template: str | None = None,
) -> None:
    """tokenizer.json and the tokenizer_config.json that transformers' AutoTokenizer (and so lm-evaluation-harness's
    hf backend) reads: its class, bos/eos/pad tokens (a pretrained run's end of text for all three unless given) and
    the chat template where there is one."""
    end = next(
        (t for t in (END_OF_TEXT, "<｜end▁of▁sentence｜>", "</s>") if tokenizer.token_to_id(t) is not None), None
    )
    eos = eos or end
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos or eos,
        "eos_token": eos,
        "pad_token": eos,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """A model's tokenizer files into another directory (tokenizer_config.json written if the source has none)."""
    if (source / "tokenizer_config.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, out / name)
    elif (source / "tokenizer.json").exists():
        write_tokenizer_files(load_tokenizer(source / "tokenizer.json"), out)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise NanoseekError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{vocab_size}; set vocab_size >= {tokenizer.get_vocab_size()}"
        )


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """How many bytes of text each token id stands for (special tokens: none), so that a loss per token converts to
    bits per byte, a measure no tokenizer change can move. A byte-level token's string holds one character per byte;
    any other token is measured by decoding it alone."""
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    special = set(tokenizer.get_added_tokens_decoder())
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            lengths[token_id] = len(token) if byte_level else len(tokenizer.decode([token_id]).encode())
    return lengths

"""Cutting a long text into pieces that a tokenizer encodes to exactly the whole text's ids.

`tokenizers` keeps about 110 bytes of working state per input byte while it encodes (alignments per byte, a string
per token): a 4 MiB prompt takes some 450 MB at its peak. Encoded a piece at a time, the peak is one piece's worth.
The cuts are exact, not approximate, because each is placed where the tokenizer itself would split anyway:
- at a word (pre-token) boundary of the tokenizer's own encoding of a window, taken well inside it (a regex split
  looks at most a few characters past a match, so boundaries far from the window's end are the whole text's), and
  BPE never merges across word boundaries: the window's tokens before the cut are the piece's tokens;
- away from every added token's spelling, and not inside a whitespace run that an added token's lstrip/rstrip could
  swallow;
- only for a tokenizer whose every stage splits locally: no normalizer, pre-tokenizers from LOCAL_PRE_TOKENIZERS
  (without a prefix space, which would be added to every piece), BPE without dropout or WordLevel, no truncation or
  padding. Any other tokenizer encodes the text whole.
The post-processor's special tokens (a BOS) wrap a single sequence as a fixed prefix and suffix, read off a probe.
"""

from __future__ import annotations

import json

from tokenizers import Encoding, Tokenizer

PIECE_CHARS = 1 << 15  # a piece's target length; texts up to twice this are encoded whole
WINDOW_MARGIN = 256  # characters pre-tokenized past a piece's end, so its boundaries are the whole text's
LOCAL_PRE_TOKENIZERS = frozenset({"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"})
_PROBE = "a b"


def splits_locally(tokenizer: Tokenizer) -> bool:
    """Whether every stage of the tokenizer decides each output token from a bounded neighbourhood of the text."""
    if tokenizer.truncation is not None or tokenizer.padding is not None or tokenizer.pre_tokenizer is None:
        return False
    if tokenizer.normalizer is not None:
        normalizer = json.loads(tokenizer.normalizer.__getstate__())
        if normalizer != {"type": "Sequence", "normalizers": []}:
            return False
    model = type(tokenizer.model).__name__  # not its state: that would serialize the whole vocabulary each call
    if not (model == "WordLevel" or (model == "BPE" and tokenizer.model.dropout is None)):
        return False
    spec = json.loads(tokenizer.pre_tokenizer.__getstate__())
    stages = spec["pretokenizers"] if spec["type"] == "Sequence" else [spec]
    return all(s["type"] in LOCAL_PRE_TOKENIZERS and not s.get("add_prefix_space", False) for s in stages)


def special_wrap(tokenizer: Tokenizer) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a single sequence (None if they cannot be read off)."""
    bare = tokenizer.encode_batch_fast([_PROBE], add_special_tokens=False)[0].ids
    full = tokenizer.encode_batch_fast([_PROBE], add_special_tokens=True)[0].ids
    for start in range(len(full) - len(bare) + 1):
        if bare and full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return None


def _clear_of_added_tokens(text: str, cut: int, added: list[str], reach: int) -> bool:
    """No added token near the cut, nor at either end of a whitespace run the cut touches (a token's strip flags
    swallow whitespace next to it, so the run's whole extent counts)."""
    low, high = cut, cut
    while low > 0 and text[low - 1].isspace():
        low -= 1
    while high < len(text) and text[high].isspace():
        high += 1
    near = text[max(0, low - reach) : high + reach]
    return not any(token in near for token in added)


def _last_clean_cut(
    window: Encoding, text: str, start: int, piece_chars: int, added: list[str], reach: int
) -> int | None:
    """The index of the token after the window's last clean cut in [piece_chars / 2, piece_chars], walking back
    from piece_chars through the per-token accessors (the whole offsets list, made into Python tuples, held the
    GIL long enough to slow the engine's thread)."""
    last = window.char_to_token(piece_chars)
    for i in range(len(window) - 1 if last is None else last, 0, -1):
        before, after = window.token_to_chars(i - 1), window.token_to_chars(i)
        if before is None or after is None:  # an added token: never cut beside one
            continue
        if before[1] < piece_chars // 2:
            return None
        word = window.token_to_word(i)
        if (
            before[1] <= piece_chars
            and before[1] == after[0]
            and word is not None
            and window.token_to_word(i - 1) not in (None, word)
            and _clear_of_added_tokens(text, start + before[1], added, reach)
        ):
            return i
    return None


def encode_in_pieces(
    tokenizer: Tokenizer, text: str, piece_chars: int = PIECE_CHARS, margin: int = WINDOW_MARGIN
) -> list[int]:
    """The text's ids without special tokens, a window at a time: each window is encoded once, its tokens kept up to
    the last word boundary before piece_chars that is a clean cut, and the next window starts there. A boundary is
    taken only where the two tokens' offsets meet exactly (an offset trimmed of its spaces, or a character split
    between tokens, leaves a gap or an overlap), so the cut falls on the very character where the pre-tokenizer
    split. What is left when no cut is found (one pre-token longer than the window) is encoded in one go."""
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    reach = max(map(len, added), default=0) + 1
    ids: list[int] = []
    start = 0
    while len(text) - start > 2 * piece_chars:
        window = tokenizer.encode_batch([text[start : start + piece_chars + margin]], add_special_tokens=False)[0]
        cut = _last_clean_cut(window, text, start, piece_chars, added, reach)
        if cut is None:
            break
        ids += window.ids[:cut]
        start += window.token_to_chars(cut)[0]
    return ids + tokenizer.encode_batch_fast([text[start:]], add_special_tokens=False)[0].ids

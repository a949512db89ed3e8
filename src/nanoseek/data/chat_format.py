"""The chat format: DeepSeek-V3's conversation markers as special tokens, and one Jinja chat template that
transformers' `apply_chat_template`, nanoseek's server and nanoseek's SFT all render to the same ids.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...

SFT trains on the assistant's words and the end-of-sentence token after them, nothing else.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from nanoseek.data.tokenizer import TextEncoder, write_tokenizer_files

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CHAT_TOKENS = (BOS, EOS, USER, ASSISTANT)
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    f"{{% elif message['role'] == 'user' %}}{USER}{{{{ message['content'] }}}}"
    f"{{% else %}}{ASSISTANT}{{{{ message['content'] }}}}{{{{ eos_token }}}}{{% endif %}}"
    f"{{% endfor %}}{{% if add_generation_prompt %}}{ASSISTANT}{{% endif %}}"
)


def add_chat_tokens(tokenizer: Tokenizer) -> int:
    """Adds the markers the tokenizer lacks (as special tokens, never split or merged) → how many were added."""
    missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    return tokenizer.add_special_tokens(missing) if missing else 0


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """→ the ids the template renders to, and for each id whether SFT trains on it (assistant words + EOS).
    Encoding piece by piece gives the ids of encoding the whole rendering: special tokens split the text there. A
    message that spells a marker gets its characters, not the marker (a conversation cannot forge a turn)."""
    special = {t: tokenizer.token_to_id(t) for t in CHAT_TOKENS}
    as_text = TextEncoder(tokenizer)
    ids, trained = [special[BOS]], [False]

    def extend(piece: list[int], train: bool) -> None:
        ids.extend(piece)
        trained.extend([train] * len(piece))

    for message in messages:
        words = as_text(message["content"])
        if message["role"] == "system":
            extend(words, False)
        elif message["role"] == "user":
            extend([special[USER]] + words, False)
        else:
            extend([special[ASSISTANT]], False)
            extend(words + [special[EOS]], True)
    if add_generation_prompt:
        extend([special[ASSISTANT]], False)
    return ids, trained


def write_chat_tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    """tokenizer.json and a tokenizer_config.json with the chat markers and template, as transformers'
    AutoTokenizer and nanoseek's server read them."""
    write_tokenizer_files(tokenizer, directory, bos=BOS, eos=EOS, chat_template=CHAT_TEMPLATE)

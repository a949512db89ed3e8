"""SFT data: OpenAI-style conversations ({"messages": [{"role", "content"}, ...]} per line), checked line by line,
encoded in the chat format, deduplicated (a held-out conversation must not be a copy of a trained one), split into
training and held-out conversations, and batched: each row one conversation, right-padded, or several packed into a
row with their document numbers, for a mask that keeps them apart. The loss falls on assistant tokens only."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from nanoseek.data.chat_format import ROLES, encode_chat
from nanoseek.errors import NanoseekError
from nanoseek.models.common.loss import IGNORE


class SftDataError(NanoseekError):
    pass


def check_conversation(record: object, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise SftDataError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise SftDataError(f"{where}: messages[{i}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise SftDataError(
                f"{where}: messages[{i}] has the unknown role {message.get('role')!r} (roles: {', '.join(ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in record["messages"]):
        raise SftDataError(f"{where}: no assistant turn, so nothing to learn from")
    return record["messages"]


Conversation = tuple[str, list[dict[str, str]]]  # (where it came from, for error messages; its messages)


def read_conversations(path: Path) -> list[Conversation]:
    if not path.is_file():
        raise SftDataError(f"{path}: no such file")
    conversations = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise SftDataError(f"{path}: not UTF-8 text ({e.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or an integer literal past Python's 4,300 digits
            raise SftDataError(f"{path} line {number}: not JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise SftDataError(f"{path} line {number}: JSON nested too deeply") from None
        where = f"{path} line {number}"
        conversations.append((where, check_conversation(record, where)))
    if len(conversations) < 2:
        raise SftDataError(f"{path}: {len(conversations)} conversation(s); SFT needs at least 2 (one is held out)")
    return conversations


def chatterbot_conversations() -> list[Conversation]:
    """The English dialogs of chatterbot-corpus (BSD-3-Clause, human-written), turns alternating user/assistant."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise SftDataError(
            "the demo dialog data comes from the chatterbot-corpus package: "
            "pip install chatterbot-corpus (or pass --data FILE.jsonl)"
        ) from None
    import yaml

    conversations = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "english").glob("*.yml")):
        for k, dialog in enumerate(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])):
            turns = [str(t) for t in dialog if t is not None]
            turns = turns[: len(turns) // 2 * 2]  # end on the assistant's turn
            if turns:
                messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
                conversations.append((f"chatterbot-corpus {path.name} #{k}", messages))
    return conversations


@dataclass
class EncodedConversations:
    ids: list[list[int]]
    trained: list[list[bool]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_all(
    conversations: list[Conversation], tokenizer: Tokenizer, max_len: int, skip_long: bool = False
) -> EncodedConversations:
    """Encodes every conversation; one longer than the context is an error naming where it came from (or, for the
    built-in demo data, `skip_long`, left out)."""
    ids, trained = [], []
    for where, messages in conversations:
        row_ids, row_trained = encode_chat(tokenizer, messages)
        if len(row_ids) > max_len:
            if skip_long:
                continue
            raise SftDataError(
                f"{where}: the conversation is {len(row_ids)} tokens, longer than the model's context of {max_len}"
            )
        ids.append(row_ids)
        trained.append(row_trained)
    return EncodedConversations(ids, trained)


def distinct(conversations: list[Conversation]) -> list[Conversation]:
    """The first of each set of conversations with the same messages."""
    seen, kept = set(), []
    for where, messages in conversations:
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append((where, messages))
    return kept


def split_heldout(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held = max(1, int(len(order) * fraction))
    return [conversations[i] for i in order[held:]], [conversations[i] for i in order[:held]]


def batch(data: EncodedConversations, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """→ inputs [B, T], targets [B, T]: row i is one conversation, right-padded; a target is IGNORE unless it is
    an assistant token (or its end of sentence)."""
    length = max(len(data.ids[r]) for r in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids, trained = torch.tensor(data.ids[r]), torch.tensor(data.trained[r])
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = torch.where(trained[1:], ids[1:], IGNORE)
    return inputs, targets


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Conversations of `lengths` tokens into rows of at most `width` tokens, first fit in decreasing length →
    each row's conversation indices."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def packed_batch(
    data: EncodedConversations, rows: list[int], pad_id: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conversations `rows` packed into rows of ≤ width tokens → inputs, targets, documents [B, T]: each
    conversation's tokens are numbered as its own document (padding too, as one more), and no target crosses from
    one conversation into the next."""
    packing = pack([len(data.ids[r]) for r in rows], width)
    length = max(sum(len(data.ids[rows[i]]) for i in row) for row in packing) - 1
    inputs = torch.full((len(packing), length), pad_id, dtype=torch.long)
    targets = torch.full((len(packing), length), IGNORE, dtype=torch.long)
    documents = torch.full((len(packing), length), len(rows), dtype=torch.long)
    for b, row in enumerate(packing):
        at = 0
        for i in row:
            ids, trained = torch.tensor(data.ids[rows[i]]), torch.tensor(data.trained[rows[i]])
            n = min(len(ids), length - at)  # the row's last conversation loses its final input (no target)
            inputs[b, at : at + n] = ids[:n]
            targets[b, at : at + len(ids) - 1] = torch.where(trained[1:], ids[1:], IGNORE)[: length - at]
            documents[b, at : at + n] = i
            at += len(ids)
    return inputs, targets, documents


def rows_for_step(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The step's conversations: epochs of a seeded shuffle, addressed by step (resuming needs no state)."""
    per_epoch = max(1, count // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = list(range(count))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return [order[(within * batch_size + i) % count] for i in range(min(batch_size, count))]

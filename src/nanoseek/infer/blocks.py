"""The paged latent cache: one store per layer of fixed-size blocks, and the manager that hands blocks out.

Every layer (and MTP module) has a store [num_blocks · block_size, kv_lora_rank + rope]; a sequence owns a list of
block ids (its block table), the same in every layer. Prefix caching (vLLM's scheme): a block whose tokens are all
computed gets a hash chained over every token before it, so two sequences whose prompts agree up to a block
boundary share that block by reference count. A block nobody holds keeps its contents and its hash until the
space is needed, and then the least recently released one is reused first (LRU).

A block's hash also covers the first token after it: the MTP module's latent at a block's last position is computed
from that token (MTP at position i reads t_{i+1}), so the block is only valid for sequences that continue the same
way. For a model without MTP this costs at most the last block of a prompt.

DeepSeek-V4 keeps part of a sequence outside its blocks (its window and open compressor windows, in a state slot):
blocks alone cannot resume it. Its cached blocks may carry a snapshot of that state as it stood after their last
token (a state slot of its own, LRU among a fixed number); a prefix hit ends at the last matched block with one.

The hash is a keyed BLAKE2b (a secret drawn per process), and a match is only taken after comparing what the hash
stands for (the previous block's hash and the tokens): a prompt crafted to collide with another user's cached
prefix, as with Python's `hash()` of a tuple (the class of vLLM's CVE-2025-25183), can neither be computed from
outside nor read another prompt's latents.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from typing import NamedTuple


class BlockKey(NamedTuple):
    digest: bytes  # keyed hash of `content`: what the prefix cache is looked up by
    content: tuple[bytes | None, tuple[int, ...]]  # (the previous block's digest, its tokens + the next token)


def block_digest(secret: bytes, previous: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """16-byte keyed BLAKE2b of a block: the previous block's digest (none for the first) and its tokens."""
    digest = hashlib.blake2b(previous or b"", key=secret, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, snapshot_slots: list[int] | None = None):
        """snapshot_slots: V4's state slots for snapshots (None: a model whose blocks hold all it needs)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.needs_snapshots = snapshot_slots is not None
        self.free_snapshots = list(snapshot_slots or [])
        self.snapshot_of: OrderedDict[int, int] = OrderedDict()  # block → its snapshot's slot, least recent first
        self.secret = os.urandom(16)  # the hash key: never leaves the process
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.content_of: dict[int, tuple[bytes | None, tuple[int, ...]]] = {}
        self.by_hash: dict[bytes, int] = {}
        self.unhashed: list[int] = list(range(num_blocks - 1, -1, -1))  # free and holding nothing worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but holding a cached prefix, LRU first

    @property
    def free_blocks(self) -> int:
        return len(self.unhashed) + len(self.evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def keys(self, tokens: list[int], start: int = 0, previous: bytes | None = None) -> list[BlockKey]:
        """Keys of the blocks start, start+1, ... of `tokens` that are full and followed by a token (`previous`:
        the digest of block start-1)."""
        keys = []
        for block in range(start, (len(tokens) - 1) // self.block_size):
            content = (previous, tuple(tokens[block * self.block_size : (block + 1) * self.block_size + 1]))
            previous = block_digest(self.secret, *content)
            keys.append(BlockKey(previous, content))
        return keys

    def root(self, salt: str | None) -> bytes | None:
        """What a sequence's first block is chained to: nothing, or its cache salt's digest, so that requests of
        different salts (tenants) never share a block and cannot time or count each other's cached prompts."""
        return None if salt is None else block_digest(self.secret, salt.encode(), ())

    def match_prefix(self, tokens: list[int], root: bytes | None = None) -> list[int]:
        """The cached blocks that begin `tokens` (each now held once more): found by digest, taken only if they
        hold exactly these tokens after exactly the blocks before (and the same root)."""
        blocks = []
        for key in self.keys(tokens, 0, root):
            block = self.by_hash.get(key.digest)
            if block is None or self.content_of[block] != key.content:
                break
            blocks.append(block)
        if self.needs_snapshots:  # resumable only where the state was kept
            while blocks and blocks[-1] not in self.snapshot_of:
                blocks.pop()
            if blocks:
                self.snapshot_of.move_to_end(blocks[-1])
        for block in blocks:
            self._hold(block)
        return blocks

    def snapshot_slot(self, block: int) -> int | None:
        """A state slot for the snapshot after `block` (a registered block without one), the least recently used
        snapshot given up if none is free; None if the block has one already."""
        if block in self.snapshot_of or not (self.free_snapshots or self.snapshot_of):
            return None
        slot = self.free_snapshots.pop() if self.free_snapshots else self.snapshot_of.popitem(last=False)[1]
        self.snapshot_of[block] = slot
        return slot

    def drop_snapshot(self, block: int) -> None:
        if block in self.snapshot_of:
            self.free_snapshots.append(self.snapshot_of.pop(block))

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for one holder, or None (and nothing taken) if that many are not free."""
        if count > self.free_blocks:
            return None
        blocks = []
        for _ in range(count):
            if self.unhashed:
                block = self.unhashed.pop()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)], self.content_of[block]
                self.drop_snapshot(block)
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one hold on each block; the tail first, so that a sequence's last blocks are evicted first."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.unhashed.append(block)

    def register(self, block: int, key: BlockKey) -> None:
        """A block whose tokens are all computed: findable by later prompts (the first block with a key keeps it)."""
        if key.digest not in self.by_hash and block not in self.hash_of:
            self.by_hash[key.digest], self.hash_of[block], self.content_of[block] = block, key.digest, key.content

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

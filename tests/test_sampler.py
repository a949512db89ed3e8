"""The engine's parts on their own: batched device sampling, rejection sampling, incremental detokenization, and the
block manager's prefix caching."""

from __future__ import annotations

import pytest
import torch

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer import blocks as blocks_module
from nanoseek.infer.blocks import BlockManager
from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.sampler import RowSettings, draw, probabilities, sample, uniform, verify


def _rows(
    count: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed0: int = 0, draws: int = 0
) -> RowSettings:
    return RowSettings(
        torch.full((count,), temperature),
        torch.full((count,), top_k, dtype=torch.long),
        torch.full((count,), top_p),
        torch.arange(seed0, seed0 + count, dtype=torch.long),
        torch.full((count,), draws, dtype=torch.long),
    )


def test_filters_apply_per_row_in_one_pass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(4, -1)
    rows = RowSettings(
        torch.tensor([0.0, 1.0, 1.0, 5.0]),
        torch.tensor([0, 2, 0, 0]),
        torch.tensor([1.0, 1.0, 0.7, 0.99]),
        torch.zeros(4, dtype=torch.long),
        torch.zeros(4, dtype=torch.long),
    )
    probs = probabilities(logits, rows)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy: one-hot
    assert probs[1].tolist() == pytest.approx([0.625, 0.375, 0, 0])  # top-k 2, renormalized
    assert probs[2].tolist() == pytest.approx([0.625, 0.375, 0, 0])  # top-p 0.7 needs the second token
    assert (probs[3] > 0).all() and probs[3].sum().item() == pytest.approx(1.0)  # hot and nearly everything


def test_top_p_applies_to_what_top_k_kept():
    """top-k 2 keeps [0.625, 0.375] renormalized: the first token alone reaches top-p 0.6 of that (on the full
    distribution it has only 0.5, and the second token would stay)."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rows = RowSettings(
        torch.ones(1),
        torch.tensor([2]),
        torch.tensor([0.6]),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )
    assert probabilities(logits, rows)[0].tolist() == pytest.approx([1.0, 0, 0, 0])


def test_draws_follow_the_distribution_and_the_seed():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(40000, -1)
    tokens = draw(probs, _rows(40000), stream=0)
    frequencies = torch.bincount(tokens, minlength=4).float() / 40000
    assert (frequencies - probs[0]).abs().max().item() < 0.01  # 4 standard errors at n = 40,000
    again = draw(probs[:50], _rows(50, seed0=0), stream=0)
    assert again.tolist() == tokens[:50].tolist()  # same (seed, counter, stream): same token, whatever the batch
    later = draw(probs[:50], _rows(50, seed0=0, draws=1), stream=0)
    assert later.tolist() != tokens[:50].tolist()
    u = uniform(torch.tensor([3, -7], dtype=torch.long), torch.tensor([0, 1 << 40], dtype=torch.long), 2, 1000)
    assert 0 < u.min().item() and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.03


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 4)])
def test_rejection_sampling_preserves_the_target_distribution(temperature, top_k):
    """Draft from q, verify against p: the first token must be distributed as p (and the bonus as p's next-step
    distribution), however different q is — over 60,000 independently seeded rows, on a 6-token vocabulary."""
    torch.manual_seed(0)
    n, vocab = 60000, 6
    target_logits, next_logits, draft_logits = torch.randn(3, vocab) * 1.5
    rows = _rows(n, temperature, top_k)
    p = probabilities(target_logits.expand(n, -1), rows)
    p_next = probabilities(next_logits.expand(n, -1), rows)
    drafts, q = sample(draft_logits.expand(n, -1), rows, stream=3)
    accepted, tokens = verify(torch.stack([target_logits, next_logits]).expand(n, -1, -1), drafts, q, rows)
    first = torch.bincount(tokens[:, 0], minlength=vocab).float() / n
    assert (first - p[0]).abs().max().item() < 0.01
    bonus = torch.bincount(tokens[accepted, 1], minlength=vocab).float() / accepted.sum()
    assert (bonus - p_next[0]).abs().max().item() < 0.015
    expected_acceptance = torch.minimum(p[0], q[0]).sum().item()  # Σ min(p, q)
    assert accepted.float().mean().item() == pytest.approx(expected_acceptance, abs=0.01)


@pytest.mark.parametrize("fast_path", [True, False])
def test_greedy_verification_is_exact(fast_path):
    """Temperature 0: the draft is kept iff it is the argmax, else the argmax replaces it; the same through the
    all-greedy shortcut and through rejection sampling with one-hot p and q."""
    rows = _rows(3, temperature=0.0)
    rows.all_greedy = fast_path
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    drafts = torch.tensor([1, 2, 0])  # right, wrong, wrong
    one_hot = torch.eye(3)[drafts]
    accepted, tokens = verify(
        torch.stack([logits, logits.roll(1, dims=0)], dim=1), drafts, None if fast_path else one_hot, rows
    )
    assert accepted.tolist() == [True, False, False]
    assert tokens[:, 0].tolist() == [1, 0, 2] and tokens[0, 1].item() == 2  # bonus: argmax of the next step


def test_incremental_detokenization_equals_full_decode():
    text = "héllo wörld — ünïcode ✓ and plain words, again and again. " * 3
    tokenizer = train_tokenizer([text], 300)
    ids = tokenizer.encode(text).ids
    detok = Detokenizer(tokenizer.decode)
    pieces = [detok.update(ids[: i + 1], final=i == len(ids) - 1)[0] for i in range(len(ids))]
    assert "".join(pieces) == tokenizer.decode(ids) == detok.text
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    stop = "wörld — ü"
    detok = Detokenizer(tokenizer.decode, (stop,))
    streamed, hit = [], False
    for i in range(len(ids)):
        delta, hit = detok.update(ids[: i + 1], final=False)
        streamed.append(delta)
        if hit:
            break
    assert hit and "".join(streamed) == text[: text.index(stop)] == detok.text


def test_prefix_blocks_are_shared_counted_and_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    owned = manager.allocate(3)
    for block, key in zip(owned, manager.keys(tokens)):
        manager.register(block, key)
    assert len(manager.keys(tokens)) == 2  # block 3 is not full; block 2 needs the token after it
    assert manager.match_prefix([1, 2, 3, 4, 5, 6]) == owned[:2]
    assert manager.match_prefix([1, 2, 3, 4, 9]) == owned[:1]  # the token after block 1 differs (MTP's latent)
    assert manager.refs[owned[0]] == 3 and manager.match_prefix([7, 2, 3, 4, 5]) == []
    manager.release(owned[:2]), manager.release(owned[:1])
    manager.release(owned)  # the owner leaves: its full blocks stay cached, evictable
    assert manager.free_blocks == 4 and manager.match_prefix(tokens) == owned[:2]  # still found
    manager.release(owned[:2])
    assert manager.allocate(3) is not None  # the two blocks without a hash, then the least recently released
    assert manager.match_prefix(tokens) == owned[:1]  # the tail was evicted first; the chain's head survives
    assert manager.allocate(1) is None and manager.free_blocks == 0


def test_v4_prefix_hits_end_at_a_snapshot_and_snapshots_are_lru():
    """DeepSeek-V4's blocks resume a sequence only with a snapshot of its state: a hit stops at the last matched
    block that has one; snapshots are a fixed number of slots, the least recently used given up first, and freed
    with their block when it is evicted."""
    manager = BlockManager(num_blocks=4, block_size=2, snapshot_slots=[7, 8])
    tokens = [1, 2, 3, 4, 5, 6, 7]
    owned = manager.allocate(3)
    for block, key in zip(owned, manager.keys(tokens)):
        manager.register(block, key)
    assert manager.match_prefix(tokens) == []  # three cached blocks, no snapshot: nothing to resume from
    assert manager.snapshot_slot(owned[0]) == 8 and manager.snapshot_slot(owned[0]) is None  # one per block
    assert manager.snapshot_slot(owned[1]) == 7
    assert manager.match_prefix(tokens) == owned[:2]  # block 2 is cached but has no snapshot
    manager.release(owned[:2])
    assert manager.match_prefix([1, 2, 3, 9, 9]) == owned[:1]  # block 1 differs: the hit ends at block 0's snapshot
    manager.release(owned[:1])
    assert manager.snapshot_slot(owned[2]) == 7  # block 0's was used last: block 1's gives up its slot
    assert manager.snapshot_of == {owned[0]: 8, owned[2]: 7}
    manager.drop_snapshot(owned[2])
    manager.release(owned)
    assert manager.allocate(4) is not None and manager.snapshot_of == {}  # evicted blocks free their snapshots
    assert sorted(manager.free_snapshots) == [7, 8]


def _letters(ids: list[int]) -> str:
    return "".join(chr(97 + i) for i in ids)


def test_the_earliest_stop_string_cuts_the_text():
    """One token brings "say hello": of the stops ("lo", "he") both occur in it, and the text is cut where the
    earliest begins ("he"), not at the first one listed."""
    words = ["say hello", " world"]
    detok = Detokenizer(lambda ids: "".join(words[i] for i in ids), ("lo", "he"))
    assert detok.update([0], final=False) == ("say ", True) and detok.text == "say "


def test_stop_string_hold_back_is_linear_in_the_stop_length():
    """A 20,000-character stop string ("a" * 20,000 + "b") against 20,000 c's then the stop itself: each step costs
    its new text, so the stream takes a second (testing every prefix of the stop at every step took minutes). What is
    held back and where the text is cut are the naive rule's."""
    import threading

    stop = "a" * 20_000 + "b"
    ids = [2] * 20_000 + [0] * 20_000 + [1]
    detok = Detokenizer(_letters, (stop,))
    outcome: list = []
    worker = threading.Thread(
        target=lambda: outcome.extend(detok.update(ids[: i + 1], final=False) for i in range(len(ids))), daemon=True
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the stop-string matching is superlinear"
    assert "".join(delta for delta, _ in outcome[:20_000]) == "c" * 20_000  # nothing held back: no "a" yet
    assert all(delta == "" for delta, _ in outcome[20_000:])  # every "a" may grow into the stop
    assert outcome[-1][1] and not any(hit for _, hit in outcome[:-1]) and detok.text == "c" * 20_000


def test_prefix_cache_compares_tokens_and_keys_its_hash(monkeypatch):
    """Every block hashing alike (a forged collision) never hands one prompt's latents to another; the hash is keyed
    by a secret per process, so nobody outside can compute a collision."""
    tokens = [1, 2, 3, 4, 5]
    assert BlockManager(4, 2).keys(tokens) != BlockManager(4, 2).keys(tokens)
    monkeypatch.setattr(blocks_module, "block_digest", lambda secret, previous, block: b"collide")
    manager = BlockManager(num_blocks=4, block_size=2)
    owned = manager.allocate(2)
    for block, key in zip(owned, manager.keys(tokens)):
        manager.register(block, key)
    assert manager.match_prefix([9, 9, 9, 9, 9]) == []
    assert manager.match_prefix([1, 2, 9, 9, 9]) == []  # block 0 is followed by another token: not the same block
    assert manager.match_prefix(tokens) == owned[:1]  # block 1's digest is taken by block 0: only the head is found


def test_a_window_that_never_forms_a_character_does_not_grow():
    """A run of lone continuation bytes (a logit_bias can force one) ends every window in U+FFFD: it used to be
    decoded whole at every step. Each step now decodes a bounded window, and real characters split over tokens
    still come out whole."""
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")

    detokenizer, ids = Detokenizer(decode), []
    for _ in range(400):
        ids.append(0x80)
        detokenizer.update(ids, final=False)
    assert max(decoded) <= 12 and sum(decoded) < 400 * 30
    ids += list("é and 日本".encode())
    text = "".join(detokenizer.update(ids[:k], final=False)[0] for k in range(401, len(ids) + 1))
    assert text.endswith("é and 日本") and detokenizer.update(ids, True)[0] == ""

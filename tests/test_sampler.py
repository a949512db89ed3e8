"""The engine's parts on their own: batched device sampling, rejection sampling, incremental detokenization, and the
block manager's prefix caching."""

from __future__ import annotations

import pytest
import torch

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.blocks import BlockManager, chained_hashes
from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.sampler import RowSettings, draw, probabilities, sample, uniform, verify


def _rows(count: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed0: int = 0,
          draws: int = 0) -> RowSettings:
    return RowSettings(torch.full((count,), temperature), torch.full((count,), top_k, dtype=torch.long),
                       torch.full((count,), top_p), torch.arange(seed0, seed0 + count, dtype=torch.long),
                       torch.full((count,), draws, dtype=torch.long))


def test_filters_apply_per_row_in_one_pass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(4, -1)
    rows = RowSettings(torch.tensor([0.0, 1.0, 1.0, 5.0]), torch.tensor([0, 2, 0, 0]),
                       torch.tensor([1.0, 1.0, 0.7, 0.99]), torch.zeros(4, dtype=torch.long),
                       torch.zeros(4, dtype=torch.long))
    probs = probabilities(logits, rows)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy: one-hot
    assert probs[1].tolist() == pytest.approx([0.625, 0.375, 0, 0])  # top-k 2, renormalized
    assert probs[2].tolist() == pytest.approx([0.625, 0.375, 0, 0])  # top-p 0.7 needs the second token
    assert (probs[3] > 0).all() and probs[3].sum().item() == pytest.approx(1.0)  # hot and nearly everything


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
    accepted, tokens = verify(torch.stack([logits, logits.roll(1, dims=0)], dim=1), drafts,
                              None if fast_path else one_hot, rows)
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
    for block, block_hash in zip(owned, chained_hashes(tokens, 2)):
        manager.register(block, block_hash)
    assert len(chained_hashes(tokens, 2)) == 2  # block 3 is not full; block 2 needs the token after it
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

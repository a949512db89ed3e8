"""DeepSeek-V4 served where its state does not line up with the cache's blocks: compression rates larger than the
block (DeepSeek's HCA pools 128 tokens, the engine's block holds 64), ragged prompts cut into chunks by the token
budget, prefix hits that resume inside an open compressor window, sequences preempted in the middle of one. At
each, the engine's logprobs (the logits up to a constant) are those of the model's full forward over the same
tokens; test_parity_v4 ties that forward to transformers'."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_parity_v4 import _randomized, v4_config

from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import Completion, SamplingParams
from nanoseek.infer.scheduler import Scheduler
from nanoseek.models.deepseek_v4.paged import CompressorStore

CSA_RATE, HCA_RATE = 8, 16
PROMPT_LENGTHS = (3, 13, 22, 37, 9)
NEW_TOKENS = 10
TOP = 20  # of the 64 tokens' logprobs, compared each step


@pytest.fixture(scope="module")
def model():
    config = v4_config(
        index_n_heads=16, max_position_embeddings=128, compress_rate_csa=CSA_RATE, compress_rate_hca=HCA_RATE
    )
    return _randomized(config, seed=4)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _full_forward_gap(model, prompt: list[int], completion: Completion) -> float:
    """The largest |Δ| between the completion's logprobs (each output token's and its TOP most likely; the prompt's,
    if scored) and the full forward's over prompt + output; each step's top tokens must be the forward's top."""
    tokens = prompt + completion.token_ids
    with torch.no_grad():
        reference = model(torch.tensor([tokens]))[0].float().log_softmax(-1)
    rows = [(len(prompt) - 1 + k, entry) for k, entry in enumerate(completion.logprobs)]
    rows += [(j, entry) for j, entry in enumerate(completion.prompt_logprobs or [])]
    assert len(completion.logprobs) == len(completion.token_ids) == NEW_TOKENS
    gap = 0.0
    for position, entry in rows:
        row = reference[position]
        assert entry.token == tokens[position + 1]
        ids = torch.tensor([entry.token] + [i for i, _ in entry.top])
        got = torch.tensor([entry.logprob] + [v for _, v in entry.top])
        gap = max(gap, (got - row[ids]).abs().max().item())
        assert got[1:].min() >= row.topk(TOP).values[-1] - 1e-4  # they are the forward's TOP most likely
    return gap


def _gap(model, prompts: list[list[int]], completions: list[Completion]) -> float:
    return max(_full_forward_gap(model, p, c) for p, c in zip(prompts, completions))


@pytest.mark.parametrize("block_size", [4, 16], ids=["rates-over-the-block", "rates-up-to-the-block"])
def test_v4_served_logits_equal_the_full_forward_whatever_the_geometry(model, block_size, monkeypatch):
    """Block 4: both rates larger than the block (an entry every 2 or 4 blocks, every block boundary inside an open
    window); block 16: CSA's 8 inside it, HCA's 16 equal to it. With a budget of 12 tokens a step, prompts of 3 to
    37 tokens are prefilled in chunks that start inside open windows, beside decode rows at other positions."""
    opened_at, preempted_at = [], []
    load, preempt = CompressorStore.load, Scheduler.preempt

    def recording_load(store, seg):
        opened_at.append(seg.position % store.rate)
        return load(store, seg)

    def recording_preempt(scheduler, seq):
        preempted_at.append(seq.computed)
        preempt(scheduler, seq)

    monkeypatch.setattr(CompressorStore, "load", recording_load)
    monkeypatch.setattr(Scheduler, "preempt", recording_preempt)
    prompts = _prompts()
    plain = EngineConfig(block_size=block_size, max_seqs=3, token_budget=12, state_snapshots=24)
    engine = Engine(model, config=plain)
    scored = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=TOP, prompt_logprobs=TOP)
    first = engine.generate(prompts, scored)
    assert _gap(model, prompts, first) <= 2e-5
    assert any(opened_at), "no chunk began inside an open compressor window"

    # the same prompts again, resumed from the prefix cache: from the snapshot after the prompt's last full block
    params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=TOP)
    again = engine.generate(prompts, params)
    assert [c.cached_tokens for c in again] == [(len(p) - 1) // block_size * block_size for p in prompts]
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    assert _gap(model, prompts, again) <= 2e-5
    # each prompt and its output (a next turn): from the snapshot its decode took after the output's last full block
    turns = [p + c.token_ids for p, c in zip(prompts, first)]
    extended = engine.generate(turns, params)
    assert [c.cached_tokens for c in extended] == [(len(t) - 1) // block_size * block_size for t in turns]
    assert _gap(model, turns, extended) <= 2e-5
    if block_size < CSA_RATE:
        assert any(c.cached_tokens % CSA_RATE for c in [*again, *extended]), "no prefix hit inside an open window"

    # a cache that holds one longest sequence and a block more: the others are preempted and recomputed
    state = sum(t.nbytes for layer in engine.store.layers for t in layer.state_tensors())
    per_block = (engine.store.nbytes - state) / engine.store.blocks
    longest = math.ceil((max(PROMPT_LENGTHS) + NEW_TOKENS) / block_size)
    tight = Engine(model, config=dataclasses.replace(plain, cache_memory=state + per_block * (longest + 1)))
    squeezed = tight.generate(prompts, params)
    assert tight.stats()["preemptions"] > 0
    assert any(p % HCA_RATE for p in preempted_at), "no sequence was preempted inside an open window"
    assert [c.token_ids for c in squeezed] == [c.token_ids for c in first]
    assert _gap(model, prompts, squeezed) <= 2e-5


def test_v4_is_served_without_speculation_and_its_paged_mtp_refuses():
    """V4's MTP module stays out of the engine until its drafts can be undone in the windows: speculation is refused
    in one line, the default serves without it, and the paged MTP forward refuses instead of running V3's."""
    from nanoseek.errors import NanoseekError

    with_mtp = _randomized(v4_config(num_nextn_predict_layers=1, max_position_embeddings=64))
    with pytest.raises(NanoseekError, match="speculation is not built for deepseek_v4"):
        Engine(with_mtp, config=EngineConfig(block_size=4, max_seqs=1, speculation=True))
    engine = Engine(with_mtp, config=EngineConfig(block_size=4, max_seqs=1))
    assert not engine.speculate
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))[0].token_ids) == 3
    with pytest.raises(NotImplementedError, match="V4's MTP drafts are not served"):
        with_mtp.mtp_forward_paged(torch.zeros(1, 3, 32), torch.zeros(1, dtype=torch.long), None, engine.store)

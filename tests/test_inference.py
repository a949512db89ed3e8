"""Inference: the paged forward (chunked prefill, prefix hits, absorbed decode) equals the full forward; the engine
batches without cross-talk, preempts and recomputes identically, reuses cached prefixes, and its MTP speculation is
exact when greedy and distribution-preserving when sampling."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from helpers import V32, YARN, tiny_config
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import SamplingParams
from nanoseek.infer.sampler import LogitEdits
from nanoseek.models.common.paged import PagedBatch, PagedStore, PrefillChunk

BLOCK_BYTES = 4 * 4 * 20 * 4  # (3 layers + MTP) × 4 tokens × (latent 16 + rope 4) × fp32


def _model(**overrides) -> nanoseek.DeepseekV3Model:
    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config(num_nextn_predict_layers=1, **overrides)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init give peaky, varied logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.15)
    return model


def _store(model: nanoseek.DeepseekV3Model, slots: int = 128) -> PagedStore:
    c = model.config
    layers = c.num_hidden_layers + 1
    return PagedStore(
        torch.zeros(layers, slots, c.kv_lora_rank + c.qk_rope_head_dim),
        torch.zeros(layers, slots, c.index_head_dim) if c.sparse_attention else None,
    )


def _prefill(model, store, tokens, slots, start, stop) -> torch.Tensor:
    batch = PagedBatch(
        torch.arange(start, stop), slots[start:stop], prefills=[PrefillChunk(0, stop - start, slots[:stop])]
    )
    return model.logits(model.forward_paged(torch.tensor(tokens[start:stop]), batch, store))


def _decode(model, store, rows: list[tuple[list[int], torch.Tensor, int]], width: int) -> torch.Tensor:
    """rows: (tokens, slots, first position) of sequences each computing `width` tokens in the absorbed form."""
    ids = torch.tensor([t for tokens, _, at in rows for t in tokens[at : at + width]])
    positions = torch.cat([torch.arange(at, at + width) for _, _, at in rows])
    context = torch.nn.utils.rnn.pad_sequence([slots[: at + width] for _, slots, at in rows], batch_first=True)
    batch = PagedBatch(
        positions, torch.cat([slots[at : at + width] for _, slots, at in rows]), len(rows), width, context
    )
    return model.logits(model.forward_paged(ids, batch, store)).view(len(rows), width, -1)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(q_lora_rank=None, rope_scaling=YARN), dict(scoring_func="softmax", norm_topk_prob=False), V32],
    ids=["v3", "yarn-no-q-lora", "softmax", "v32"],
)
@pytest.mark.parametrize("chunks", [(18,), (5, 7, 6), (1, 1, 16)])
def test_paged_forward_equals_full_forward(overrides, chunks):
    """Any chunking of the prompt, then decoding one and two tokens a step, for two sequences of different lengths
    decoded together; slots scattered over the store as blocks would be. V3.2: the indexer keeps 6 of up to 26
    tokens, so prefill chunks mask and decode gathers its top-k from the store."""
    model = _model(**overrides)
    store = _store(model)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 96, (26,), generator=generator).tolist() for _ in range(2)]
    slots = torch.randperm(128, generator=generator)[:52].view(2, 26)
    with torch.no_grad():
        full = [model(torch.tensor([tokens]))[0] for tokens in sequences]
        for tokens, seq_slots, reference in zip(sequences, slots, full):
            at = 0
            for length in chunks:
                logits = _prefill(model, store, tokens, seq_slots, at, at + length)
                assert (logits - reference[at : at + length]).abs().max().item() <= 1e-5
                at += length
        at = sum(chunks)
        for width in (1, 2, 1, 2, 2):
            rows = [(tokens, seq_slots, at) for tokens, seq_slots in zip(sequences, slots)]
            logits = _decode(model, store, rows, width)
            for row, reference in zip(logits, full):
                assert (row - reference[at : at + width]).abs().max().item() <= 1e-5
            at += width


def test_prefix_hit_then_chunk_equals_full_forward():
    """A second sequence reuses the first one's slots for their common 16-token prefix and prefills only the rest."""
    model = _model()
    store = _store(model)
    first = torch.randint(0, 96, (24,)).tolist()
    second = first[:16] + torch.randint(0, 96, (10,)).tolist()
    first_slots, own_slots = torch.arange(0, 24), torch.arange(64, 90)
    second_slots = torch.cat([first_slots[:16], own_slots[16:]])
    with torch.no_grad():
        _prefill(model, store, first, first_slots, 0, 24)
        logits = torch.cat(
            [_prefill(model, store, second, second_slots, 16, 21), _prefill(model, store, second, second_slots, 21, 26)]
        )
        assert (logits - model(torch.tensor([second]))[0, 16:]).abs().max().item() <= 1e-5


def _greedy_by_recomputation(model, prompt: list[int], new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(),
        EngineConfig(block_size=4, token_budget=8),
        EngineConfig(block_size=4, cache_memory=9 * BLOCK_BYTES, max_seqs=3),
    ],
    ids=["default", "chunked", "preempting"],
)
def test_batch_has_no_cross_talk(config):
    """Batched, chunked, or with a cache so small that sequences are preempted and recomputed: every sequence
    gets the tokens that greedy decoding by full recomputation gives it alone."""
    model = _model()
    engine = Engine(model, config=config)
    prompts = [[5, 6, 7], list(range(1, 23)), [42], list(range(30, 50))]
    batched = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for prompt, result in zip(prompts, batched):
        assert result.token_ids == _greedy_by_recomputation(model, prompt, 12)
    if config.cache_memory:
        assert engine.scheduler.preemptions > 0
    assert engine.blocks.used_blocks == 0  # every block was given back


def test_repeated_prompt_hits_the_prefix_cache():
    model = _model()
    engine = Engine(model, config=EngineConfig(block_size=8))
    prompt = torch.randint(0, 96, (30,)).tolist()
    params = SamplingParams(max_new_tokens=10)
    first = engine.generate([prompt], params)[0]
    again = engine.generate([prompt], params)[0]
    longer = engine.generate([prompt + first.token_ids[:3]], params)[0]
    assert first.cached_tokens == 0 and again.cached_tokens == 24  # 3 full blocks, each followed by a token
    assert longer.cached_tokens == 32  # the first one's generated tokens filled a fourth block
    assert again.token_ids == first.token_ids
    assert longer.token_ids == _greedy_by_recomputation(model, prompt + first.token_ids[:3], 10)
    assert engine.stats()["prefix_hit_rate"] == pytest.approx((24 + 32) / (30 + 30 + 33))


def test_sampling_is_seeded_and_stops():
    engine = Engine(_model(), decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=s) for s in (0, 0, 1)]
    alone = [engine.generate([[1, 2, 3]], p)[0] for p in params]
    together = engine.generate([[1, 2, 3]] * 3, params)  # a seed draws the same numbers whatever shares its batch
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert alone[0].token_ids == alone[1].token_ids != alone[2].token_ids
    greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20))[0]
    stop_id = greedy.token_ids[5]
    cut = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, stop_token_ids=(stop_id,)))[0]
    first = greedy.token_ids.index(stop_id)
    assert cut.token_ids == greedy.token_ids[:first] and cut.finish_reason == "stop"
    stop_text = greedy.text[7:9]
    streamed: list[str] = []
    by_string = engine.generate(
        [[1, 2, 3]],
        SamplingParams(max_new_tokens=20, stop_strings=(stop_text,)),
        on_token=lambda row, delta, done: streamed.append(delta),
    )[0]
    assert by_string.text == greedy.text[: greedy.text.index(stop_text)] == "".join(streamed)
    assert by_string.finish_reason == "stop" and greedy.finish_reason == "length"


def test_logprobs_are_the_models():
    model = _model()
    engine = Engine(model, config=EngineConfig(speculation=False))
    result = engine.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, logprobs=2))[0]
    with torch.no_grad():
        reference = model(torch.tensor([[3, 4, 5] + result.token_ids]))[0].log_softmax(-1)
    for i, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(reference[2 + i, entry.token].item(), abs=1e-5)
        assert [t for t, _ in entry.top] == reference[2 + i].topk(2).indices.tolist()


def test_requests_that_cannot_run_are_refused():
    engine = Engine(_model(), config=EngineConfig(block_size=4, cache_memory=8 * BLOCK_BYTES))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.generate([[1] * 120], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="exceeds the latent cache of 32 tokens"):
        engine.generate([[1] * 30], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[96]], SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mtp_speculation_equals_greedy(seed):
    torch.manual_seed(seed)
    model = _model()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (7, 19, 3)]
    params = SamplingParams(max_new_tokens=40)
    plain_engine = Engine(model, config=EngineConfig(speculation=False))
    spec_engine = Engine(model, config=EngineConfig(block_size=8, token_budget=16))
    plain = plain_engine.generate(prompts, params)
    speculative = spec_engine.generate(prompts, params)
    assert [r.token_ids for r in speculative] == [r.token_ids for r in plain]
    assert spec_engine.drafted >= 3 * 20  # at most two tokens a step: at least 20 verifying steps each


def test_drafts_are_the_mtp_modules_predictions():
    """After every step, a sequence's draft is what the MTP module predicts over the whole sequence (training's
    path: depth 1 at position i reads h_i and t_{i+1}), accepted or not, whatever the chunking."""
    model = _model()
    engine = Engine(model, config=EngineConfig(block_size=4, token_budget=6))
    seq = engine.add(torch.randint(0, 96, (9,)).tolist(), SamplingParams(max_new_tokens=12))
    checked = 0
    while seq.finish_reason is None:
        engine.step()
        if seq.output and seq.finish_reason is None:
            ids = torch.tensor([seq.tokens])
            T = ids.shape[1]
            with torch.no_grad():
                cos, sin = model.rope(torch.arange(T))
                x = model.embed(ids)
                for layer in model.layers:
                    x = layer(x, cos, sin)
                h = model.mtp[0](x[:, :-1], model.embed(ids[:, 1:]), cos[:-1], sin[:-1])
                assert seq.draft == int(model.head(model.mtp[0].norm(h))[0, -1].argmax())
            checked += 1
    assert checked >= 6


def test_speculative_sampling_keeps_the_model_distribution():
    """Temperature 1 with MTP drafts: the second generated token (the first one that goes through rejection
    sampling) is distributed as the model says, Σ_t1 p(t1 | prompt) p(t2 | prompt, t1), over 3,000 seeds."""
    model = _model(vocab_size=12)
    prompt, n = [3, 7, 1], 3000
    engine = Engine(model, config=EngineConfig(max_seqs=n, token_budget=4 * n))
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=s) for s in range(n)]
    results = engine.generate([prompt] * n, params)
    assert engine.drafted >= n and 0 < engine.accepted < engine.drafted
    with torch.no_grad():
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = model(torch.tensor([prompt + [t] for t in range(12)]))[:, -1].softmax(-1)
    expected = (p1[:, None] * p2).sum(0)
    observed = torch.bincount(torch.tensor([r.token_ids[1] for r in results]), minlength=12).float() / n
    assert (observed - expected).abs().max().item() < 0.03  # ~3.5 standard errors at worst


def test_seeded_sampling_does_not_depend_on_chunking_or_load():
    """A seeded request samples the same tokens whether its prompt is prefilled whole, or in 8-token chunks while
    other requests share the steps: the sampler's counter advances on sampling steps only."""
    model = _model()
    prompt = list(range(3, 33))
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    alone = Engine(model).generate([prompt], params)[0]
    loaded = Engine(model, config=EngineConfig(block_size=4, token_budget=8)).generate(
        [list(range(40, 60)), prompt, [9, 8, 7]],
        [SamplingParams(max_new_tokens=10), params, SamplingParams(max_new_tokens=10, temperature=1.0)],
    )
    assert loaded[1].token_ids == alone.token_ids


def test_admission_reserves_blocks_for_the_chunk_it_gets():
    """With 16 tokens per step, a 14-token prompt leaves 2 for the next admission: its first chunk (2 tokens) holds
    one 4-token block, not the four a whole step's budget would fill."""
    from nanoseek.infer.blocks import BlockManager
    from nanoseek.infer.detokenize import Detokenizer
    from nanoseek.infer.request import Sequence
    from nanoseek.infer.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(num_blocks=32, block_size=4), max_seqs=4, token_budget=16)
    short, long = (Sequence(list(range(n)), SamplingParams(), Detokenizer(None)) for n in (14, 40))
    scheduler.waiting.extend([short, long])
    step = scheduler.schedule(1)
    assert step.prefill == [(short, 14), (long, 2)]
    assert len(short.blocks) == 4 and len(long.blocks) == 1


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(),
        EngineConfig(block_size=4, token_budget=8),
        EngineConfig(block_size=4, cache_memory=9 * BLOCK_BYTES, max_seqs=3),
    ],
    ids=["whole", "chunked", "preempting"],
)
def test_prompt_logprobs_are_the_models(config):
    """Every prompt token after the first, scored given those before it (the model's full forward), with its most
    likely alternatives: whole, chunked, or recomputed after preemption; a cached prefix is not used for it, and
    max_new_tokens 0 scores without generating."""
    model = _model()
    engine = Engine(model, config=config)
    prompt = list(range(1, 23))
    engine.generate([prompt], SamplingParams(max_new_tokens=4))  # its blocks are now in the prefix cache
    prompts = [prompt, list(range(30, 50)), [5, 6, 7]]
    params = [SamplingParams(max_new_tokens=n, prompt_logprobs=2, logprobs=1) for n in (0, 12, 12)]
    results = engine.generate(prompts, params)
    with torch.no_grad():
        for tokens, result in zip(prompts, results):
            reference = model(torch.tensor([tokens]))[0].log_softmax(-1)
            assert [e.token for e in result.prompt_logprobs] == tokens[1:] and result.cached_tokens == 0
            for i, entry in enumerate(result.prompt_logprobs):
                assert entry.logprob == pytest.approx(reference[i, tokens[i + 1]].item(), abs=1e-5)
                assert [t for t, _ in entry.top] == reference[i].topk(2).indices.tolist()
    assert results[0].token_ids == [] and results[0].finish_reason == "length"
    assert [len(r.token_ids) for r in results[1:]] == [12, 12]
    assert (engine.scheduler.preemptions > 0) == (config.cache_memory is not None)


def _shaped_greedy_by_recomputation(model, prompt: list[int], new: int, params: SamplingParams) -> list[int]:
    """Greedy decoding by full recomputation with the penalties, bias and minimum length written out plainly."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids]))[0, -1].clone()
            output = ids[len(prompt) :]
            for token in set(output):
                logits[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
            for token in set(ids):
                r = params.repetition_penalty
                logits[token] = logits[token] / r if logits[token] > 0 else logits[token] * r
            for token, bias in params.logit_bias:
                logits[token] += bias
            if len(output) < params.min_tokens:
                logits[list(params.stop_token_ids)] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("speculation", [False, True])
def test_penalties_bias_and_min_tokens_shape_the_logits(speculation, monkeypatch):
    """The engine (batched, chunked, with MTP drafts verified against the shaped logits) picks what plain greedy
    decoding over the shaped logits picks; a large bias forces its token; min_tokens holds the stop token back."""
    model = _model()
    engine = Engine(model, config=EngineConfig(block_size=4, token_budget=8, speculation=speculation))
    prompt = [5, 6, 7, 5, 6]
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0].token_ids
    cases = [
        SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(max_new_tokens=12, repetition_penalty=1.8),
        SamplingParams(max_new_tokens=12, logit_bias=((3, 2.0), (11, -5.0))),
        SamplingParams(max_new_tokens=12, min_tokens=4, stop_token_ids=(plain[0], plain[1])),
    ]
    built = []
    real_build = LogitEdits.build
    monkeypatch.setattr(LogitEdits, "build", lambda *a: built.append(a) or real_build(*a))
    results = engine.generate([prompt] * len(cases), cases)
    assert len(built) == len(cases)  # each sequence's edits made once, then grown: not rebuilt at every step
    for params, result in zip(cases, results):
        want = _shaped_greedy_by_recomputation(model, prompt, 12, params)
        if params.stop_token_ids:
            want = want[: next((i for i, t in enumerate(want) if t in params.stop_token_ids), len(want))]
            assert len(want) >= 4
        assert result.token_ids == want
    assert results[0].token_ids != plain
    forced = engine.generate([prompt], SamplingParams(max_new_tokens=6, logit_bias=((42, 100.0),)))[0]
    assert forced.token_ids == [42] * 6

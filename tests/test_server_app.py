"""The server's app in-process (Starlette's TestClient) over a micro model with a chat template: requests that
finish at their first step, a step that fails, the chat API's defaults, and sandboxed chat templates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import nanoseek
from helpers import micro_model_dir
from nanoseek.infer.chat import ChatTemplate
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.engine_loop import EngineLoop
from nanoseek.infer.request import SamplingParams
from nanoseek.infer.server import create_app

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return micro_model_dir(
        tmp_path_factory.mktemp("app-model"), "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, chat=True
    )


@pytest.fixture(scope="module")
def app(model_dir):
    return create_app(model_dir, config=EngineConfig(block_size=16, max_seqs=8))


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


def test_a_sequence_finished_by_its_first_step_is_delivered(model_dir, monkeypatch):
    """The step thread may finish a sequence (max_tokens 1) before `submit` returns: its result still arrives."""
    engine = Engine(nanoseek.load_pretrained(model_dir))
    loop_runner = EngineLoop(engine)
    real_add = engine.add

    def add_then_let_a_step_finish_it(prompt, params, after=None):  # the race, made certain
        seq = real_add(prompt, params, after)
        loop_runner.wake.set()
        deadline = time.monotonic() + 2
        while seq.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return seq

    monkeypatch.setattr(engine, "add", add_then_let_a_step_finish_it)

    async def first_result() -> str:
        job = loop_runner.submit([[1, 2, 3]], SamplingParams(max_new_tokens=1), 1, asyncio.get_running_loop())
        while (event := await asyncio.wait_for(job.events.get(), timeout=10))[0] != "done":
            pass
        return event[2].finish_reason

    assert asyncio.run(first_result()) == "length"


def test_max_tokens_1_under_load(client):
    def ask(i: int) -> int:
        response = client.post("/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 1, "ignore_eos": True})
        return response.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, range(48))) == [1] * 48


def test_a_failed_step_answers_500_and_forgets_its_requests(app, client, monkeypatch):
    """A step that raises after one of its sequences finished (max_tokens 1): every client of the step is told, no
    job is left behind, and the next request is served."""
    engine, failures = app.state.engine, []
    real_commit = engine._commit

    def commit_then_fail(seq, result):
        produced = real_commit(seq, result)
        if seq.finish_reason is not None and not failures:
            failures.append(seq)
            raise RuntimeError("device lost")
        return produced

    monkeypatch.setattr(engine, "_commit", commit_then_fail)
    failed = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1, "ignore_eos": True})
    assert failed.status_code == 500 and "generation failed: device lost" in failed.json()["error"]["message"]
    served = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True})
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4
    assert failures and app.state.loop.jobs == {}
    assert engine.stats()["running"] == 0 and engine.blocks.used_blocks == 0


def test_chat_replies_may_fill_the_context_and_take_max_completion_tokens(app, client):
    full = client.post("/v1/chat/completions", json=CHAT).json()
    assert full["usage"]["total_tokens"] == app.state.engine.max_len  # OpenAI's default: the rest of the context
    assert full["choices"][0]["finish_reason"] == "length"
    short = client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3, "max_tokens": 9}).json()
    assert short["usage"]["completion_tokens"] == 3  # the current name wins over the deprecated one


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # a walk to Python's internals
        "{% set _ = messages.append(messages[0]) %}{{ messages | length }}",  # mutating what it was given
    ],
)
def test_chat_templates_render_sandboxed(tmp_path, template):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(ValueError, match="cannot render"):
        ChatTemplate(tmp_path).render([{"role": "user", "content": "hi"}])


def test_echo_scores_the_prompt_with_the_models_logprobs(app, client):
    """lm-evaluation-harness's request: token-id prompts in a batch, echo, logprobs 1, max_tokens 0 or 1. Each
    prompt token after the first gets the model's logprob given those before it; the first gets null."""
    model = app.state.engine.model
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 250]]
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 0,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    with torch.no_grad():
        for tokens, choice in zip(prompts, out["choices"]):
            reference = model(torch.tensor([tokens]))[0].log_softmax(-1)
            logprobs = choice["logprobs"]
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert logprobs["token_logprobs"][1:] == pytest.approx(
                [reference[i, t].item() for i, t in enumerate(tokens[1:])], abs=1e-5
            )
            assert [max(top.values()) for top in logprobs["top_logprobs"][1:]] == pytest.approx(
                reference[:-1].max(-1).values.tolist(), abs=1e-5
            )
            assert choice["text"] == "".join(logprobs["tokens"]) and logprobs["text_offset"][0] == 0
    one = client.post("/v1/completions", json={**body, "max_tokens": 1, "prompt": prompts[0]}).json()["choices"][0]
    assert len(one["logprobs"]["token_logprobs"]) == len(prompts[0]) + 1  # the prompt, then the generated token


def test_tokenizer_endpoints_round_trip(client):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["model_max_length"] == 128
    tokens = client.post("/tokenize", json={"prompt": "hello there", "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hello there"}
    assert client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


@pytest.mark.parametrize("field", ["tools", "response_format", "suffix", "functions"])
def test_fields_that_do_not_work_are_refused(client, field):
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", CHAT)):
        response = client.post(path, json={**body, field: {"type": "json_object"}})
        assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_stream_options_include_usage_and_text_parts(client):
    body = {
        **CHAT,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}
        ],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    plain = client.post(
        "/v1/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": "hello\nthere"}], "max_tokens": 3},
    ).json()
    assert plain["usage"]["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"]


def test_best_of_returns_the_most_likely_candidates(client):
    body = {"prompt": "hello", "max_tokens": 5, "temperature": 1.0, "seed": 3, "ignore_eos": True, "logprobs": 0}
    candidates = client.post("/v1/completions", json={**body, "n": 4}).json()["choices"]
    chosen = client.post("/v1/completions", json={**body, "n": 2, "best_of": 4}).json()["choices"]
    ranked = sorted(candidates, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert [c["text"] for c in chosen] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in chosen] == [0, 1]


def test_sampling_fields_reach_the_engine(client):
    """logit_bias forces a token through HTTP; the penalties, min_tokens and repetition_penalty are taken; bad values
    are a 400 naming the field."""
    forced = client.post(
        "/v1/completions",
        json={
            "prompt": "hello",
            "max_tokens": 4,
            "logit_bias": {"42": 100},
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "repetition_penalty": 1.2,
            "min_tokens": 2,
        },
    ).json()
    assert client.post("/detokenize", json={"tokens": [42] * 4}).json()["prompt"] == forced["choices"][0]["text"]
    for field, value in (
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"42": 101}),
        ("presence_penalty", 3),
        ("min_tokens", 9),
        ("repetition_penalty", 0),
        ("logit_bias", {"100000": 1}),
    ):
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, field: value})
        assert response.status_code == 400, (field, value)
        assert field in response.json()["error"]["message"] or response.json()["error"]["param"] == field


def test_serving_in_bf16_on_the_cpu(tmp_path):
    """--dtype bf16 on a CPU: weights and latent store in bf16, /v1/models says so, and the prompt's scores are
    those of the same bf16 weights computed in fp32, to bf16 accuracy (a few 2⁻⁸ of the largest logit; weights at
    std 0.2, so that logits span units and another model's scores would be far off)."""
    from fastapi.testclient import TestClient

    model_dir = micro_model_dir(
        tmp_path, "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, chat=True, std=0.2
    )
    bf16 = create_app(model_dir, device=torch.device("cpu"), dtype=torch.bfloat16)
    prompt = [5, 17, 42, 8, 99, 3]
    with TestClient(bf16) as bf16_client:
        card = bf16_client.get("/v1/models").json()["data"][0]
        out = bf16_client.post(
            "/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2}
        ).json()
    assert (card["dtype"], card["device"], card["max_model_len"]) == ("bfloat16", "cpu", 128)
    engine = bf16.state.engine
    assert engine.runner.store.dtype == next(engine.model.parameters()).dtype == torch.bfloat16
    rounded = nanoseek.load_pretrained(model_dir, dtype=torch.bfloat16).float()  # the bf16 weights, fp32 compute
    with torch.no_grad():
        logits = rounded(torch.tensor([prompt]))[0]
    reference = logits.log_softmax(-1)
    want = torch.tensor([reference[i, t].item() for i, t in enumerate(prompt[1:])])
    got = torch.tensor(out["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)])
    assert logits.abs().max() > 3 and (got - want).abs().max() <= 4 * 2**-8 * logits.abs().max()


@pytest.mark.parametrize(
    "device, needle", [("cuda:7", "no such CUDA device"), ("tpu", "not a device"), ("meta", "runs on cpu or cuda")]
)
def test_a_device_that_cannot_be_used_is_one_line(model_dir, capsys, device, needle):
    from nanoseek.cli import main

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["generate", str(model_dir), "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek: error: --device") and needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("closed", "not an open socket"),
        ("file", "not an open socket"),
        ("unbound", "not a listening TCP socket"),
        ("udp", "not a listening TCP socket"),
    ],
)
def test_a_socket_that_cannot_be_served_on_is_one_line(model_dir, tmp_path, capsys, kind, needle):
    """`serve --fd N` refuses, before loading the model, a descriptor that is not a listening TCP socket."""
    import socket

    from nanoseek.cli import main

    with contextlib.ExitStack() as stack:
        if kind == "closed":
            fd = socket.socket().detach()
            os.close(fd)
        elif kind == "file":
            fd = stack.enter_context(open(tmp_path / "f", "w")).fileno()
        else:
            fd = stack.enter_context(
                socket.socket(type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
            ).fileno()
        assert main(["serve", str(model_dir), "--fd", str(fd)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nanoseek: error: --fd {fd}") and needle in err and len(err.splitlines()) == 1, err


def test_metrics_have_latency_histograms(client):
    def scrape() -> dict[str, float]:
        text = client.get("/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}

    before = scrape()
    for _ in range(3):
        client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "ignore_eos": True})
    after = scrape()
    for name in ("queue_time_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds"):
        count = f"nanoseek_{name}_count"
        assert after[count] - before.get(count, 0) == 3, name
        buckets = [v for k, v in after.items() if k.startswith(f"nanoseek_{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[count]  # cumulative, +Inf = count
        assert after[f"nanoseek_{name}_sum"] > before.get(f"nanoseek_{name}_sum", 0)


@pytest.mark.parametrize("generation", ["v32", "v4"])
def test_sparse_and_compressed_models_served_over_http_give_the_full_forwards_greedy_tokens(tmp_path, generation):
    """DeepSeek-V3.2 (the indexer's top-k over the paged store) and V4 (sliding window, CSA/HCA entries, hyper-
    connections) behind the HTTP API: a greedy completion is the detokenized argmax of the full forward, re-run on
    the growing sequence, past the window and the indexer's top-k."""
    from fastapi.testclient import TestClient

    from helpers import V32, full_forward_greedy, randomize_, tiny_config
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer, write_tokenizer_files
    from nanoseek.models.deepseek_v4.config import CSA, HCA, SLIDING

    config = (
        tiny_config(vocab_size=320, **V32)
        if generation == "v32"
        else nanoseek.preset("tiny-v4").replace(
            vocab_size=320,
            hidden_size=32,
            num_attention_heads=2,
            head_dim=16,
            qk_rope_head_dim=8,
            q_lora_rank=16,
            moe_intermediate_size=16,
            max_position_embeddings=64,
            num_hidden_layers=3,
            layer_types=(SLIDING, CSA, HCA),
            mlp_layer_types=("hash_moe", "moe", "moe"),
            sliding_window=8,
            compress_rate_hca=8,
            o_lora_rank=8,
            index_head_dim=8,
            index_topk=2,
            hc_mult=2,
        )
    )
    torch.manual_seed(0)
    model = randomize_(nanoseek.build_model(config).eval(), std=0.15)
    nanoseek.save_pretrained(model, tmp_path)
    write_tokenizer_files(train_tokenizer(["User: hello there\nAssistant: good morrow\n" * 50], 300), tmp_path)
    prompt = load_tokenizer(tmp_path / "tokenizer.json").encode("User: hello there, good morrow to thee").ids
    ids = prompt + full_forward_greedy(model, prompt, 12)
    with TestClient(create_app(tmp_path, config=EngineConfig(block_size=4))) as client:
        reply = client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == load_tokenizer(tmp_path / "tokenizer.json").decode(ids[len(prompt) :])
    assert len(ids) > 2 * config.sliding_window if generation == "v4" else len(prompt) > config.index_topk

"""`nanoseek serve` as a real process on loopback, driven by the official openai client and raw HTTP: the OpenAI
API, continuous batching seen from outside, prefix caching, cancellation, /health, /metrics and SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.launch import start_serve

API_KEY = "sk-test"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _start(model_dir, *flags: str, api_key: str | None = API_KEY) -> tuple[subprocess.Popen, str]:
    return start_serve(model_dir, *(["--api-key", api_key] if api_key else []), *flags, timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny preset's shape (256 tokens of context), random weights, a tokenizer trained on a little dialogue."""
    model_dir = tmp_path_factory.mktemp("served") / "tiny-model"
    text = "User: hello there\nAssistant: good morrow, my lord\n" * 200
    tokenizer = train_tokenizer([text], 300)
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.build_model(nanoseek.preset("tiny").replace(vocab_size=320)), model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    return model_dir


@pytest.fixture(scope="module")
def server(model_dir):
    process, base = _start(model_dir)
    yield f"{base}/v1", model_dir.name, model_dir
    process.kill()
    process.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=60)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server[0].removesuffix("/v1") + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def test_models_and_completions(server, client):
    assert [m.id for m in client.models.list().data] == [server[1]]
    out = client.completions.create(model=server[1], prompt="User: hello", max_tokens=8, temperature=0)
    again = client.completions.create(model=server[1], prompt="User: hello", max_tokens=8, temperature=0)
    assert out.choices[0].text == again.choices[0].text and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    streamed = client.completions.create(
        model=server[1], prompt="User: hello", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_greedy_over_http_equals_the_engine_and_the_full_forward(server, client, model_dir):
    """The same tokens three ways: argmax of the full forward re-run on the growing sequence (no cache), the engine
    (paged cache, MTP speculation), and the server's text, which is their detokenization exactly (not stripped);
    a chat reply streamed or not."""
    from helpers import full_forward_greedy
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.request import SamplingParams

    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    prompt = tokenizer.encode("User: hello there").ids
    model = nanoseek.load_pretrained(model_dir).eval()
    expected = full_forward_greedy(model, prompt, 10)
    engine = Engine(model).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    assert engine.token_ids == expected
    served = client.completions.create(
        model=server[1], prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert served.choices[0].text == tokenizer.decode(expected) and served.usage.completion_tokens == 10


def test_stop_strings_and_sampling_fields_over_http(server, client, model_dir):
    """What each field does, seen from a client: a stop string cuts the greedy text before it (finish_reason
    "stop"); top_k=1 at temperature 1 is greedy; a seed repeats a sample and another seed gives another; a large
    logit_bias makes every token the biased one."""
    from nanoseek.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir / "tokenizer.json")

    def complete(max_tokens=12, extra=None, **fields):
        return client.completions.create(
            model=server[1],
            prompt="User: hello",
            max_tokens=max_tokens,
            extra_body={"ignore_eos": True, **(extra or {})},
            **fields,
        ).choices[0]

    greedy = complete(temperature=0).text
    stop = greedy[len(greedy) // 2 :][:3]
    cut = complete(temperature=0, stop=[stop])
    assert stop and cut.finish_reason == "stop" and cut.text == greedy[: greedy.index(stop)]
    assert complete(temperature=1.0, extra={"top_k": 1}).text == greedy
    samples = [complete(temperature=1.5, seed=seed).text for seed in (1, 1, 2)]
    assert samples[0] == samples[1] != samples[2]
    token = tokenizer.encode(" lord").ids[-1]
    assert complete(temperature=1.0, logit_bias={str(token): 100}).text == tokenizer.decode([token] * 12)


def test_token_prompts_logprobs_and_n(server, client, model_dir):
    from nanoseek.data.tokenizer import load_tokenizer

    ids = load_tokenizer(model_dir / "tokenizer.json").encode("User: hello").ids
    by_text = client.completions.create(
        model=server[1], prompt="User: hello", max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    by_ids = client.completions.create(
        model=server[1], prompt=ids, max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    logprobs = by_ids.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(
        len(top) <= 3 and max(top.values()) <= lp + 1e-6  # greedy: the chosen token is the most likely
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs)
    )  # (texts may coincide)
    several = client.completions.create(
        model=server[1],
        prompt="User: hello " * 30,
        max_tokens=12,
        n=4,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3] and several.usage.completion_tokens == 48
    assert len({c.text for c in several.choices}) > 1  # independent samples, one shared prompt
    chat = client.chat.completions.create(
        model=server[1],
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert 0 < len(content) <= 4 and all(len(c.top_logprobs) == 2 for c in content)


def test_chat(server, client):
    messages = [{"role": "system", "content": "Speak as in a play."}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=server[1], messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    chunks = list(
        client.chat.completions.create(model=server[1], messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_repeated_chat_reuses_the_cached_prefix(server, client):
    messages = [
        {"role": "system", "content": "Speak as in a play, my lord, and good morrow to thee. " * 3},
        {"role": "user", "content": "hello there"},
    ]
    first = client.chat.completions.create(model=server[1], messages=messages, max_tokens=12, temperature=0)
    second = client.chat.completions.create(model=server[1], messages=messages, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens > 64 and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    assert second.choices[0].message.content == first.choices[0].message.content


def test_short_requests_overtake_a_long_one(server, client):
    """Continuous batching: 4 short requests sent 0.5 s into a long streaming generation join its batch and finish
    first; their time to first token is a small fraction of the long request's duration."""
    long_done: dict[str, float] = {}

    def long_request() -> None:
        start = time.perf_counter()
        stream = client.completions.create(
            model=server[1],
            prompt="User: hello",
            max_tokens=240,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        long_done["tokens"] = sum(1 for _ in stream)
        long_done["end"], long_done["duration"] = time.perf_counter(), time.perf_counter() - start

    def short_request(i: int) -> tuple[float, float]:
        start = time.perf_counter()
        stream = client.completions.create(
            model=server[1],
            prompt=f"User: hi {i}",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = None
        for _ in stream:
            first = first or time.perf_counter() - start
        return first, time.perf_counter()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)
    with ThreadPoolExecutor(4) as pool:
        shorts = list(pool.map(short_request, range(4)))
    thread.join()
    assert long_done["tokens"] > 100  # it streamed most of the context
    assert all(end < long_done["end"] for _, end in shorts)
    assert max(ttft for ttft, _ in shorts) < 0.25 * long_done["duration"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_is_cancelled(server, stream):
    before = _metrics(server)["nanoseek_generation_tokens_total"]
    body = {"prompt": "User: hello", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server[0]}/completions", headers=HEADERS, json=body) as response:
            next(response.iter_lines())  # one event, then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server[0]}/completions", headers=HEADERS, json=body, timeout=0.6)
    time.sleep(1.5)  # the server notices within its 0.5 s poll
    settled = _metrics(server)
    time.sleep(1.0)
    after = _metrics(server)
    assert after["nanoseek_requests_running"] == 0
    assert after["nanoseek_generation_tokens_total"] == settled["nanoseek_generation_tokens_total"]
    assert after["nanoseek_generation_tokens_total"] - before < 240


def test_health_and_metrics(server, client):
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json() == {"status": "ok"}
    client.completions.create(model=server[1], prompt="User: hello", max_tokens=4, temperature=0)
    metrics = _metrics(server)
    assert metrics["nanoseek_cache_tokens_capacity"] == 64 * metrics["nanoseek_cache_blocks_total"] > 0
    assert metrics["nanoseek_generation_tokens_total"] >= 4 and metrics["nanoseek_prompt_tokens_total"] > 0
    assert metrics["nanoseek_spec_draft_tokens_total"] > 0  # the model has an MTP module: speculation is on
    assert 0 <= metrics["nanoseek_spec_acceptance_rate"] <= 1 and 0 <= metrics["nanoseek_prefix_cache_hit_rate"] <= 1
    for name in (
        "nanoseek_requests_waiting",
        "nanoseek_cache_usage_ratio",
        "nanoseek_preemptions_total",
        "nanoseek_generation_tokens_per_second",
    ):
        assert name in metrics


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404, "does not exist"),
        (json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
        (json.dumps({"prompt": "hello " * 400, "max_tokens": 4}).encode(), 400, "context"),
        (json.dumps({"prompt": 12}).encode(), 400, "prompt"),
        (json.dumps({"prompt": [1, 2, 100000]}).encode(), 400, "vocabulary"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"prompt": "hi", "n": 99}).encode(), 400, "'n'"),
        (json.dumps({"prompt": "hi", "logprobs": 50}).encode(), 400, "logprobs"),
    ],
)
def test_bad_requests_get_json_4xx(server, body, status, needle):
    response = httpx.post(
        f"{server[0]}/completions", content=body, headers={**HEADERS, "Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_api_key_required(server):
    response = httpx.post(f"{server[0]}/completions", json={"prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    bad_chat = httpx.post(f"{server[0]}/chat/completions", json={"messages": [{"role": "x"}]}, headers=HEADERS)
    assert bad_chat.status_code == 400 and "messages" in bad_chat.json()["error"]["message"]


def test_fifty_concurrent_clients(server, client):
    def ask(i: int) -> str:
        out = client.completions.create(model=server[1], prompt=f"User: hello {i}", max_tokens=6, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    assert answers[3] == ask(3)  # batched with 49 others or alone: the same greedy answer


def test_sigterm_finishes_running_requests_then_exits_0(model_dir):
    """While it drains, the server still answers: /health and new requests get 503 (a load balancer sees the drain
    instead of a refused connection); the running stream ends complete, then the process exits 0."""
    process, base = _start(model_dir)
    try:
        body = {"prompt": "User: hello", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", headers=HEADERS, json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = httpx.get(f"{base}/health", timeout=5)
            refused = httpx.post(f"{base}/v1/completions", headers=HEADERS, json={"prompt": "hi"}, timeout=5)
            rest = [line for line in lines if line]
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()


def _resident_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("seconds", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_soak_64_clients_with_disconnects_and_429s(model_dir, seconds):
    """64 concurrent streaming clients, a tenth of them hanging up mid-stream, against a queue bounded at 16, for
    `seconds` after a warm-up: every request ends in a full stream or a 429 with Retry-After, and resident memory
    stays within 10 % of its level after warm-up. The 30 s soak runs under `pytest -m slow`."""
    process, base = _start(model_dir, "--max-seqs", "16", "--max-waiting", "16")
    outcomes: dict[str, int] = {"done": 0, "429": 0, "hung_up": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(index: int, rounds: int) -> None:
        with httpx.Client(headers=HEADERS, timeout=60) as http:
            for r in range(rounds):
                body = {
                    "prompt": f"User: hello {index} {r}",
                    "max_tokens": 24,
                    "temperature": 0.7,
                    "ignore_eos": True,
                    "stream": True,
                    "seed": index,
                }
                with http.stream("POST", f"{base}/v1/completions", json=body) as response:
                    if response.status_code == 429:
                        kind = "429" if response.headers.get("retry-after") else "429 without Retry-After"
                        time.sleep(float(response.headers.get("retry-after", 1)) * 0.1)
                    elif response.status_code != 200:
                        kind = f"status {response.status_code}"
                    elif index % 10 == 0:  # hang up after the first event
                        next(response.iter_lines())
                        kind = "hung_up"
                    else:
                        lines = [line for line in response.iter_lines() if line]
                        finished = lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
                        kind = "done" if finished else f"stream {lines[-2:]}"
                with lock:
                    if kind in outcomes:
                        outcomes[kind] += 1
                    else:
                        failures.append(kind)

    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            list(pool.map(lambda i: client_loop(i, 2), range(64)))  # warm-up: every allocation path taken once
        warm = _resident_bytes(process.pid)
        deadline = time.time() + seconds
        with ThreadPoolExecutor(max_workers=64) as pool:
            while time.time() < deadline:
                list(pool.map(lambda i: client_loop(i, 2), range(64)))
        time.sleep(1.0)
        end = _resident_bytes(process.pid)
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        process.kill()
    print(f"soak: {outcomes}, resident {warm / 2**20:.1f} MiB after warm-up, {end / 2**20:.1f} MiB at the end")
    assert not failures, (len(failures), failures[:3])
    # hang-ups: at most 14 a round (clients 0, 10, ..., 60, twice), fewer when the queue answers them 429 first
    assert outcomes["done"] > 50 + 5 * seconds and outcomes["429"] > 0 and outcomes["hung_up"] > 0, outcomes
    assert "nanoseek_requests_running 0" in metrics  # every hung-up stream was aborted
    assert end <= 1.10 * warm, f"resident memory grew from {warm / 2**20:.0f} to {end / 2**20:.0f} MiB"

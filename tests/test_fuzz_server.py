"""Property-based fuzzing of every HTTP endpoint's request body (hypothesis, fixed seeds, bounded example counts):
whatever arrives, the answer is a 2xx or a 4xx in the OpenAI error format, never a 500 or a hang. The server runs
in-process (Starlette's TestClient) over a micro model, so a few hundred requests take seconds."""

from __future__ import annotations

import json

import pytest
from hypothesis import event
from hypothesis import strategies as st

from helpers import fuzz, micro_model_dir
from nanoseek.infer.engine import EngineConfig
from nanoseek.infer.protocol import CHAT_FIELDS, COMPLETION_FIELDS
from nanoseek.infer.server import ServerLimits, create_app

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
JSON = {"content-type": "application/json"}
# every field either endpoint accepts, and two it refuses
FIELDS = (*sorted(COMPLETION_FIELDS | CHAT_FIELDS), "tools", "suffix")
CONTEXT = 128  # the micro model's max_position_embeddings (tiny_config)
VOCAB = 320  # the micro model's vocabulary; its tokenizer's is 300

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats()  # NaN and ±Infinity too
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
small_ints = st.integers(-3, 300)
# ids below 0, inside, at and past the end of the model's vocabulary (and the tokenizer's, which is smaller)
token_ids = st.integers(-3, VOCAB + 20) | st.sampled_from([299, 300, VOCAB - 1, VOCAB, VOCAB + 1])
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
            "content": st.text(max_size=30) | json_values,
        }
    ),
    max_size=4,
)
penalties = st.floats(-3, 3) | st.integers(-3, 3)
# plausible values per field, and anything at all: what clients send is mostly almost right
field_values = {
    "prompt": st.text(max_size=60)
    | st.text(min_size=CONTEXT, max_size=4 * CONTEXT)  # past the context too
    | st.lists(token_ids, max_size=20)
    | st.lists(token_ids, min_size=CONTEXT - 8, max_size=CONTEXT + 40)
    | st.lists(st.text(max_size=10), max_size=2)
    | st.lists(st.lists(token_ids, max_size=8), max_size=3),
    "messages": messages,
    "max_tokens": small_ints,
    "max_completion_tokens": small_ints,
    "n": st.integers(-1, 20),
    "best_of": st.integers(-1, 8),
    "top_k": small_ints,
    "min_tokens": st.integers(-2, 20),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-(1 << 65), 1 << 65),
    "presence_penalty": penalties,
    "frequency_penalty": penalties,
    "repetition_penalty": st.floats(-1, 2e3),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_values}) | json_values,
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "cache_salt": st.text(max_size=300),
    "logprobs": st.booleans() | st.integers(-1, 25),
    "top_logprobs": st.integers(-1, 25),
    "model": st.text(max_size=8),
    "logit_bias": st.dictionaries(
        token_ids.map(str) | st.text(max_size=4), st.floats() | st.integers(-200, 200), max_size=4
    ),
}
assert set(FIELDS) - set(field_values) <= {"user", "tools", "suffix"}  # every accepted field has its strategies
VALID = {
    "/v1/completions": {"prompt": "hello there", "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
}


@st.composite
def bodies(draw, endpoint: str) -> dict:
    """A valid request with some fields dropped and some set to plausible or arbitrary values."""
    body = {k: v for k, v in VALID[endpoint].items() if draw(st.booleans()) or draw(st.booleans())}
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True))
    body.update(
        {
            name: draw(
                field_values.get(name, json_values) | json_values
                if draw(st.booleans())
                else field_values.get(name, json_values)
            )
            for name in fields
        }
    )
    for limit in ("max_tokens", "max_completion_tokens"):  # quick examples, except now and then up to the context
        value = body.get(limit)
        if isinstance(value, int) and not isinstance(value, bool) and value > 12 and not draw(st.integers(0, 9)) == 0:
            body[limit] = 1 + value % 12
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    model_dir = micro_model_dir(
        tmp_path_factory.mktemp("fuzz-model"), "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, chat=True
    )
    app = create_app(
        model_dir,
        config=EngineConfig(block_size=16, max_seqs=8),
        limits=ServerLimits(max_waiting=64, max_body_bytes=4096),
    )
    with TestClient(app) as test_client:
        yield test_client


def _check(response) -> None:
    """A 2xx with a JSON or SSE body, or a 4xx with an OpenAI error object."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        for item in events[:-1]:
            assert "error" not in json.loads(item), item
    else:
        assert response.json()["choices"]


@fuzz(150, 1000, data=st.data(), endpoint=st.sampled_from(ENDPOINTS))
def test_request_bodies_get_an_answer_or_a_4xx(client, data, endpoint):
    body = json.dumps(data.draw(bodies(endpoint)))  # as Python writes it: NaN and Infinity as bare words
    response = client.post(endpoint, content=body.encode(), headers=JSON)
    event(f"status {response.status_code}")
    _check(response)
    sent = json.loads(body)
    prompt, limit = sent.get("prompt"), sent.get("max_tokens")
    if response.status_code < 300 and isinstance(prompt, list) and prompt and all(_integer(i) for i in prompt):
        assert all(0 <= i < VOCAB for i in prompt), "a prompt with ids outside the vocabulary was accepted"
        assert not _integer(limit) or len(prompt) + limit <= CONTEXT, "a prompt past the context was accepted"


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@fuzz(
    30,
    200,
    endpoint=st.sampled_from(ENDPOINTS + ("/v1/models", "/health", "/metrics", "/v1/nope", "/")),
    raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
)
def test_raw_bytes_on_every_path_and_method(client, endpoint, raw, method, content_type):
    response = client.request(method, endpoint, content=raw, headers={"content-type": content_type})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@fuzz(
    20,
    100,
    endpoint=st.sampled_from(ENDPOINTS),
    name=st.sampled_from(FIELDS),
    number=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
    | st.integers(1, 6000).map(lambda digits: "9" * digits),
)
def test_numbers_json_has_no_room_for(client, endpoint, name, number):
    """NaN, infinities, doubles past their range and integers past Python's 4,300 digits, in any field."""
    body = json.dumps({k: v for k, v in VALID[endpoint].items() if k != name})[:-1] + f', "{name}": {number}}}'
    response = client.post(endpoint, content=body.encode(), headers=JSON)
    event(f"status {response.status_code}")
    _check(response)


def test_deep_nesting_and_oversized_bodies(client):
    deep = "[" * 100_000 + "]" * 100_000
    assert client.post("/v1/completions", content=deep[:4000], headers=JSON).status_code == 400
    too_large = client.post("/v1/completions", content=b"{" + b" " * 5000 + b"}", headers=JSON)
    assert too_large.status_code == 413 and "4096 bytes" in too_large.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while the body streams in
        for _ in range(10):
            yield b" " * 1000

    assert client.post("/v1/completions", content=chunked(), headers=JSON).status_code == 413
    unknown = client.get("/v2/anything")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "GET /v2/anything: Not Found"
    assert client.get("/v1/completions").status_code == 405

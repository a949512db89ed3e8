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
from nanoseek.infer.server import ServerLimits, create_app

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
JSON = {"content-type": "application/json"}
FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
          "logprobs", "top_logprobs", "ignore_eos", "user", "presence_penalty", "logit_bias", "cache_salt", "echo",
          "best_of", "repetition_penalty")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()  # NaN and ±Infinity too
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12)
small_ints = st.integers(-3, 300)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                           "content": st.text(max_size=30) | json_values}), max_size=4)
# plausible values per field, and anything at all: what clients send is mostly almost right
field_values = {
    "prompt": st.text(max_size=60) | st.lists(small_ints, max_size=20) | st.lists(st.text(max_size=10), max_size=2),
    "messages": messages, "max_tokens": small_ints, "n": st.integers(-1, 20), "top_k": small_ints,
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "seed": st.integers(-(1 << 65), 1 << 65),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6), "stream": st.booleans(),
    "logprobs": st.booleans() | st.integers(-1, 25), "top_logprobs": st.integers(-1, 25), "model": st.text(max_size=8),
    "logit_bias": st.dictionaries(st.integers(-2, 400).map(str) | st.text(max_size=4),
                                  st.floats() | st.integers(-200, 200), max_size=4),
}
VALID = {"/v1/completions": {"prompt": "hello there", "max_tokens": 4},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}}


@st.composite
def bodies(draw, endpoint: str) -> dict:
    """A valid request with some fields dropped and some set to plausible or arbitrary values."""
    body = {k: v for k, v in VALID[endpoint].items() if draw(st.booleans()) or draw(st.booleans())}
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True))
    body.update({name: draw(field_values.get(name, json_values) | json_values if draw(st.booleans()) else
                            field_values.get(name, json_values)) for name in fields})
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 0:
        body["max_tokens"] = 1 + body["max_tokens"] % 12  # keeps each example quick; the bounds are fuzzed below 1
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    model_dir = micro_model_dir(tmp_path_factory.mktemp("fuzz-model"),
                                "User: hello there\nAssistant: good morrow\n" * 50, 300, 320, chat=True)
    app = create_app(model_dir, config=EngineConfig(block_size=16, max_seqs=8),
                     limits=ServerLimits(max_waiting=64, max_body_bytes=4096))
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


@fuzz(30, 200, endpoint=st.sampled_from(ENDPOINTS + ("/v1/models", "/health", "/metrics", "/v1/nope", "/")),
      raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
      method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
      content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_raw_bytes_on_every_path_and_method(client, endpoint, raw, method, content_type):
    response = client.request(method, endpoint, content=raw, headers={"content-type": content_type})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


JSON = {"content-type": "application/json"}


@fuzz(20, 100, endpoint=st.sampled_from(ENDPOINTS), name=st.sampled_from(FIELDS),
      number=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]) | st.integers(1, 6000).map(
          lambda digits: "9" * digits))
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

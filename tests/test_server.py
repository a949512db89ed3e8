"""`nanoseek serve` as a real process on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import nanoseek
from helpers import tiny_config
from nanoseek.data.tokenizer import train_tokenizer

API_KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served") / "tiny-model"
    text = "User: hello there\nAssistant: good morrow, my lord\n" * 200
    tokenizer = train_tokenizer([text], 300)
    torch.manual_seed(0)
    model = nanoseek.Transformer(tiny_config(vocab_size=320, max_position_embeddings=96))
    nanoseek.save_pretrained(model, model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--port", str(port),
                                "--api-key", API_KEY], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"server did not start: {process.stderr.read().decode()[-2000:]}")
    yield base, model_dir.name, model_dir
    process.kill()
    process.wait()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=60)


def test_models_and_completions(server, client):
    assert [m.id for m in client.models.list().data] == [server[1]]
    out = client.completions.create(model=server[1], prompt="User: hello", max_tokens=8, temperature=0)
    again = client.completions.create(model=server[1], prompt="User: hello", max_tokens=8, temperature=0)
    assert out.choices[0].text == again.choices[0].text and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    streamed = client.completions.create(model=server[1], prompt="User: hello", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_chat(server, client):
    messages = [{"role": "system", "content": "Speak as in a play."}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model=server[1], messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=server[1], messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == out.choices[0].message.content


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "hi", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hello " * 200, "max_tokens": 4}).encode(), 400, "context"),
    (json.dumps({"prompt": 12}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), 400, "temperature"),
])
def test_bad_requests_get_json_4xx(server, body, status, needle):
    response = httpx.post(f"{server[0]}/completions", content=body,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_api_key_required(server):
    response = httpx.post(f"{server[0]}/completions", json={"prompt": "hi"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    bad_chat = httpx.post(f"{server[0]}/chat/completions", json={"messages": [{"role": "x"}]},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert bad_chat.status_code == 400 and "messages" in bad_chat.json()["error"]["message"]


def test_fifty_concurrent_clients_and_a_disconnect(server, client):
    def ask(i: int) -> str:
        out = client.completions.create(model=server[1], prompt=f"User: hello {i}", max_tokens=6, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50
    assert answers[3] == ask(3)  # batched with 49 others or alone: the same greedy answer
    with httpx.stream("POST", f"{server[0]}/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"prompt": "User: hello", "max_tokens": 60, "stream": True}) as response:
        next(response.iter_lines())  # read one event, then hang up mid-stream
    assert client.completions.create(model=server[1], prompt="User: hi", max_tokens=4).choices[0].text is not None


def test_terminal_chat(server):
    result = subprocess.run([sys.executable, "-m", "nanoseek", "chat", str(server[2]), "--max-new-tokens", "5"],
                            input="hello\nhow are you\n\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model>") == 2 and result.stdout.count("you>") == 3

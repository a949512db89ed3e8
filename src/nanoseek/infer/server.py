"""`nanoseek serve`: an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, SSE
streaming). Requests that arrive together are decoded together: a worker thread takes every waiting request (up to
max_batch) into one batch of the engine. Bad requests get an OpenAI-style JSON error with a 4xx status."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.data.tokenizer import check_vocab, end_of_text_id, load_tokenizer
from nanoseek.infer.chat import ChatTemplate, check_messages
from nanoseek.infer.engine import Completion, Engine, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def push(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Batcher:
    """The one thread that runs the model: batches whatever requests are waiting when it is free."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.waiting: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="nanoseek-batcher").start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def _run(self) -> None:
        while True:
            jobs = [self.waiting.get()]
            time.sleep(0.002)  # let requests sent at the same moment join this batch
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.engine.generate(
                    [j.prompt for j in jobs], [j.params for j in jobs],
                    on_token=lambda row, delta, done: jobs[row].push(("delta", delta)) if delta else None,
                    cancelled=lambda row: jobs[row].cancelled)
                for job, result in zip(jobs, results):
                    job.push(("done", result))
            except Exception as e:  # a failed batch must not kill the server: every waiting client is told
                for job in jobs:
                    job.push(("error", f"generation failed: {e}"))


def _sampling(body: dict[str, Any], default_max_tokens: int, stop_token: int | None,
              extra_stops: tuple[str, ...] = ()) -> SamplingParams:
    def number(name: str, default: Any, kind: type, low: float, high: float) -> Any:
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise APIError(400, f"'{name}' must be a {kind.__name__}", name)
        if not low <= value <= high:
            raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
        return kind(value)

    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    return SamplingParams(
        max_new_tokens=number("max_tokens", default_max_tokens, int, 1, 1 << 20),
        temperature=number("temperature", 1.0, float, 0.0, 2.0), top_p=number("top_p", 1.0, float, 1e-9, 1.0),
        top_k=number("top_k", 0, int, 0, 1 << 30) or None, seed=number("seed", None, int, -(1 << 63), 1 << 63),
        stop_token_ids=() if stop_token is None else (stop_token,), stop_strings=tuple(stop) + extra_stops)


def create_app(model_dir: str | Path, api_key: str | None = None, max_batch: int = 16) -> FastAPI:
    model_dir = Path(model_dir)
    model_name = model_dir.resolve().name
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    engine = Engine(load_pretrained(model_dir), decode=tokenizer.decode)
    check_vocab(tokenizer, engine.model.config.vocab_size)
    template, stop_token = ChatTemplate(model_dir), end_of_text_id(tokenizer)
    batcher = Batcher(engine, max_batch)
    app = FastAPI(title="nanoseek", version="0.1")

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                            status_code=e.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return await api_error(request, APIError(401, "invalid or missing API key", kind="authentication_error"))
        return await call_next(request)

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model", model_name) != model_name:
            raise APIError(404, f"the model {body['model']!r} does not exist; this server has {model_name!r}",
                           "model", "model_not_found")
        return body

    def start(request_prompt: str, params: SamplingParams) -> Job:
        prompt = tokenizer.encode(request_prompt).ids
        try:
            engine.check(prompt, params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        job = Job(prompt, params, asyncio.get_running_loop())
        batcher.submit(job)
        return job

    async def run(job: Job, chunk: Any, stream: bool) -> Any:
        """Streams SSE chunks built by chunk(delta, finish_reason), or collects the completion."""
        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "error":
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        return
                    done = kind == "done"
                    yield f"data: {json.dumps(chunk('' if done else value, value.finish_reason if done else None))}\n\n"
                    if done:
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled = True  # no-op when finished; stops decoding for a client that went away

        if stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise APIError(500, value, kind="server_error")
            if kind == "done":
                return value

    def envelope(kind: str, completion_id: str) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": int(time.time()), "model": model_name}

    def usage(job: Job, result: Completion) -> dict[str, int]:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": len(result.token_ids),
                "total_tokens": len(job.prompt) + len(result.token_ids)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nanoseek"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        job = start(prompt, _sampling(body, 16, stop_token))
        cid = f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {**envelope("text_completion", cid), "choices": [choice]}

        result = await run(job, chunk, bool(body.get("stream")))
        if isinstance(result, StreamingResponse):
            return result
        return {**chunk(result.text, result.finish_reason), "usage": usage(job, result)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        try:
            messages = check_messages(body.get("messages"))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        job = start(template.render(messages), _sampling(body, 128, stop_token, template.stop_strings))
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        first = [True]

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
            first[0] = False
            return {**envelope("chat.completion.chunk", cid),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        result = await run(job, chunk, bool(body.get("stream")))
        if isinstance(result, StreamingResponse):
            return result
        message = {"role": "assistant", "content": result.text.strip()}
        return {**envelope("chat.completion", cid), "usage": usage(job, result),
                "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}]}

    return app

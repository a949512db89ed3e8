"""`nanoseek serve`: an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, SSE
streaming) over the continuous-batching engine, plus /health and Prometheus /metrics.

One thread runs the engine's step loop; requests join the running batch at its next step, and a client that goes
away (streaming or not) has its sequences aborted. Load is bounded: past `max_waiting` queued sequences a request
gets 429 with Retry-After, and a body over `max_body_bytes` gets 413 before it is read whole. On SIGTERM the server
stops admitting (new requests and /health get 503 while the listening socket stays open), lets running requests
finish for up to `shutdown_timeout` seconds, aborts the rest, closes the socket and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.data.tokenizer import check_vocab, end_token_ids, load_tokenizer
from nanoseek.infer import protocol
from nanoseek.infer.chat import ChatTemplate, check_messages
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.engine_loop import EngineLoop, Job
from nanoseek.infer.protocol import APIError, ServerLimits
from nanoseek.infer.request import Completion, SamplingParams


def create_app(model_dir: str | Path, api_key: str | None = None, config: EngineConfig | None = None,
               limits: ServerLimits = ServerLimits(), device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> FastAPI:
    """device/dtype: where the weights load and the latent cache lives (default: the CPU in fp32)."""
    model_dir = Path(model_dir)
    model_name = model_dir.resolve().name
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    template = ChatTemplate(model_dir)  # checked before the weights load: a broken template fails at once
    engine = Engine(load_pretrained(model_dir, device, dtype), decode=tokenizer.decode, config=config)
    check_vocab(tokenizer, engine.model.config.vocab_size)
    stop_tokens = end_token_ids(tokenizer)
    runner = EngineLoop(engine)

    async def authenticate(request: Request) -> None:
        """Every route but /health and /metrics (a dependency, not an HTTP middleware: Starlette's middleware hides
        the client's disconnect from the route)."""
        if request.url.path in ("/health", "/metrics"):
            return
        if api_key and not protocol.key_matches(request.headers.get("authorization"), api_key):
            raise APIError(401, "invalid or missing API key", kind="authentication_error")
        if runner.draining and request.method == "POST":
            raise APIError(503, "the server is shutting down", kind="server_error")

    app = FastAPI(title="nanoseek", version="0.2", dependencies=[Depends(authenticate)])
    app.state.engine, app.state.loop = engine, runner

    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text).ids
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the tokenizer's Rust code can panic (a BaseException) on input it mishandles
            raise APIError(400, f"the tokenizer cannot encode this text: {type(e).__name__}") from None

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Unknown paths (404) and methods (405) in the OpenAI error format, like every other error."""
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    async def read_body(request: Request) -> dict[str, Any]:
        body = await protocol.read_json_object(request, limits.max_body_bytes)
        if body.get("model", model_name) != model_name:
            raise APIError(404, f"the model {body['model']!r} does not exist; this server has {model_name!r}",
                           "model", "model_not_found")
        return body

    def start(prompts: list[list[int]], params: SamplingParams, n: int) -> Job:
        if engine.waiting + n * len(prompts) > limits.max_waiting:
            raise APIError(429, f"the server is at capacity ({engine.waiting} sequences waiting); retry later",
                           kind="rate_limit_error", headers={"Retry-After": "1"})
        try:
            return runner.submit(prompts, params, n, asyncio.get_running_loop())
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def until_disconnect(request: Request, job: Job) -> None:
        """A non-streaming client that goes away aborts its job (a streaming response notices on its own)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.push(("gone", 0, None))

    async def events(job: Job, request: Request, stream: bool) -> AsyncIterator[tuple]:
        """The job's events until every choice is done; aborts the job if the client goes away first."""
        remaining = len(job.seqs)
        watcher = None if stream else asyncio.ensure_future(until_disconnect(request, job))
        try:
            while remaining:
                event = await job.events.get()
                if event[0] == "gone":
                    return
                if event[0] == "error":
                    raise APIError(500, event[2], kind="server_error")
                remaining -= event[0] == "done"
                yield event
        finally:
            job.abort()  # a no-op for finished sequences
            if watcher is not None:
                watcher.cancel()

    async def respond(job: Job, request: Request, stream: bool, chunk: Any,
                      usage_chunk: Callable[[list[Completion]], dict[str, Any]] | None = None) -> Any:
        """SSE of chunk(index, delta text, logprobs, finish_reason) dicts (and usage_chunk(the completions) last,
        if given), or the finished completions."""
        if stream:
            async def sse() -> AsyncIterator[str]:
                finished: dict[int, Completion] = {}
                try:
                    async for kind, index, value in events(job, request, True):
                        if kind == "delta":
                            data = chunk(index, value[0], value[1], None)
                        else:
                            finished[index] = value
                            data = chunk(index, "", [], value.finish_reason)
                        yield f"data: {json.dumps(data)}\n\n"
                    if usage_chunk is not None:
                        usage_data = usage_chunk([finished[i] for i in sorted(finished)])
                        yield f"data: {json.dumps(usage_data)}\n\n"
                    yield "data: [DONE]\n\n"
                except APIError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        done: dict[int, Completion] = {}
        async for kind, index, value in events(job, request, False):
            if kind == "done":
                done[index] = value
        if len(done) < len(job.seqs):
            raise APIError(499, "the client closed the request")
        return [done[i] for i in range(len(job.seqs))]

    def envelope(kind: str, completion_id: str) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": int(time.time()), "model": model_name}

    @app.get("/health")
    async def health() -> JSONResponse:
        if runner.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(protocol.prometheus(engine.stats(), list(engine.histograms.values())),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_len,
                                            "dtype": str(engine.dtype).removeprefix("torch."),
                                            "device": str(engine.device)}]}

    end = tokenizer.id_to_token(stop_tokens[0]) if stop_tokens else None  # for a directory without a config

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's endpoint, which lm-evaluation-harness probes to tokenize through the server."""
        return {"bos_token": end, "eos_token": end, "pad_token": end, **template.special,
                "chat_template": template.template, "model_max_length": engine.max_len,
                "tokenizer_class": "PreTrainedTokenizerFast"}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        protocol.check_fields(body, {"model", "prompt", "add_special_tokens"})
        protocol.flag(body, "add_special_tokens")  # the tokenizer adds none either way
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        tokens = encode(body["prompt"])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        protocol.check_fields(body, {"model", "tokens"})
        tokens = body.get("tokens")
        if not (tokens == [] or protocol.token_ids(tokens)) or not all(0 <= t < tokenizer.get_vocab_size()
                                                                       for t in tokens):
            raise APIError(400, "'tokens' must be a list of token ids of the vocabulary", "tokens")
        return {"prompt": tokenizer.decode(tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request)
        protocol.check_fields(body, protocol.COMPLETION_FIELDS)
        prompts = protocol.prompts(body, encode)
        echo, stream = protocol.flag(body, "echo"), protocol.flag(body, "stream")
        usage_last = protocol.include_usage(body, stream)
        n, best_of = protocol.choices(body)
        if stream and (echo or best_of > n):
            raise APIError(400, "'echo' and 'best_of' > 'n' are not supported with 'stream'", "stream")
        top = protocol.completion_logprobs_field(body)
        # best_of ranks its candidates by their logprob, which is computed even when it is not returned
        params = protocol.sampling_params(body, 16, stop_tokens, (), 0 if top is None and best_of > n else top,
                                          prompt_logprobs=(top or 0) if echo else None)
        job = start(prompts, params, best_of)
        cid = f"cmpl-{uuid.uuid4().hex}"

        def choice(index: int, text: str, logprobs: list, finish: str | None,
                   echoed: Completion | None = None) -> dict[str, Any]:
            prompt = prompts[index // n] if echoed is not None else None
            lp = None if top is None else protocol.completion_logprobs(
                logprobs, token_text, None if prompt is None else (prompt[0], echoed.prompt_logprobs or []))
            text = text if prompt is None else tokenizer.decode(prompt) + text
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": lp}

        def chunk(index: int, text: str, logprobs: list, finish: str | None) -> dict[str, Any]:
            return {**envelope("text_completion", cid), "choices": [choice(index, text, logprobs, finish)]}

        def usage_chunk(done: list[Completion]) -> dict[str, Any]:
            return {**envelope("text_completion", cid), "choices": [], "usage": protocol.usage(done, n)}

        result = await respond(job, request, stream, chunk, usage_chunk if usage_last else None)
        if isinstance(result, StreamingResponse):
            return result
        returned = [c for p in range(len(prompts)) for c in protocol.best(result[p * best_of: (p + 1) * best_of], n)]
        return {**envelope("text_completion", cid), "usage": protocol.usage(returned, n),
                "choices": [choice(i, c.text, c.logprobs or [], c.finish_reason, c if echo else None)
                            for i, c in enumerate(returned)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request)
        protocol.check_fields(body, protocol.CHAT_FIELDS)
        try:
            messages = check_messages(body.get("messages"))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        top = protocol.chat_logprobs_field(body)
        try:
            prompt = encode(template.render(messages))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        # as OpenAI's chat API: without a limit, the reply may fill the rest of the context
        params = protocol.sampling_params(body, max(1, engine.max_len - len(prompt)), stop_tokens,
                                          template.stop_strings, top)
        stream = protocol.flag(body, "stream")
        usage_last = protocol.include_usage(body, stream)
        job = start([prompt], params, protocol.choices(body)[0])
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        first = set()

        def chunk(index: int, text: str, logprobs: list, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text else {}
            if index not in first:
                first.add(index)
                delta = {"role": "assistant", "content": text}
            lp = protocol.chat_logprobs(logprobs, token_text) if top is not None else None
            return {**envelope("chat.completion.chunk", cid),
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        def usage_chunk(done: list[Completion]) -> dict[str, Any]:
            return {**envelope("chat.completion.chunk", cid), "choices": [], "usage": protocol.usage(done, len(done))}

        result = await respond(job, request, stream, chunk, usage_chunk if usage_last else None)
        if isinstance(result, StreamingResponse):
            return result
        return {**envelope("chat.completion", cid), "usage": protocol.usage(result, len(result)),
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text.strip()},
                             "logprobs": protocol.chat_logprobs(c.logprobs, token_text) if top is not None else None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(result)]}

    return app


def serve(app: FastAPI, host: str, port: int, shutdown_timeout: float) -> None:
    """Run until SIGTERM/SIGINT: then refuse new requests, give running ones `shutdown_timeout` seconds, abort the
    rest."""
    import uvicorn

    runner: EngineLoop = app.state.loop

    class Server(uvicorn.Server):
        """The first SIGTERM/SIGINT drains while the socket stays open (/health and new requests answer 503, so a
        load balancer sees the drain), then hands over to uvicorn's shutdown; a second signal skips the drain."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if runner.draining:
                self._exit(sig)
                return
            runner.draining = True
            threading.Thread(target=self._drain_then_exit, args=(sig,), daemon=True).start()

        def _drain_then_exit(self, sig: int) -> None:
            if not runner.wait_idle(shutdown_timeout):
                runner.abort_all()  # their clients get what was generated, finish_reason "abort"
            self._exit(sig)

        def _exit(self, sig: int) -> None:
            super().handle_exit(sig, None)
            if sig == signal.SIGTERM and sig in self._captured_signals:  # uvicorn re-raises caught signals after
                self._captured_signals.remove(sig)  # shutting down; SIGTERM ends in 0

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run()
    runner.abort_all()

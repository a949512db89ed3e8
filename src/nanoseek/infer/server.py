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
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.data.tokenizer import TextEncoder, check_vocab, encode_ids, end_token_ids, load_tokenizer
from nanoseek.fp8.stored import resident_bytes
from nanoseek.infer import endpoints, protocol, responses
from nanoseek.infer.chat import ChatTemplate
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.engine_loop import EngineLoop, Job
from nanoseek.infer.protocol import APIError, ServerLimits
from nanoseek.infer.request import SamplingParams


def create_app(
    model_dir: str | Path,
    api_key: str | None = None,
    config: EngineConfig | None = None,
    limits: ServerLimits = ServerLimits(),
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
) -> FastAPI:
    """device/dtype: where the weights load and the latent cache lives (default: the CPU in fp32). allowed_hosts:
    the Host header names served (None: any), the guard against DNS rebinding."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    model_dir = Path(model_dir)
    model_name = model_dir.resolve().name
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    template = ChatTemplate(model_dir)  # checked before the weights load: a broken template fails at once
    model = load_pretrained(model_dir, device, dtype, quantized=True)
    resident = resident_bytes(model) / 2**30
    print(f"nanoseek: {model_name} loaded, {resident:.3f} GiB of weights resident", file=sys.stderr, flush=True)
    engine = Engine(model, decode=tokenizer.decode, config=config)
    check_vocab(tokenizer, engine.model.config.vocab_size)
    stop_tokens = end_token_ids(tokenizer)
    runner = EngineLoop(engine)
    as_text = TextEncoder(tokenizer)
    pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="nanoseek-api")
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower() for h in allowed_hosts}

    async def authenticate(request: Request) -> None:
        """Every route but /health and /metrics (a dependency, not an HTTP middleware: Starlette's middleware hides
        the client's disconnect from the route)."""
        if hosts is not None and protocol.host_name(request.headers.get("host", "")) not in hosts:
            raise APIError(400, "the Host header names no host this server answers to (--allowed-hosts)")
        if request.url.path in ("/health", "/metrics"):
            return
        if api_key and not protocol.key_matches(request.headers.get("authorization"), api_key):
            raise APIError(401, "invalid or missing API key", kind="authentication_error")
        if runner.draining and request.method == "POST":
            raise APIError(503, "the server is shutting down", kind="server_error")

    # the generated docs as routes of their own, so that the key guards them like every other route
    app = FastAPI(
        title="nanoseek",
        version="0.2",
        dependencies=[Depends(authenticate)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine, app.state.loop = engine, runner

    async def offload(work: Callable[..., Any], *args: Any) -> Any:
        """CPU work of a request (parsing, tokenizing, rendering, formatting) on the pool: the event loop only
        moves bytes, so /health and every stream keep answering while a 4 MiB body is tokenized."""
        return await asyncio.get_running_loop().run_in_executor(pool, work, *args)

    def rendered(content: Callable[..., dict[str, Any]], *args: Any) -> JSONResponse:
        """An answer built and serialized together, on the pool: returned as a dict, FastAPI would validate and
        serialize it on the event loop (a million token ids from /tokenize, or echo's prompt logprobs)."""
        return JSONResponse(content(*args))

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return encode_ids(tokenizer, text, add_special_tokens)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # the tokenizer's Rust code can panic (a BaseException) on input it mishandles
            raise APIError(400, f"the tokenizer cannot encode this text: {type(e).__name__}") from None

    @lru_cache(maxsize=1 << 17)  # at most the vocabulary: logprobs name each token's text up to 21 times a step
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

    async def read_body(request: Request, fields: set[str]) -> dict[str, Any]:
        body = await offload(protocol.parse_json_object, await protocol.read_body(request, limits.max_body_bytes))
        if body.get("model", model_name) != model_name:
            raise APIError(
                404,
                f"the model {body['model']!r} does not exist; this server has {model_name!r}",
                "model",
                "model_not_found",
            )
        protocol.check_fields(body, fields)
        return body

    def start(prompts: list[list[int]], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop) -> Job:
        protocol.check_request_size(prompts, params, n, limits)
        if n * len(prompts) > limits.max_waiting:  # could never be queued: no retry would help
            raise APIError(
                400,
                f"the request needs {n * len(prompts)} sequences (n or best_of × prompts); this "
                f"server queues at most {limits.max_waiting} (--max-waiting)",
                "n",
            )
        if engine.waiting + n * len(prompts) > limits.max_waiting:
            raise APIError(
                429,
                f"the server is at capacity ({engine.waiting} sequences waiting); retry later",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        try:
            return runner.submit(prompts, params, n, loop)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def envelope(kind: str, completion_id: str) -> dict[str, Any]:
        return {"id": completion_id, "object": kind, "created": int(time.time()), "model": model_name}

    @app.get("/health")
    async def health() -> JSONResponse:
        if runner.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if runner.failing:
            return JSONResponse({"status": "failing", "error": runner.failing}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            protocol.prometheus(engine.stats(), list(engine.histograms.values())),
            media_type="text/plain; version=0.0.4",
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="nanoseek")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "nanoseek",
                    "max_model_len": engine.max_len,
                    "dtype": str(engine.dtype).removeprefix("torch."),
                    "device": str(engine.device),
                }
            ],
        }

    end = tokenizer.id_to_token(stop_tokens[0]) if stop_tokens else None  # for a directory without a config

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's endpoint, which lm-evaluation-harness probes to tokenize through the server."""
        return {
            "bos_token": end,
            "eos_token": end,
            "pad_token": end,
            **template.special,
            "chat_template": template.template,
            "model_max_length": engine.max_len,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_body(request, {"model", "prompt", "add_special_tokens"})
        special = body.get("add_special_tokens", True)  # vLLM's default: the tokenizer's post-processor runs
        if not isinstance(special, bool):
            raise APIError(400, "'add_special_tokens' must be a boolean", "add_special_tokens")
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "'prompt' must be a string", "prompt")

        def tokens() -> dict[str, Any]:
            ids = encode(body["prompt"], special)
            return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

        return await offload(rendered, tokens)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await read_body(request, {"model", "tokens"})

        def text() -> dict[str, Any]:
            tokens = body.get("tokens")
            if not (tokens == [] or protocol.token_ids(tokens)) or not all(
                0 <= t < tokenizer.get_vocab_size() for t in tokens
            ):
                raise APIError(400, "'tokens' must be a list of token ids of the vocabulary", "tokens")
            return {"prompt": tokenizer.decode(tokens)}

        return await offload(rendered, text)

    context = endpoints.Context(
        tokenizer,
        template,
        as_text,
        encode,
        token_text,
        start,
        envelope,
        stop_tokens,
        limits,
        min(engine.max_len, engine.cache_tokens - 1),
    )

    async def answer(request: Request, fields: set[str], prepare: Callable[..., endpoints.Prepared]) -> Any:
        body = await read_body(request, fields)
        prepared = await offload(prepare, context, body, asyncio.get_running_loop())
        if prepared.stream:
            return responses.stream(prepared.job, request, prepared.chunk, prepared.usage_chunk, offload)
        return await offload(prepared.response, await responses.collect(prepared.job, request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await answer(request, protocol.COMPLETION_FIELDS, endpoints.completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await answer(request, protocol.CHAT_FIELDS, endpoints.chat)

    return app


def serve(app: FastAPI, host: str, port: int, shutdown_timeout: float, listener: socket.socket | None = None) -> None:
    """Run until SIGTERM/SIGINT: then refuse new requests, give running ones `shutdown_timeout` seconds, abort the
    rest. `listener`: an already bound and listening socket to serve on, instead of binding host:port."""
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

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run(sockets=None if listener is None else [listener])
    runner.abort_all()

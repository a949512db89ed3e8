"""A job's events as an HTTP answer: an SSE stream of chunks, or the finished completions. Either way the job is
aborted when its client goes away, also before its first event (the stream's response aborts it whatever ends
it, even a disconnect before it was ever iterated)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nanoseek.infer.engine_loop import Job
from nanoseek.infer.protocol import APIError
from nanoseek.infer.request import Completion

OFFLOADED_LOGPROBS = 64  # a delta with more logprob entries than this is formatted on the worker pool


class JobStream(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abort()  # a no-op for finished sequences


async def _until_disconnect(request: Request, job: Job) -> None:
    """A non-streaming client that goes away aborts its job (a streaming response notices on its own)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.push(("gone", 0, None))


async def events(job: Job, request: Request, stream: bool) -> AsyncIterator[tuple]:
    """The job's events until every choice is done — ("delta", index, (text, logprobs)) and ("done", index,
    completion) — aborting the job if the client goes away first."""
    remaining = len(job.seqs)
    watcher = None if stream else asyncio.ensure_future(_until_disconnect(request, job))
    try:
        while remaining:
            kind, index, value = await job.events.get()
            if kind == "gone":
                return
            if kind == "error":
                raise APIError(500, value, kind="server_error")
            if kind == "delta":
                value = job.take_delta(index)
            remaining -= kind == "done"
            yield kind, index, value
    finally:
        job.abort()
        if watcher is not None:
            watcher.cancel()


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _delta_event(
    chunk: Callable[[int, str, list, str | None], dict[str, Any]], index: int, value: tuple[str, list]
) -> str:
    return _event(chunk(index, value[0], value[1], None))


def stream(
    job: Job,
    request: Request,
    chunk: Callable[[int, str, list, str | None], dict[str, Any]],
    usage_chunk: Callable[[list[Completion]], dict[str, Any]] | None,
    offload: Callable[..., Awaitable[Any]],
) -> JobStream:
    """SSE of chunk(index, delta text, logprobs, finish_reason) dicts (and usage_chunk(the completions) last, if
    given), then [DONE]; a failure mid-stream is an error event. A delta with many logprobs (echo's prompt scores)
    is formatted through offload, off the event loop; the usual few-token delta is not worth the thread hop."""

    async def sse() -> AsyncIterator[str]:
        finished: dict[int, Completion] = {}
        try:
            async for kind, index, value in events(job, request, True):
                if kind == "delta" and len(value[1]) > OFFLOADED_LOGPROBS:
                    yield await offload(_delta_event, chunk, index, value)
                elif kind == "delta":
                    yield _delta_event(chunk, index, value)
                else:
                    finished[index] = value
                    yield _event(chunk(index, "", [], value.finish_reason))
            if usage_chunk is not None:
                yield _event(usage_chunk([finished[i] for i in sorted(finished)]))
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield _event({"error": {"message": e.message, "type": e.kind}})

    return JobStream(sse(), job)


async def collect(job: Job, request: Request) -> list[Completion]:
    """The job's completions in choice order; 499 if the client went away."""
    done: dict[int, Completion] = {}
    async for kind, index, value in events(job, request, False):
        if kind == "done":
            done[index] = value
    if len(done) < len(job.seqs):
        raise APIError(499, "the client closed the request")
    return [done[i] for i in range(len(job.seqs))]

"""/v1/completions and /v1/chat/completions: a parsed body → a submitted job and the functions that format its
events and its result. All of it runs on the server's worker pool, off the event loop: tokenizing, rendering the
chat template, the stop strings' tables and the logprobs' formatting are the CPU work a client controls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from nanoseek.data.tokenizer import TextEncoder
from nanoseek.infer import protocol
from nanoseek.infer.chat import ChatTemplate, check_messages
from nanoseek.infer.engine_loop import Job
from nanoseek.infer.protocol import APIError, ServerLimits
from nanoseek.infer.request import Completion, SamplingParams

Chunk = Callable[[int, str, list, str | None], dict[str, Any]]


@dataclass(frozen=True)
class Context:
    """What the endpoints need of the server."""

    tokenizer: Tokenizer
    template: ChatTemplate
    as_text: TextEncoder
    encode: Callable[[str, bool], list[int]]  # (text, add_special_tokens) → ids, or a 400
    token_text: Callable[[int], str]
    start: Callable[[list[list[int]], SamplingParams, int, asyncio.AbstractEventLoop], Job]
    envelope: Callable[[str, str], dict[str, Any]]  # (object kind, id) → the fields every response has
    stop_tokens: tuple[int, ...]
    limits: ServerLimits
    room: int  # tokens a prompt and its reply may take together (the context, or the cache if smaller)


@dataclass(frozen=True)
class Prepared:
    job: Job
    stream: bool
    chunk: Chunk  # (choice index, new text, its logprobs, finish_reason) → an SSE chunk
    usage_chunk: Callable[[list[Completion]], dict[str, Any]] | None  # the last SSE chunk, when asked
    response: Callable[[list[Completion]], dict[str, Any]]  # the job's completions → the non-streaming body


def completion(ctx: Context, body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Prepared:
    cid = f"cmpl-{protocol.new_id()}"
    prompts = protocol.prompts(body, lambda text: ctx.encode(text, True))
    echo, stream = protocol.flag(body, "echo"), protocol.flag(body, "stream")
    usage_last = protocol.include_usage(body, stream)
    n, best_of = protocol.choices(body)
    if stream and (echo or best_of > n):
        raise APIError(400, "'echo' and 'best_of' > 'n' are not supported with 'stream'", "stream")
    top = protocol.completion_logprobs_field(body)
    # best_of ranks its candidates by their logprob, which is computed even when it is not returned
    params = protocol.sampling_params(
        body,
        ctx.limits,
        16,
        ctx.stop_tokens,
        (),
        0 if top is None and best_of > n else top,
        prompt_logprobs=(top or 0) if echo else None,
    )
    copies = best_of if params.max_new_tokens else 1  # max_tokens 0 (scores only): every choice is the same
    job = ctx.start(prompts, params, copies, loop)

    def choice(
        index: int, text: str, logprobs: list, finish: str | None, echoed: Completion | None = None
    ) -> dict[str, Any]:
        prompt = prompts[index // n] if echoed is not None else None
        lp = (
            None
            if top is None
            else protocol.completion_logprobs(
                logprobs, ctx.token_text, None if prompt is None else (prompt[0], echoed.prompt_logprobs or [])
            )
        )
        text = text if prompt is None else ctx.tokenizer.decode(prompt) + text
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": lp}

    def chunk(index: int, text: str, logprobs: list, finish: str | None) -> dict[str, Any]:
        return {**ctx.envelope("text_completion", cid), "choices": [choice(index, text, logprobs, finish)]}

    def usage_chunk(done: list[Completion]) -> dict[str, Any]:
        return {**ctx.envelope("text_completion", cid), "choices": [], "usage": protocol.usage(done, n)}

    def response(result: list[Completion]) -> dict[str, Any]:
        returned, scored = [], []  # scored: each choice's prompt scores, which only its prompt's first copy holds
        for p in range(len(prompts)):
            candidates = result[p * copies : (p + 1) * copies]
            returned += protocol.best(candidates, n) if copies == best_of else candidates * n
            scored += [candidates[0]] * n
        return {
            **ctx.envelope("text_completion", cid),
            "usage": protocol.usage(returned, n),
            "choices": [
                choice(i, c.text, c.logprobs or [], c.finish_reason, scored[i] if echo else None)
                for i, c in enumerate(returned)
            ],
        }

    return Prepared(job, stream, chunk, usage_chunk if usage_last else None, response)


def chat(ctx: Context, body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Prepared:
    cid = f"chatcmpl-{protocol.new_id()}"
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    top = protocol.chat_logprobs_field(body)
    try:
        prompt = ctx.template.render_ids(messages, lambda text: ctx.encode(text, False), ctx.as_text)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    # as OpenAI's chat API: without a limit, the reply may fill the rest of the context (or of the cache)
    params = protocol.sampling_params(
        body, ctx.limits, max(1, ctx.room - len(prompt)), ctx.stop_tokens, ctx.template.stop_strings, top
    )
    stream = protocol.flag(body, "stream")
    usage_last = protocol.include_usage(body, stream)
    job = ctx.start([prompt], params, protocol.choices(body)[0], loop)
    first = set()

    def logprobs_field(entries: list) -> dict[str, Any] | None:
        return protocol.chat_logprobs(entries, ctx.token_text) if top is not None else None

    def chunk(index: int, text: str, logprobs: list, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        if index not in first:
            first.add(index)
            delta = {"role": "assistant", "content": text}
        return {
            **ctx.envelope("chat.completion.chunk", cid),
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs_field(logprobs), "finish_reason": finish}
            ],
        }

    def usage_chunk(done: list[Completion]) -> dict[str, Any]:
        return {**ctx.envelope("chat.completion.chunk", cid), "choices": [], "usage": protocol.usage(done, len(done))}

    def response(result: list[Completion]) -> dict[str, Any]:
        return {
            **ctx.envelope("chat.completion", cid),
            "usage": protocol.usage(result, len(result)),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_field(c.logprobs),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(result)
            ],
        }

    return Prepared(job, stream, chunk, usage_chunk if usage_last else None, response)

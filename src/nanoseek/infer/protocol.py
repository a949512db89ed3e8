"""The OpenAI wire format: request bodies read within limits, their fields checked into engine settings (a 4xx
naming the field otherwise), API keys compared in constant time, and logprobs, usage and Prometheus metrics written
out."""

from __future__ import annotations

import hmac
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from starlette.requests import Request

from nanoseek.infer.histogram import Histogram
from nanoseek.infer.request import MAX_TOP_LOGPROBS, Completion, SamplingParams, TokenLogprob

MAX_CHOICES = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions request (evaluation harnesses send batches)
SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "ignore_eos",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "cache_salt",
}
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "best_of"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; past each, a 400 naming the field and the flag (429 for the
    queue, 413 for the body)."""

    max_waiting: int = 256  # sequences queued for admission; past it, 429
    max_body_bytes: int = 4 << 20  # a request body larger than this is refused (413) unread
    max_request_tokens: int = 1 << 18  # Σ over prompts of (prompt + max_tokens) × best_of: its prefill and output
    max_stop_length: int = 256  # characters in one stop string
    max_logprob_entries: int = 1 << 17  # (scored prompt tokens + tokens generated with logprobs) × (1 + top)
    workers: int = 4  # threads that parse, tokenize, render and format off the event loop

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"the server limit {name} must be >= 1, got {value}")


def new_id() -> str:
    return uuid.uuid4().hex


def host_name(header: str) -> str:
    """The Host header's name without its port: 'localhost:8000' → 'localhost', '[::1]:8000' → '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time comparison, so that response timing does not reveal how much of a guessed key was right."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {api_key}".encode())


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body: 413 past `max_bytes` (before it is read whole, also when chunked); 415 unless it is
    declared JSON, so that a web page cannot drive a local server with a browser's preflight-free text/plain or
    form POST."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415, f"the request body must be sent as 'Content-Type: application/json', not {media_type or 'none'!r}"
        )
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    raw = bytearray()
    async for piece in request.stream():  # a chunked body has no length to check up front
        raw += piece
        if len(raw) > max_bytes:
            raise too_large
    return bytes(raw)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400: not JSON (NaN and Infinity are not, nor numbers past a double's range),
    nested too deeply, an integer of more digits than Python converts, or not an object."""
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def check_fields(body: dict[str, Any], supported: set[str]) -> None:
    """Every field either works or is refused: a 400 naming the first one this server does not implement (tools,
    response_format, suffix, ...), never a 200 that silently ignores it."""
    for name in body:
        if name not in supported:
            raise APIError(400, f"'{name}' is not supported by this server", name)


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a boolean", name)
    return value


def include_usage(body: dict[str, Any], stream: bool) -> bool:
    """stream_options.include_usage: a last chunk with the usage (and no choices) before [DONE]."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "'stream_options' must be {\"include_usage\": boolean}", "stream_options")
    return flag(options, "include_usage")


def number(body: dict[str, Any], name: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or (kind is int and value != int(value))
    ):
        raise APIError(400, f"'{name}' must be a {kind.__name__}", name)
    if not low <= value <= high:
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return kind(value)


def sampling_params(
    body: dict[str, Any],
    limits: ServerLimits,
    default_max_tokens: int,
    stop_tokens: tuple[int, ...],
    extra_stops: tuple[str, ...],
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """prompt_logprobs: the prompt is to be scored (echo), and then max_tokens may be 0."""
    ignore_eos = flag(body, "ignore_eos")  # vLLM's extension: a fixed output length, for benchmarks
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if any(len(s) > limits.max_stop_length for s in stop):
        raise APIError(
            400, f"'stop' strings may be at most {limits.max_stop_length} characters (--max-stop-length)", "stop"
        )
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 256):
        raise APIError(400, "'cache_salt' must be a non-empty string of at most 256 characters", "cache_salt")
    # max_completion_tokens is the chat API's current name; max_tokens its deprecated one
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new_tokens = number(body, limit, default_max_tokens, int, 0 if prompt_logprobs is not None else 1, 1 << 20)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, float, 1e-9, 1.0),
        top_k=number(body, "top_k", 0, int, 0, 1 << 30) or None,
        seed=number(body, "seed", None, int, -(1 << 63), (1 << 64) - 1),
        stop_token_ids=() if ignore_eos else stop_tokens,
        stop_strings=tuple(stop) + extra_stops,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=number(body, "presence_penalty", 0.0, float, -2, 2),
        frequency_penalty=number(body, "frequency_penalty", 0.0, float, -2, 2),
        repetition_penalty=number(body, "repetition_penalty", 1.0, float, 1e-3, 1e3),
        logit_bias=logit_bias(body),
        min_tokens=number(body, "min_tokens", 0, int, 0, max_new_tokens),
        cache_salt=salt,
    )


def check_request_size(prompts: list[list[int]], params: SamplingParams, copies: int, limits: ServerLimits) -> None:
    """The work and memory one request may claim: its tokens (prompt + output, per copy) and its logprob entries
    (a prompt is scored once however many copies it has), each a 400 naming the field and the flag."""
    prompt_tokens = sum(len(p) for p in prompts)
    tokens = (prompt_tokens + len(prompts) * params.max_new_tokens) * copies
    if tokens > limits.max_request_tokens:
        field = "prompt" if prompt_tokens * copies > limits.max_request_tokens else "max_tokens"
        raise APIError(
            400,
            f"the request asks for {tokens} tokens ((prompt + max_tokens) × n or best_of, over "
            f"its prompts); this server's limit is {limits.max_request_tokens} "
            "(--max-request-tokens)",
            field,
        )
    entries = 0
    if params.prompt_logprobs is not None:
        entries += (prompt_tokens - len(prompts)) * (1 + params.prompt_logprobs)
    if params.logprobs is not None:
        entries += len(prompts) * copies * params.max_new_tokens * (1 + params.logprobs)
    if entries > limits.max_logprob_entries:
        raise APIError(
            400,
            f"the request asks for {entries} logprobs (scored tokens × (1 + top logprobs)); this "
            f"server's limit is {limits.max_logprob_entries} (--max-logprob-entries)",
            "logprobs",
        )


def logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in [-100, 100]} → ((id, bias), ...); ids outside the vocabulary are refused later."""
    bias = body.get("logit_bias") or {}
    if (
        not isinstance(bias, dict)
        or len(bias) > MAX_LOGIT_BIAS
        or not all(isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 10 for k in bias)
    ):
        raise APIError(400, f"'logit_bias' must map up to {MAX_LOGIT_BIAS} token ids to numbers", "logit_bias")
    try:
        return tuple((int(k), number(bias, k, 0.0, float, -100, 100)) for k in bias)
    except APIError as e:
        raise APIError(400, f"'logit_bias': {e.message}", "logit_bias") from None


def choices(body: dict[str, Any]) -> tuple[int, int]:
    """(n, best_of): best_of sequences are generated per prompt and the n most likely returned."""
    n = number(body, "n", 1, int, 1, MAX_CHOICES)
    best_of = number(body, "best_of", n, int, 1, MAX_CHOICES)
    if best_of < n:
        raise APIError(400, f"'best_of' ({best_of}) must be at least 'n' ({n})", "best_of")
    return n, best_of


def completion_logprobs_field(body: dict[str, Any]) -> int | None:
    return number(body, "logprobs", None, int, 0, MAX_TOP_LOGPROBS)


def chat_logprobs_field(body: dict[str, Any]) -> int | None:
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise APIError(400, "'logprobs' must be a boolean", "logprobs")
    top = number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return top if wanted else None


def token_ids(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def prompts(body: dict[str, Any], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """/v1/completions' prompt: a string, a list of token ids, or a batch (a list of either) → token ids per
    prompt."""
    prompt = body.get("prompt")
    if (isinstance(prompt, str) and prompt) or token_ids(prompt):
        prompt = [prompt]
    if (
        not isinstance(prompt, list)
        or not 1 <= len(prompt) <= MAX_PROMPTS
        or not all((isinstance(p, str) and p) or token_ids(p) for p in prompt)
    ):
        raise APIError(
            400,
            "'prompt' must be a non-empty string, a non-empty list of token ids, or a list of up "
            f"to {MAX_PROMPTS} of either",
            "prompt",
        )
    return [encode(p) if isinstance(p, str) else p for p in prompt]


def best(candidates: list[Completion], n: int) -> list[Completion]:
    """The n candidates of one prompt with the highest total logprob (all of them, in order, when there are n)."""
    if len(candidates) == n:
        return candidates
    return sorted(candidates, key=lambda c: -sum(e.logprob for e in c.logprobs or []))[:n]


def completion_logprobs(
    entries: list[TokenLogprob], token_text: Callable[[int], str], echoed: tuple[int, list[TokenLogprob]] | None = None
) -> dict[str, Any]:
    """The legacy completions format; `echoed`: (the first prompt token, the scored others) go first, the first
    with null logprobs. text_offset: where each token's text starts in the choice's text."""
    rows = [] if echoed is None else [(echoed[0], None, None)] + [(e.token, e.logprob, e.top) for e in echoed[1]]
    rows += [(e.token, e.logprob, e.top) for e in entries]
    texts = [token_text(token) for token, _, _ in rows]
    offsets = list(accumulate((len(t) for t in texts[:-1]), initial=0)) if texts else []
    return {
        "tokens": texts,
        "token_logprobs": [logprob for _, logprob, _ in rows],
        "top_logprobs": [None if top is None else {token_text(t): lp for t, lp in top} for _, _, top in rows],
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


def usage(completions: list[Completion], n: int = 1) -> dict[str, Any]:
    """completions: n per prompt, in order (each prompt's tokens are counted once)."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in completions[::n])},
    }


_METRICS = [  # (name, type, help, stats key)
    ("nanoseek_requests_running", "gauge", "Sequences in the running batch", "running"),
    ("nanoseek_requests_waiting", "gauge", "Sequences waiting to be admitted", "waiting"),
    ("nanoseek_cache_blocks_used", "gauge", "Latent-cache blocks held by sequences", "cache_blocks_used"),
    ("nanoseek_cache_blocks_total", "gauge", "Latent-cache blocks", "cache_blocks_total"),
    ("nanoseek_cache_tokens_capacity", "gauge", "Tokens the latent cache holds", "cache_tokens_total"),
    ("nanoseek_cache_usage_ratio", "gauge", "Fraction of latent-cache blocks in use", "cache_usage"),
    (
        "nanoseek_prefix_cache_hit_rate",
        "gauge",
        "Prompt tokens found in the prefix cache / prompt tokens",
        "prefix_hit_rate",
    ),
    ("nanoseek_prompt_tokens_total", "counter", "Prompt tokens admitted", "prompt_tokens"),
    (
        "nanoseek_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens served from the prefix cache",
        "cached_prompt_tokens",
    ),
    ("nanoseek_generation_tokens_total", "counter", "Tokens generated", "generated_tokens"),
    (
        "nanoseek_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second over the last 10 s",
        "tokens_per_s",
    ),
    ("nanoseek_spec_draft_tokens_total", "counter", "MTP draft tokens verified", "drafted_tokens"),
    ("nanoseek_spec_accepted_tokens_total", "counter", "MTP draft tokens accepted", "accepted_tokens"),
    ("nanoseek_spec_acceptance_rate", "gauge", "Accepted / drafted MTP tokens", "acceptance_rate"),
    ("nanoseek_preemptions_total", "counter", "Sequences preempted for cache space (recomputed later)", "preemptions"),
]


def prometheus(stats: dict[str, float], histograms: list[Histogram]) -> str:
    stats = {**stats, "cache_usage": stats["cache_blocks_used"] / max(1, stats["cache_blocks_total"])}
    lines = []
    for name, kind, text, key in _METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {float(stats[key]):g}"]
    for histogram in histograms:
        lines += histogram.prometheus()
    return "\n".join(lines) + "\n"

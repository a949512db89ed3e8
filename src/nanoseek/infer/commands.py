"""The inference commands: `nanoseek generate`, `nanoseek serve`, `nanoseek chat`."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
from dataclasses import replace
from pathlib import Path

from nanoseek.device import add_device_options, resolve_device
from nanoseek.errors import NanoseekError
from nanoseek.infer.protocol import ServerLimits


def _engine(args: argparse.Namespace):
    from nanoseek.checkpoint.hf import load_pretrained
    from nanoseek.data.tokenizer import check_vocab, load_tokenizer
    from nanoseek.infer.engine import Engine

    run = Path(args.model)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    device, dtype = resolve_device(args.device, args.dtype)
    engine = Engine(load_pretrained(run, device, dtype, quantized=True), decode=tokenizer.decode)
    check_vocab(tokenizer, engine.model.config.vocab_size)
    return engine, tokenizer


def _sampling(args: argparse.Namespace, engine, **fields):
    """SamplingParams from the flags, or one line saying which flag cannot work with this model."""
    from nanoseek.infer.request import SamplingParams

    if not 0 < args.max_new_tokens < engine.max_len:
        raise NanoseekError(
            f"--max-new-tokens must be between 1 and {engine.max_len - 1} (the model's context is "
            f"{engine.max_len} tokens), got {args.max_new_tokens}"
        )
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, **fields
        )
    except ValueError as e:
        raise NanoseekError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> None:
    from nanoseek.data.tokenizer import end_token_ids

    engine, tokenizer = _engine(args)
    prompt = tokenizer.encode(args.prompt).ids
    params = _sampling(args, engine, top_p=args.top_p, seed=args.seed, stop_token_ids=end_token_ids(tokenizer))
    try:
        engine.check(prompt, params)
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    print(args.prompt, end="", flush=True)
    engine.generate([prompt], params, on_token=lambda _, delta, __: print(delta, end="", flush=True))
    print()


def cmd_serve(args: argparse.Namespace) -> None:
    from nanoseek.infer.engine import EngineConfig
    from nanoseek.infer.server import create_app, serve
    from nanoseek.memory import available_memory

    if args.cache_memory is not None and args.cache_fraction is not None:
        raise NanoseekError("give --cache-memory or --cache-fraction, not both")
    if args.cache_fraction is not None and not 0 < args.cache_fraction < 1:
        raise NanoseekError(f"--cache-fraction must be in (0, 1), got {args.cache_fraction}")
    listener = None if args.fd is None else _inherited_listener(args.fd)
    if listener is not None:
        args.host, args.port = listener.getsockname()[:2]
    device, dtype = resolve_device(args.device, args.dtype)
    _fewer_malloc_arenas()
    try:
        memory = None if args.cache_memory is None else args.cache_memory * 2**30
        config = EngineConfig(
            block_size=args.block_size,
            cache_memory=memory,
            max_seqs=args.max_seqs,
            token_budget=args.token_budget,
            speculation=False if args.no_speculation else None,
            static=args.batching == "static",
        )
        if args.cache_fraction is not None:  # of the memory free now, on the device the model is loaded to
            config = replace(config, cache_memory=args.cache_fraction * available_memory(device))
        limits = ServerLimits(
            max_waiting=args.max_waiting,
            max_body_bytes=args.max_request_bytes,
            max_request_tokens=args.max_request_tokens,
            max_stop_length=args.max_stop_length,
            max_logprob_entries=args.max_logprob_entries,
            workers=args.api_workers,
        )
        app = create_app(
            args.model,
            api_key=_api_key(args),
            config=config,
            limits=limits,
            device=device,
            dtype=dtype,
            allowed_hosts=_allowed_hosts(args),
        )
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    engine = app.state.engine
    print(
        f"latent cache: {engine.cache_tokens:,} tokens in {engine.blocks.num_blocks} blocks of "
        f"{engine.config.block_size} ({engine.cache_bytes / 2**20:,.1f} MiB); "
        f"{'continuous' if not engine.config.static else 'static'} batching, speculation "
        f"{'on (MTP)' if engine.speculate else 'off'}; {str(engine.dtype).removeprefix('torch.')} on "
        f"{engine.device}",
        flush=True,
    )
    print(f"serving {args.model} on http://{args.host}:{args.port}/v1", flush=True)
    serve(app, args.host, args.port, args.shutdown_timeout, listener)


def _inherited_listener(fd: int) -> socket.socket:
    """--fd: a TCP socket the parent bound and listens on, so that the port is held from the moment it is chosen
    (a port found free, closed and passed by number may be taken by another process before the server binds it)."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as e:
        raise NanoseekError(f"--fd {fd}: not an open socket ({e.strerror or e})") from None
    if (
        listener.type != socket.SOCK_STREAM
        or listener.family not in (socket.AF_INET, socket.AF_INET6)
        or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        listener.detach()  # the descriptor stays its owner's to close
        raise NanoseekError(f"--fd {fd}: not a listening TCP socket")
    return listener


LOOPBACK = ("127.0.0.1", "localhost", "::1")
M_ARENA_MAX = -8  # glibc's mallopt parameter


def _fewer_malloc_arenas() -> None:
    """Two malloc arenas for the server (unless MALLOC_ARENA_MAX says otherwise): glibc gives each allocating
    thread an arena of its own, up to 8 per core, and keeps each one's peak, so the API pool, the engine thread and
    the event loop add up their peaks in RSS (docs/bench/hostile.md). No-op off glibc."""
    if "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else NANOSEEK_API_KEY (which keeps the key out of the process list); an empty one is refused,
    never taken as 'no authentication'."""
    key, source = args.api_key, "--api-key"
    if key is None:
        key, source = os.environ.get("NANOSEEK_API_KEY"), "NANOSEEK_API_KEY"
    if key is not None and not key.strip():
        raise NanoseekError(f"{source} is empty: give a key, or neither it nor the other to serve without one")
    return key


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--allowed-hosts; by default a server bound to loopback answers loopback names only (a DNS-rebound page's
    Host names the attacker's domain), and one bound elsewhere answers any ('*')."""
    if args.allowed_hosts is not None:
        return tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) or None
    return LOOPBACK if args.host in LOOPBACK else None


def fit_conversation(messages: list[dict[str, str]], encode, room: int) -> tuple[list[int], int]:
    """The prompt of the newest messages that fit in `room` tokens, dropping whole turns from the oldest (never a
    part of one) → (prompt ids, how many messages were dropped). NanoseekError if the last message alone is too
    long."""
    for dropped in range(len(messages)):
        prompt = encode(messages[dropped:])
        if len(prompt) <= room:
            return prompt, dropped
    raise NanoseekError(
        f"the message is {len(encode(messages[-1:]))} tokens with the chat format; this model has "
        f"room for {room} (its context less --max-new-tokens)"
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from nanoseek.data.tokenizer import TextEncoder, encode_ids, end_token_ids
    from nanoseek.infer.chat import ChatTemplate

    try:
        template = ChatTemplate(Path(args.model))
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    engine, tokenizer = _engine(args)
    params = _sampling(args, engine, stop_token_ids=end_token_ids(tokenizer), stop_strings=template.stop_strings)
    as_text = TextEncoder(tokenizer)

    def encode(text: str) -> list[int]:
        return encode_ids(tokenizer, text)

    room = min(engine.max_len, engine.cache_tokens - 1) - args.max_new_tokens
    messages: list[dict[str, str]] = []
    print("nanoseek chat — an empty line, Ctrl-D or Ctrl-C ends the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        try:
            prompt, dropped = fit_conversation(messages, lambda m: template.render_ids(m, encode, as_text), room)
        except (NanoseekError, ValueError) as e:
            messages.pop()
            print(f"(not sent: {e})")
            continue
        if dropped:
            del messages[:dropped]
            print(f"(the {dropped} oldest messages no longer fit in the context and were dropped)")
        print("model>", end="", flush=True)
        reply = engine.generate([prompt], params, on_token=lambda _, delta, __: print(delta, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": reply[0].text.strip()})


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run or model directory (with tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    add_device_options(parser)


def register(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="sample text from a trained run directory")
    _sampling_options(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(run=cmd_generate)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP API for a model directory")
    serve.add_argument("model", help="run or model directory (with tokenizer.json)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--fd",
        type=int,
        metavar="N",
        help="serve on the listening TCP socket of file descriptor N, inherited from the parent "
        "(instead of --host/--port; as tests and benchmarks start servers)",
    )
    serve.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: $NANOSEEK_API_KEY, which "
        "other users cannot read in the process list)",
    )
    serve.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host header names to answer ('*': any); default: loopback names when "
        "bound to loopback, else any",
    )
    serve.add_argument("--max-seqs", type=int, default=64, help="sequences in the running batch at most")
    serve.add_argument(
        "--token-budget", type=int, default=512, help="tokens per engine step (decodes, then chunks of prompts)"
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="sequences queued for admission at most; past it requests get 429 with Retry-After",
    )
    serve.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    serve.add_argument(
        "--max-request-tokens",
        type=int,
        default=ServerLimits.max_request_tokens,
        help="(prompt + max_tokens) x n or best_of, summed over a request's prompts, at most",
    )
    serve.add_argument(
        "--max-stop-length",
        type=int,
        default=ServerLimits.max_stop_length,
        help="characters in one stop string at most",
    )
    serve.add_argument(
        "--max-logprob-entries",
        type=int,
        default=ServerLimits.max_logprob_entries,
        help="(scored prompt tokens + tokens generated with logprobs) x (1 + top logprobs) at most",
    )
    serve.add_argument(
        "--api-workers",
        type=int,
        default=ServerLimits.workers,
        help="threads that parse, tokenize and format requests off the event loop",
    )
    serve.add_argument("--cache-memory", type=float, metavar="GB", help="latent-cache size in GiB")
    serve.add_argument(
        "--cache-fraction",
        type=float,
        metavar="F",
        help="latent-cache size as a fraction of the free memory (default: room for --max-seqs "
        "full contexts, at most a quarter of free memory)",
    )
    serve.add_argument("--block-size", type=int, default=64, help="tokens per cache block")
    serve.add_argument(
        "--no-speculation",
        action="store_true",
        help="do not draft with the MTP module (on by default when the model has one)",
    )
    serve.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="static: the previous server's policy (a new batch only when the last one ended)",
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish after SIGTERM"
    )
    add_device_options(serve)
    serve.set_defaults(run=cmd_serve)

    chat = commands.add_parser("chat", help="a conversation in the terminal")
    _sampling_options(chat)
    chat.set_defaults(run=cmd_chat)

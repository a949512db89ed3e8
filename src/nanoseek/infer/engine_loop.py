"""The server's engine thread: the one thread that steps the engine, and the jobs (a request's sequences) whose
events it hands to the request handlers' event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace

from nanoseek.infer.engine import Engine
from nanoseek.infer.request import SamplingParams, Sequence, TokenLogprob


@dataclass(eq=False)
class Job:
    """A request's sequences (n of them) and the queue their events reach the request handler by.

    A choice's new text is not queued once per step: it joins the text still waiting for the handler, and only the
    first piece queues a wake-up. A client that stops reading thus holds at most one pending delta per choice
    (its text so far, bounded by max_tokens) and one event each, however long it generates."""

    seqs: list[Sequence]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _pending: dict[int, tuple[list[str], list[TokenLogprob]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def push(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the handler's event loop is closed (shut down while it generated): nobody reads on
            self.abort()  # (raising here would end the engine thread, and with it every later request)

    def push_delta(self, index: int, text: str, logprobs: list[TokenLogprob]) -> None:
        with self._lock:
            pending = self._pending.get(index)
            if pending is None:
                self._pending[index] = ([text], list(logprobs))
            else:
                pending[0].append(text)
                pending[1].extend(logprobs)
        if pending is None:
            self.push(("delta", index, None))

    def take_delta(self, index: int) -> tuple[str, list[TokenLogprob]]:
        """The text and logprobs of choice `index` since the last take (on the handler's side of a wake-up)."""
        with self._lock:
            texts, logprobs = self._pending.pop(index, ([], []))
        return "".join(texts), logprobs

    def abort(self) -> None:
        for seq in self.seqs:
            Engine.abort(seq)


class EngineLoop:
    """The one thread that runs the model: steps while there is work, sleeps otherwise. `lock` orders a request's
    registration before any report of its sequences: a sequence that its first step finishes (max_tokens 1, an end
    token first) is still delivered."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.jobs: dict[Sequence, tuple[Job, int]] = {}
        self.sent_logprobs: dict[Sequence, int] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.draining = False
        self.failing: str | None = None  # why the last step failed outright (None: it ran)
        threading.Thread(target=self._run, daemon=True, name="nanoseek-engine").start()

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop) -> Job:
        """n sequences per prompt; the job's sequence prompt_index · n + i is choice i of that prompt. Only a
        prompt's first choice scores the prompt (echo): its copies would score the same tokens again."""
        for prompt in prompts:  # every prompt is checked before any is queued
            self.engine.check(prompt, params)
        # a prompt's other choices wait for the first one's prefill, then find its prompt blocks in the prefix cache;
        # a seeded request's choice i samples with seed + i: reproducible, and not n copies of one sample
        scored_once = None if params.max_new_tokens else params.prompt_logprobs  # max_tokens 0: nothing but scores
        copies = [
            replace(params, seed=None if params.seed is None else params.seed + i, prompt_logprobs=scored_once)
            for i in range(1, n)
        ]
        seqs = []
        with self.lock:
            for prompt in prompts:
                first = self.engine.add(prompt, params)
                seqs += [first] + [self.engine.add(prompt, copy, after=first) for copy in copies]
            job = Job(seqs, loop)
            for index, seq in enumerate(seqs):
                self.jobs[seq] = (job, index)
        self.wake.set()
        return job

    def wait_idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for every job to finish (any thread) → whether they did."""
        deadline = time.monotonic() + seconds
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.jobs

    def abort_all(self) -> None:
        with self.lock:
            jobs = {job for job, _ in self.jobs.values()}
        for job in jobs:
            job.abort()

    def _run(self) -> None:
        while True:
            if not self.engine.has_work():
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                changed = self.engine.step()
                self.failing = self.engine.failing
            except Exception as e:  # a failed step must not kill the server: every client is told, and forgotten
                self.failing = f"generation failed: {e}"
                with self.lock:
                    failed = {job for job, _ in self.jobs.values()}
                    self.jobs.clear()
                    self.sent_logprobs.clear()
                for job in failed:
                    job.push(("error", 0, self.failing))
                    job.abort()  # the next step releases their sequences
                continue
            with self.lock:
                for seq in changed:
                    self._notify(seq)

    def _notify(self, seq: Sequence) -> None:
        job, index = self.jobs.get(seq, (None, 0))
        if job is None:
            return
        if seq.error is not None:  # the engine failed this sequence alone: its request fails, the others go on
            for other in job.seqs:
                self.jobs.pop(other, None)
                self.sent_logprobs.pop(other, None)
            job.push(("error", index, seq.error))
            job.abort()
            return
        sent = self.sent_logprobs.get(seq, 0)
        new_logprobs, self.sent_logprobs[seq] = seq.logprobs[sent:], len(seq.logprobs)
        if seq.new_text or new_logprobs:
            job.push_delta(index, seq.new_text, new_logprobs)
            seq.new_text = ""
        if seq.finish_reason is not None:  # forgotten before "done" is pushed: a client told it is done finds no job
            del self.jobs[seq]
            self.sent_logprobs.pop(seq, None)
            job.push(("done", index, seq.completion()))

"""Verifiable tasks for RL and evaluation: prompts, a rule-based reward (R1-Zero style: accuracy + format, no reward
model), and disjoint splits. A task is a small interface, so a user can plug in their own (`--task module:Class`).

The response layout every built-in task rewards is R1's reasoning-then-answer:

    <think>how it was worked out</think> <answer>the final answer</answer>

A task only says how to draw a random problem from its whole space; which split a problem belongs to is decided
here, by a keyed hash of its whole question, so every split is an unbiased sample of the same distribution (a
split keyed on a few operands modulo a small number can be a slice the model never sees: answers of one residue,
doublings only). The splits, in eighths of the hash: `sft` (4/8: SFT's worked examples), `rl` (2/8: RL's prompts,
disjoint from SFT's), `validation` (1/8: choosing steps and settings), `test` (1/8: reported once).
"""

from __future__ import annotations

import hashlib
import importlib
import random
from typing import Protocol

from nanoseek.errors import NanoseekError
from nanoseek.post.reward import Problem, Reward, column_steps, exact_answer_reward

SPLITS = {"sft": range(0, 4), "rl": range(4, 6), "validation": range(6, 7), "test": range(7, 8)}
_SPLIT_KEY = b"nanoseek/post/splits/v1"


class TaskError(NanoseekError):
    pass


class Task(Protocol):
    """What a task provides. `sample` draws from the whole problem space (every split); the same rng state must
    give the same problem."""

    name: str

    def sample(self, rng: random.Random) -> Problem: ...

    def reward(self, problem: Problem, response: str) -> Reward: ...

    def demonstration(self, problem: Problem) -> str:
        """A correct response in the rewarded layout (for SFT data)."""


def split_of(problem: Problem) -> str:
    eighth = hashlib.blake2b(problem.question.encode(), key=_SPLIT_KEY, digest_size=8).digest()[0] % 8
    return next(name for name, eighths in SPLITS.items() if eighth in eighths)


def problems(task: Task, split: str, count: int, seed: int) -> list[Problem]:
    """`count` distinct problems of `split`, the same for the same (task, split, count, seed); a prefix of a longer
    draw with the same seed."""
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    rng, found, seen = random.Random(f"{task.name}/{split}/{seed}"), [], set()
    draws = 0
    while len(found) < count:
        draws += 1
        if draws > 100 * count + 10_000:
            raise TaskError(
                f"task {task.name!r} gave only {len(found)} distinct {split} problems in {draws - 1} "
                f"draws; {count} were asked for"
            )
        problem = task.sample(rng)
        if problem.question not in seen and split_of(problem) == split:
            seen.add(problem.question)
            found.append(problem)
    return found


class Arithmetic:
    """Sums and differences of numbers of up to `digits` digits, e.g. 'What is 47 - 9?': past what a tiny model
    gets right from SFT alone, within what sampling sometimes finds."""

    name = "arithmetic"

    def __init__(self, digits: int = 2):
        self.largest = 10**digits - 1

    def sample(self, rng: random.Random) -> Problem:
        a = rng.randint(0, self.largest)
        op = rng.choice("+-")
        b = rng.randint(0, self.largest if op == "+" else a)
        return Problem(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b))

    def reward(self, problem: Problem, response: str) -> Reward:
        return exact_answer_reward(problem, response)

    def demonstration(self, problem: Problem) -> str:
        """Column by column from the right, with carries (borrows), the way it is done by hand: each step is a
        one-digit fact a small model can learn, and the answer is read off the columns."""
        a, op, b = problem.question.removeprefix("What is ").removesuffix("?").split()
        return f"<think>{column_steps(int(a), op, int(b))}</think> <answer>{problem.answer}</answer>"


class Multiplication:
    """Products of two numbers of up to `digits` digits, e.g. 'What is 47 * 23?': several chained steps (a
    partial product per digit of the second number, each digit by digit with carries, then their column sum), so
    one slip anywhere is a wrong answer: meant to be harder than `arithmetic` (not yet measured on a model)."""

    name = "multiplication"

    def __init__(self, digits: int = 2):
        self.largest = 10**digits - 1

    def sample(self, rng: random.Random) -> Problem:
        a, b = rng.randint(2, self.largest), rng.randint(2, self.largest)
        return Problem(f"What is {a} * {b}?", str(a * b))

    def reward(self, problem: Problem, response: str) -> Reward:
        return exact_answer_reward(problem, response)

    def demonstration(self, problem: Problem) -> str:
        """'47*3: 7*3=21 4*3+2=14 → 141' per digit of the second number (shifted by its place), then the partial
        products added column by column as `arithmetic` does."""
        a, _, b = problem.question.removeprefix("What is ").removesuffix("?").split()
        x, y = int(a), int(b)
        steps, total, place = [], 0, 0
        for digit in reversed(str(y)):
            d, carry, parts, rest = int(digit), 0, [], x
            while True:
                product = (rest % 10) * d + carry
                parts.append(f"{rest % 10}*{d}" + (f"+{carry}" if carry else "") + f"={product}")
                carry, rest = product // 10, rest // 10
                if not rest:
                    break
            partial = x * d * 10**place
            steps.append(f"{x}*{d}: {' '.join(parts)} → {partial}")
            if place:
                steps.append(f"{total}+{partial}: {column_steps(total, '+', partial)}")
            total, place = total + partial, place + 1
        return f"<think>{'; '.join(steps)}</think> <answer>{problem.answer}</answer>"


BUILT_IN = {"arithmetic": Arithmetic, "multiplication": Multiplication}


def get_task(name: str) -> Task:
    """A built-in task by name, or a user's task as `module:Class` (importable from the current directory or
    PYTHONPATH; built with no arguments)."""
    if ":" not in name:
        if name not in BUILT_IN:
            raise TaskError(f"unknown task {name!r}; built in: {', '.join(BUILT_IN)} (or module:Class for your own)")
        return BUILT_IN[name]()
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task {name!r}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, class_name, None)
    if factory is None:
        raise TaskError(f"task {name!r}: {module_name} has no {class_name!r}")
    task = factory()
    missing = [m for m in ("name", "sample", "reward", "demonstration") if not hasattr(task, m)]
    if missing:
        raise TaskError(f"task {name!r} lacks {', '.join(missing)} (see nanoseek.post.tasks.Task)")
    return task

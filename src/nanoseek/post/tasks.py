"""Verifiable tasks for RL and evaluation: prompts, a rule-based reward (R1-Zero style: accuracy + format, no reward
model), and disjoint train / held-out sets. A task is a small interface, so a user can plug in their own.

The response layout every task rewards is R1's reasoning-then-answer:

    <think>how it was worked out</think> <answer>the final answer</answer>
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
FORMAT_REWARD = 0.1  # R1-Zero's format reward, small next to the accuracy reward of 1


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the exact final answer


@dataclass(frozen=True)
class Reward:
    value: float
    correct: bool
    formatted: bool


class Task(Protocol):
    name: str

    def problems(self, split: str, count: int, seed: int) -> list[Problem]:
        """`split` 'train' or 'heldout' (disjoint); the same (split, count, seed) gives the same problems."""

    def reward(self, problem: Problem, response: str) -> Reward: ...

    def demonstration(self, problem: Problem) -> str:
        """A correct response in the rewarded layout (for SFT data)."""


def answer_of(response: str) -> tuple[str | None, bool]:
    """→ (the text inside <answer>, whether the whole response has the layout)."""
    match = LAYOUT.fullmatch(response)
    if match is None:
        return None, False
    return match.group(2).strip(), True


class Arithmetic:
    """Sums and differences of numbers of up to `digits` digits, e.g. 'What is 47 - 9?': past what a tiny model
    gets right from SFT alone, within what sampling sometimes finds. A problem belongs to the held-out set iff a
    hash of its operands says so (1 in 8), so the two sets never share a problem, whatever their sizes."""

    name = "arithmetic"

    def __init__(self, digits: int = 2):
        self.largest = 10**digits - 1

    def _make(self, rng: random.Random) -> tuple[int, str, int]:
        a = rng.randint(0, self.largest)
        op = rng.choice("+-")
        b = rng.randint(0, self.largest if op == "+" else a)
        return a, op, b

    @staticmethod
    def _heldout(a: int, op: str, b: int) -> bool:
        return (a * 7919 + b * 104729 + (op == "-")) % 8 == 0

    def problems(self, split: str, count: int, seed: int) -> list[Problem]:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}: 'train' or 'heldout'")
        rng, found = random.Random(f"{seed}/{split}"), []
        while len(found) < count:
            a, op, b = self._make(rng)
            if self._heldout(a, op, b) == (split == "heldout"):
                found.append(Problem(f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)))
        return found

    def reward(self, problem: Problem, response: str) -> Reward:
        answer, formatted = answer_of(response)
        correct = answer is not None and answer == problem.answer
        return Reward(float(correct) + (FORMAT_REWARD if formatted else 0.0), correct, formatted)

    def demonstration(self, problem: Problem) -> str:
        """Column by column from the right, with carries (borrows), the way it is done by hand: each step is a
        one-digit fact a small model can learn, and the answer is read off the columns."""
        a, op, b = problem.question.removeprefix("What is ").removesuffix("?").split()
        x, y = int(a), int(b)
        steps, carry, column = [], 0, 0
        while x or y or carry or column == 0:
            da, db = x % 10, y % 10
            if op == "+":
                total = da + db + carry
                steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
                carry = total // 10
            else:
                total = da - db - carry
                steps.append(f"{da}-{db}" + ("-1" if carry else "") + f"={total % 10}" + (" borrow" if total < 0
                                                                                           else ""))
                carry = int(total < 0)
            x, y, column = x // 10, y // 10, column + 1
        return f"<think>{' '.join(steps)}</think> <answer>{problem.answer}</answer>"

TASKS: dict[str, Task] = {"arithmetic": Arithmetic()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]

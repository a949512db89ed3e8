"""What the built-in tasks share: a problem, R1-Zero's rule-based reward (accuracy + format, no reward model) on
the layout `<think>…</think> <answer>…</answer>`, and worked column arithmetic for demonstrations."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def answer_of(response: str) -> tuple[str | None, bool]:
    """→ (the text inside <answer>, whether the whole response has the layout)."""
    match = LAYOUT.fullmatch(response)
    if match is None:
        return None, False
    return match.group(2).strip(), True


def exact_answer_reward(problem: Problem, response: str) -> Reward:
    """1 for the exact answer inside the layout, plus FORMAT_REWARD for the layout."""
    answer, formatted = answer_of(response)
    correct = answer is not None and answer == problem.answer
    return Reward(float(correct) + (FORMAT_REWARD if formatted else 0.0), correct, formatted)


def column_steps(a: int, op: str, b: int) -> str:
    """a + b or a - b (a ≥ b) column by column from the right: '7+5=12 4+2+1=7' (the carry, or ' borrow', read off
    the step before)."""
    steps, carry, column = [], 0, 0
    while a or b or carry or column == 0:
        da, db = a % 10, b % 10
        if op == "+":
            total = da + db + carry
            steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
            carry = total // 10
        else:
            total = da - db - carry
            steps.append(f"{da}-{db}" + ("-1" if carry else "") + f"={total % 10}" + (" borrow" if total < 0 else ""))
            carry = int(total < 0)
        a, b, column = a // 10, b // 10, column + 1
    return " ".join(steps)

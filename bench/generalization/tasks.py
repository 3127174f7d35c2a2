"""Scale-2 fine-tuning tasks: two-term arithmetic in the model's own reply format.

A task is asked as "Calculate a + b. Reply with only the equation and its result." and
its target is the model's own format, "a + b = c" (its tokens are already likely under
SmolLM2-135M-Instruct). ``TASKS`` are the ones scale 2 fine-tunes; ``CANDIDATES`` are
those screened with the base model before any fine-tuning (``screen_tasks.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SUFFIX = " Reply with only the equation and its result."
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Terms:
    """Two operands drawn from ``first`` and ``second`` (inclusive ranges); with
    ``both_orders`` the two are swapped half of the time ("7 + 45" and "45 + 7")."""

    op: str
    first: tuple[int, int]
    second: tuple[int, int]
    both_orders: bool = False

    def problems(self) -> set[tuple[int, int]]:
        """Every distinct (a, b) this draws."""
        pairs = {
            (a, b)
            for a in range(self.first[0], self.first[1] + 1)
            for b in range(self.second[0], self.second[1] + 1)
        }
        return pairs | {(b, a) for a, b in pairs} if self.both_orders else pairs

    def describe(self) -> dict:
        return {"op": self.op, "first": self.first, "second": self.second, "both": self.both_orders}


def question(op: str, a: int, b: int) -> str:
    return f"Calculate {a} {op} {b}.{SUFFIX}"


def items(
    terms: Terms, n: int, seed: int, exclude: set[str] = frozenset()
) -> list[tuple[str, str]]:
    """``n`` distinct (question, target "a op b = c") drawn from ``terms`` with ``seed``,
    none of them in ``exclude``. Refuses (ValueError) when fewer than ``n`` distinct
    problems are left, instead of drawing forever."""
    left = {question(terms.op, a, b) for a, b in terms.problems()} - set(exclude)
    if n > len(left):
        raise ValueError(
            f"{terms} holds {len(left)} distinct problems outside the excluded ones; {n} were asked"
        )
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:  # ends: at least n unseen problems remain, each drawn with p > 0
        a, b = rng.randint(*terms.first), rng.randint(*terms.second)
        if terms.both_orders and rng.random() < 0.5:
            a, b = b, a
        q = question(terms.op, a, b)
        if q not in seen:
            seen.add(q)
            out.append((q, f"{a} {terms.op} {b} = {OPS[terms.op](a, b)}"))
    return out


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: in-domain and OOD problems, and the seeds of its data sets."""

    name: str
    in_domain: Terms
    ood: Terms
    note: str
    seeds: tuple[int, int, int, int] = (301, 302, 303, 10_000)  # val, test, ood, train + seed

    def describe(self) -> dict:
        return {
            "name": self.name,
            "in_domain": self.in_domain.describe(),
            "ood": self.ood.describe(),
            "prompt_suffix": SUFFIX,
            "seeds": self.seeds,
        }


TASKS = {
    # The half-known task (issue 11): the base gets about a third of these sums right.
    "add2d": Task(
        "add2d",
        Terms("+", (10, 49), (10, 49)),
        Terms("+", (50, 99), (50, 99)),
        "two numbers 10-49; OOD both 50-99 (the sum carries into the hundreds)",
    ),
    # The model-strong end (issue 16), chosen by the screen in screen_tasks.py.
    "add2d1d": Task(
        "add2d1d",
        Terms("+", (10, 99), (1, 9), both_orders=True),
        Terms("+", (100, 999), (1, 9), both_orders=True),
        "a two-digit and a one-digit number, either order; OOD a three-digit and a "
        "one-digit number",
        seeds=(401, 402, 403, 20_000),
    ),
}

# Screened with the base model before any fine-tuning (screen_tasks.py); the scale-2
# protocol needs >= 1000 distinct problems (200 validation, 200 test, 400 training).
CANDIDATES = {
    "add1d": Terms("+", (1, 9), (1, 9)),
    "mul1d": Terms("*", (2, 9), (2, 9)),
    "add2d1d": Terms("+", (10, 99), (1, 9), both_orders=True),
    "add2d1d_ordered": Terms("+", (10, 99), (1, 9)),
    "sub2d1d": Terms("-", (10, 99), (1, 9)),
    "add_10_29": Terms("+", (10, 29), (10, 29)),
    "add2d": Terms("+", (10, 49), (10, 49)),
    "add3d1d": Terms("+", (100, 999), (1, 9), both_orders=True),
    "add2d_50_99": Terms("+", (50, 99), (50, 99)),
}

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


CALCULATE = "Calculate {a} {op} {b}."
# Ways of asking one-digit sums: 81 sums are too few problems for 200 validation, 200
# test and 400 training items, 81 sums x 10 phrasings are not.
PHRASINGS = (
    CALCULATE,
    "What is {a} {op} {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Compute {a} {op} {b}.",
    "Find {a} {op} {b}.",
    "How much is {a} plus {b}?",
    "Work out {a} {op} {b}.",
    "Evaluate {a} {op} {b}.",
)


@dataclass(frozen=True)
class Terms:
    """Two operands drawn from ``first`` and ``second`` (inclusive ranges); with
    ``both_orders`` the two are swapped half of the time ("7 + 45" and "45 + 7"); asked
    in one of ``phrasings`` (a problem is a phrasing and its two operands)."""

    op: str
    first: tuple[int, int]
    second: tuple[int, int]
    both_orders: bool = False
    phrasings: tuple[str, ...] = (CALCULATE,)

    def problems(self) -> set[tuple[int, int, int]]:
        """Every distinct (phrasing index, a, b) this draws."""
        pairs = {
            (a, b)
            for a in range(self.first[0], self.first[1] + 1)
            for b in range(self.second[0], self.second[1] + 1)
        }
        pairs = pairs | {(b, a) for a, b in pairs} if self.both_orders else pairs
        return {(t, a, b) for t in range(len(self.phrasings)) for a, b in pairs}

    def question(self, t: int, a: int, b: int) -> str:
        return self.phrasings[t].format(a=a, op=self.op, b=b) + SUFFIX

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """One (question, "a op b = c") from ``rng``."""
        a, b = rng.randint(*self.first), rng.randint(*self.second)
        if self.both_orders and rng.random() < 0.5:
            a, b = b, a
        t = rng.randrange(len(self.phrasings)) if len(self.phrasings) > 1 else 0
        return self.question(t, a, b), f"{a} {self.op} {b} = {OPS[self.op](a, b)}"

    def describe(self) -> dict:
        out = {"op": self.op, "first": self.first, "second": self.second, "both": self.both_orders}
        if self.phrasings != (CALCULATE,):  # single-phrasing keys stay as they were
            out["phrasings"] = self.phrasings
        return out


def items(
    terms: Terms | WorkedSum | WorkedTensOnes, n: int, seed: int, exclude: set[str] = frozenset()
) -> list[tuple[str, str]]:
    """``n`` distinct (question, target) drawn from ``terms`` with ``seed`` (targets
    "a op b = c", or worked solutions), none of them in ``exclude``. Refuses (ValueError)
    when fewer than ``n`` distinct problems are left, instead of drawing forever."""
    left = {terms.question(*p) for p in terms.problems()} - set(exclude)
    if n > len(left):
        raise ValueError(
            f"{terms} holds {len(left)} distinct problems outside the excluded ones; {n} were asked"
        )
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:  # ends: at least n unseen problems remain, each drawn with p > 0
        q, target = terms.draw(rng)
        if q not in seen:
            seen.add(q)
            out.append((q, target))
    return out


# Worked solutions (issue 16, deliverable 5): a three-term sum solved in two steps, in
# the words SmolLM2-135M-Instruct itself uses when asked to show its work ("First, we add
# the numbers: 6 + 4 = 10. Next, ..."), ending with the answer.
WORKED_PROMPTS = {
    "guided": "Calculate {expr}. First add {a} and {b}, then add {c} to the result. "
    "End with: So, the answer is <number>.",
    "steps": "Calculate {expr} step by step, and end with: So, the answer is <number>.",
    "guided_add": "Add {a}, {b} and {c}. First add {a} and {b}, then add {c} to the "
    "result. End with: So, the answer is <number>.",
}


@dataclass(frozen=True)
class WorkedSum:
    """``count`` operands from ``terms`` (inclusive), asked with ``prompt`` or one of
    ``more`` (keys of ``WORKED_PROMPTS``; a problem is a prompt and its operands); the
    target adds them left to right, one line per step, and ends with "So, the answer is
    N." Only the final answer is scored (``scoring.final_ok``)."""

    prompt: str
    count: int = 3
    terms: tuple[int, int] = (1, 12)  # 1728 problems: 800 distinct are needed
    more: tuple[str, ...] = ()

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt, *self.more)

    def problems(self) -> set[tuple[int, ...]]:
        """Every distinct (prompt index, operands...)."""
        low, high = self.terms
        out: set[tuple[int, ...]] = {(t,) for t in range(len(self.prompts))}
        for _ in range(self.count):
            out = {p + (x,) for p in out for x in range(low, high + 1)}
        return out

    def question(self, t: int, *xs: int) -> str:
        expr = " + ".join(map(str, xs))
        return WORKED_PROMPTS[self.prompts[t]].format(expr=expr, a=xs[0], b=xs[1], c=xs[2])

    def target(self, *xs: int) -> str:
        total = xs[0] + xs[1]
        lines = [f"First, we add {xs[0]} and {xs[1]}: {xs[0]} + {xs[1]} = {total}."]
        for x in xs[2:]:
            lines.append(f"Next, we add {x}: {total} + {x} = {total + x}.")
            total += x
        return "\n".join([*lines, f"So, the answer is {total}."])

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """One (question, worked solution) from ``rng``."""
        xs = tuple(rng.randint(*self.terms) for _ in range(self.count))
        t = rng.randrange(len(self.prompts)) if self.more else 0
        return self.question(t, *xs), self.target(*xs)

    def describe(self) -> dict:
        out = {
            "worked": self.prompt,
            "prompt": WORKED_PROMPTS[self.prompt],
            "count": self.count,
            "terms": self.terms,
        }
        if self.more:  # single-prompt descriptions stay as they were screened
            out["more"] = {k: WORKED_PROMPTS[k] for k in self.more}
        return out


WORKED_TENS_PROMPT = (
    "Calculate {a} + {b}. First add the tens, then add the ones, then add the two "
    "results. End with: So, the answer is <number>."
)


@dataclass(frozen=True)
class WorkedTensOnes:
    """Two-digit sums (operands from ``first`` and ``second``) solved by tens and ones in
    three steps, ending with "So, the answer is N."; the half-known add2d numbers."""

    first: tuple[int, int] = (10, 49)
    second: tuple[int, int] = (10, 49)

    def problems(self) -> set[tuple[int, int]]:
        (a0, a1), (b0, b1) = self.first, self.second
        return {(a, b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)}

    def question(self, a: int, b: int) -> str:
        return WORKED_TENS_PROMPT.format(a=a, b=b)

    def target(self, a: int, b: int) -> str:
        tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
        return "\n".join(
            [
                f"First, we add the tens: {a // 10 * 10} + {b // 10 * 10} = {tens}.",
                f"Next, we add the ones: {a % 10} + {b % 10} = {ones}.",
                f"Then we add the two results: {tens} + {ones} = {tens + ones}.",
                f"So, the answer is {a + b}.",
            ]
        )

    def draw(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(*self.first), rng.randint(*self.second)
        return self.question(a, b), self.target(a, b)

    def describe(self) -> dict:
        return {"worked": "tens_ones", "prompt": WORKED_TENS_PROMPT, "first": self.first,
                "second": self.second}  # fmt: skip


WORKED = (WorkedSum, WorkedTensOnes)  # the task kinds whose targets are worked solutions


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: in-domain and OOD problems, and the seeds of its data sets."""

    name: str
    in_domain: Terms | WorkedSum | WorkedTensOnes
    ood: Terms | WorkedSum | WorkedTensOnes
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
    # The model-strong end (issue 16), chosen by the screen in screen_tasks.py: one-digit
    # sums asked in ten phrasings; OOD the same skill one digit longer.
    "add1d": Task(
        "add1d",
        Terms("+", (1, 9), (1, 9), phrasings=PHRASINGS),
        Terms("+", (10, 99), (1, 9), both_orders=True),
        "one-digit sums 1-9 asked in ten phrasings; OOD a two-digit and a one-digit "
        "number, either order",
        seeds=(401, 402, 403, 20_000),
    ),
    # Worked solutions (issue 16, deliverable 5), chosen by the screen's rule (the first
    # candidate with a base final-answer accuracy in [0.25, 0.75]: 0.315): add2d's sums
    # solved by tens and ones; OOD the same on add2d's OOD numbers (50-99).
    "worked2d": Task(
        "worked2d",
        WorkedTensOnes(),
        WorkedTensOnes((50, 99), (50, 99)),
        "two numbers 10-49 solved by tens and ones in three steps; OOD both 50-99",
        seeds=(601, 602, 603, 30_000),
    ),
}

# Screened with the base model before any fine-tuning (screen_tasks.py; add2d's base
# score is in its own runs); the scale-2 protocol needs >= 800 distinct problems (200
# validation, 200 test, 400 training).
CANDIDATES = {
    "add1d": Terms("+", (1, 9), (1, 9)),
    "mul1d": Terms("*", (2, 9), (2, 9)),
    "add2d1d": Terms("+", (10, 99), (1, 9), both_orders=True),
    "add1d_phrased": Terms("+", (1, 9), (1, 9), phrasings=PHRASINGS),
    "mul1d_phrased": Terms("*", (2, 9), (2, 9), phrasings=PHRASINGS[:2] + PHRASINGS[5:7]),
    "add2d1d_ordered": Terms("+", (10, 99), (1, 9)),
    "sub2d1d": Terms("-", (10, 99), (1, 9)),
    # deliverable 5: worked solutions (three terms 1-12: 1728 problems per prompt)
    "worked3_guided": WorkedSum("guided"),
    "worked3_steps": WorkedSum("steps"),
    # added after those two screened below 0.25 (0.13, 0.055), before any run: one-digit
    # terms, two guided prompts (729 sums x 2 = 1458 problems)
    "worked3_1d_guided": WorkedSum("guided", terms=(1, 9), more=("guided_add",)),
    # added after that one screened 0.155, before any run: add2d's sums by tens and ones
    "worked2d_tens": WorkedTensOnes(),
}

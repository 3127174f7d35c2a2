"""The demo's task, its held-out sets and its scoring rules (pure Python, no model).

Task: 2-digit addition in SmolLM2-Instruct's own reply format,
"Calculate 18 + 26. Reply with only the equation and its result." -> "18 + 26 = 44".
The base model gets about a third of these right (its prior), which is where OTR,
a probability-weighted objective, can learn in a few minutes of CPU training.

- train and in-domain held-out: both terms 10-49, disjoint questions, fixed seeds;
- OOD: both terms 50-99 (the sum carries into the hundreds), never trained on;
- retention pool: other questions (1-digit products, short facts); the retention set
  is the part the base model answers right, so "after" shows what the fine-tune kept.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

SUFFIX = " Reply with only the equation and its result."
ID_RANGE = (10, 49)
OOD_RANGE = (50, 99)
SEEDS = {"train": 1, "in_domain": 2, "ood": 3}

# Products of 2..9 only: with a factor 0 or 1 a reply that merely repeats an operand
# ("7 * 1" -> "7") would count as right.
PRODUCT_RANGE = (2, 9)
FACT_SUFFIX = " Answer in one word."
FACTS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of Egypt?", "cairo"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("What color is a banana?", "yellow"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of day?", "night"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("Which planet do we live on?", "earth"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which planet is known as the red planet?", "mars"),
    ("What do bees make?", "honey"),
    ("What animal says meow?", "cat"),
    ("What is frozen water called?", "ice"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("What day comes after Monday?", "tuesday"),
    ("What month comes after January?", "february"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the largest ocean on Earth?", "pacific"),
]

NUM = re.compile(r"-?\d+")
WORD = re.compile(r"[a-z0-9]+")


def addition_items(
    n: int, seed: int, low: int, high: int, exclude: frozenset[str] | set[str] = frozenset()
) -> list[dict[str, str]]:
    """``n`` distinct addition problems with both terms in [low, high], none in ``exclude``."""
    possible = (high - low + 1) ** 2 - len(exclude)
    if n > possible:
        raise ValueError(f"only {possible} distinct sums with terms {low}-{high}, asked for {n}")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        question = f"Calculate {a} + {b}.{SUFFIX}"
        if question not in seen:
            seen.add(question)
            out.append({"question": question, "answer": f"{a} + {b} = {a + b}", "kind": "num"})
    return out


def retention_pool(n_products: int | None = None, n_facts: int | None = None) -> list[dict]:
    """Questions outside the task: 1-digit products (factors 2-9, asked in the task's
    reply format, so a changed format is not scored as lost knowledge) and one-word facts."""
    low, high = PRODUCT_RANGE
    products = [
        {"question": f"Calculate {a} * {b}.{SUFFIX}", "answer": str(a * b), "kind": "num"}
        for a in range(low, high + 1)
        for b in range(a, high + 1)
    ]
    facts = [{"question": q + FACT_SUFFIX, "answer": a, "kind": "fact"} for q, a in FACTS]
    return products[:n_products] + facts[:n_facts]


def build_sets(n_train: int, n_in_domain: int, n_ood: int) -> dict[str, list[dict]]:
    """Train, in-domain and OOD problems from fixed seeds; held-out never trained on."""
    in_domain = addition_items(n_in_domain, SEEDS["in_domain"], *ID_RANGE)
    held = frozenset(item["question"] for item in in_domain)
    train = addition_items(n_train, SEEDS["train"], *ID_RANGE, exclude=held)
    return {
        "train": train,
        "in_domain": in_domain,
        "ood": addition_items(n_ood, SEEDS["ood"], *OOD_RANGE),
    }


def chat_row(item: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A training row for Axolotl's ``chat_template`` type: one user turn, one reply."""
    return {
        "messages": [
            {"role": "user", "content": item["question"]},
            {"role": "assistant", "content": item["answer"]},
        ]
    }


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def expected(item: dict[str, str]) -> str:
    """What an item is scored on: the result of "a + b = c", or the answer itself."""
    return item["answer"].split("=")[-1].strip()


def is_right(reply: str, item: dict[str, str]) -> bool:
    """Exact final answer, read from the reply's first line.

    Arithmetic: the last integer of the first line is the result ("18 + 26 = 44" and
    "44" are right; "18 + 26" is not, it only repeats the question). Facts: the expected
    word is a word of the first line.
    """
    lines = reply.strip().split("\n")
    first = lines[0] if lines else ""
    if item["kind"] == "num":
        found = NUM.findall(first.replace(",", ""))
        return bool(found) and found[-1] == expected(item)
    return expected(item) in WORD.findall(first.lower())


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        raise ValueError("an interval needs at least one scored item")
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in [0, {n}], got {hits}")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

"""The scale-2 retention probe: skills the fine-tune does not train, generated offline.

``python -m experiments.otr_vs_sft.probe`` writes the candidate pool
(``experiments/otr_vs_sft/data/retention_pool.jsonl``, deterministic: fixed seeds and the
word lists below, no network); ``scale2.screen_probe`` asks the base model every item
once and keeps those it answers right strictly (the screen is cached by the pool's hash).
Forty-odd kept items cannot see a 5-point change (one item is 2.4 points); four hundred
can (binomial standard error about 1.5 points at 0.8).

Families (none of them is two-term addition, the skill scale 2 fine-tunes):
  mul      one-digit products, 2-9 (no x*0, x*1: the answer would be an operand)
  div      exact one-digit quotients ("Calculate 56 / 8.")
  sub      two-digit minus one-digit, the result never an operand
  units    unit conversions ("How many minutes are in 3 hours?")
  capital  capitals of countries (the capital's name is never in the question)
  letter   the letter after / before a letter, the first letter of a word
  calendar the day or month after / before another
  words    opposites and plurals
  numword  numbers written as words
  caps     an instruction format: reply with a given word in capital letters
Every item: ``family``, ``question``, ``answer``, ``scorer`` (see ``scoring.py``);
duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
POOL_PATH = os.path.join(HERE, "data", "retention_pool.jsonl")
SEED = 20261201

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "England": "London",
    "Russia": "Moscow",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "the Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "South Korea": "Seoul",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Kenya": "Nairobi",
    "Argentina": "Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Cuba": "Havana",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Scotland": "Edinburgh",
    "Wales": "Cardiff",
    "the Czech Republic": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Ukraine": "Kyiv",
    "Saudi Arabia": "Riyadh",
    "Syria": "Damascus",
    "Lebanon": "Beirut",
    "Pakistan": "Islamabad",
    "Afghanistan": "Kabul",
    "Nepal": "Kathmandu",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis",
    "Iceland": "Reykjavik",
    "Israel": "Jerusalem",
    "Jamaica": "Kingston",
    "Malaysia": "Kuala",
    "Bangladesh": "Dhaka",
    "India": "Delhi",
    "the United States": "Washington",
}

# (small unit, large unit in the plural, how many small units make one large one)
UNITS = [
    ("minutes", "hours", 60),
    ("seconds", "minutes", 60),
    ("hours", "days", 24),
    ("days", "weeks", 7),
    ("months", "years", 12),
    ("centimeters", "meters", 100),
    ("millimeters", "centimeters", 10),
    ("meters", "kilometers", 1000),
    ("grams", "kilograms", 1000),
    ("inches", "feet", 12),
    ("cents", "dollars", 100),
    ("years", "decades", 10),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "day": "night",
    "left": "right",
    "yes": "no",
    "fast": "slow",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "high": "low",
    "early": "late",
    "old": "young",
    "rich": "poor",
    "hard": "soft",
    "wet": "dry",
    "full": "empty",
    "strong": "weak",
    "thick": "thin",
    "long": "short",
    "win": "lose",
    "push": "pull",
    "in": "out",
    "buy": "sell",
    "true": "false",
    "first": "last",
    "inside": "outside",
    "heavy": "light",
    "clean": "dirty",
    "loud": "quiet",
    "above": "below",
    "before": "after",
    "north": "south",
    "east": "west",
    "black": "white",
    "good": "bad",
    "love": "hate",
    "start": "finish",
    "friend": "enemy",
}

PLURALS = {
    "mouse": "mice",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "woman": "women",
    "goose": "geese",
    "person": "people",
    "ox": "oxen",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "life": "lives",
    "city": "cities",
    "baby": "babies",
    "box": "boxes",
    "bus": "buses",
    "fox": "foxes",
    "cat": "cats",
    "dog": "dogs",
    "book": "books",
    "car": "cars",
    "tree": "trees",
    "house": "houses",
    "bird": "birds",
    "apple": "apples",
    "chair": "chairs",
    "table": "tables",
    "cup": "cups",
    "door": "doors",
    "girl": "girls",
    "boy": "boys",
    "church": "churches",
    "dish": "dishes",
    "glass": "glasses",
    "party": "parties",
    "story": "stories",
    "hero": "heroes",
    "potato": "potatoes",
    "wife": "wives",
}

NOUNS = (
    "garden window river mountain pencil button kitten rabbit yellow purple monkey basket "
    "tomato carrot lemon banana cherry orange pillow blanket candle mirror ladder hammer "
    "wallet rocket planet forest desert island valley bridge castle tower market school "
    "doctor farmer sailor pilot singer dancer winter summer spring autumn morning evening "
    "silver copper marble cotton velvet paper plastic bottle jacket sweater helmet "
    "guitar piano violin trumpet drum zebra tiger lion horse donkey turtle dolphin whale "
    "shark eagle parrot pigeon spider beetle butterfly flower tulip daisy rose cactus "
    "bamboo pepper garlic onion noodle butter cheese bread cookie muffin pancake sugar "
    "honey coffee kettle bucket shovel wagon tractor engine ticket letter number puzzle "
    "ribbon feather pebble crystal diamond rainbow thunder lightning cloud breeze shadow "
    "whistle wizard dragon goblin knight queen king prince jungle meadow harbor "
    "village street corner circle square triangle"
).split()

# More nouns (issue 16: the first screen kept 311 of 1023 candidates, short of 400; the
# families the base answers best, first letters and plurals, were extended).
NOUNS_MORE = (
    "table chair sofa lamp clock phone radio camera tablet laptop keyboard screen "
    "printer folder stapler eraser marker crayon brush canvas easel statue museum "
    "theater cinema stadium temple palace cottage cabin barn stable fence gate porch roof "
    "chimney garage cellar kitchen bedroom hallway closet drawer shelf cupboard fridge oven "
    "stove sink faucet towel soap sponge broom mop vacuum laundry shirt trousers skirt dress "
    "scarf glove sock shoe boot sandal slipper belt pocket collar sleeve zipper needle thread "
    "yarn wool linen silk leather rubber metal steel iron nickel zinc glass wood stone brick "
    "cement sand gravel soil clay mud dust smoke steam fog mist rain snow hail frost storm "
    "wind tornado volcano canyon cliff cave hill lake pond stream ocean beach coast bay gulf "
    "reef wave tide shell crab lobster oyster salmon trout tuna cod eel frog toad lizard snake "
    "crocodile camel giraffe hippo rhino panda koala kangaroo wolf fox bear deer moose goat "
    "sheep cow pig duck goose turkey chicken rooster owl hawk crow robin swan penguin bat mole "
    "rat hamster puppy lamb calf pony mule bee wasp ant fly moth worm snail slug"
).split()
# Nouns without a plural of their own, or with one that is not noun + "s".
NO_REGULAR_PLURAL = set(
    "sugar honey coffee butter cheese bread silver copper marble cotton velvet paper "
    "plastic thunder lightning rain snow hail frost wind fog mist smoke steam dust mud clay "
    "soil sand gravel cement wool linen silk leather rubber metal steel iron nickel zinc "
    "glass wood stone brick laundry garlic bamboo sheep deer moose salmon trout tuna cod "
    "trousers mouse goose".split()
)

CAPS_WORDS = (
    "banana table river cloud music water green happy simple garden pencil window "
    "orange yellow planet silver rabbit dragon winter summer coffee cookie butter bread "
    "doctor castle forest island market school ticket rocket guitar piano tiger horse "
    "turtle eagle spider flower honey sugar candle mirror hammer bottle jacket helmet "
    "bridge tower valley desert purple kitten monkey lemon cherry pillow basket ladder "
    "wallet thunder rainbow shadow feather pebble crystal diamond wizard knight queen "
    "prince jungle meadow harbor village street circle square yes hello thanks morning "
    "evening night apple grape peach melon carrot potato onion pepper"
).split()

NUMBER_WORDS = {
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
    13: "thirteen",
    14: "fourteen",
    15: "fifteen",
    16: "sixteen",
    17: "seventeen",
    18: "eighteen",
    19: "nineteen",
    20: "twenty",
    30: "thirty",
    40: "forty",
    50: "fifty",
    60: "sixty",
    70: "seventy",
    80: "eighty",
    90: "ninety",
    100: "hundred",
}


def _item(family: str, question: str, answer: str, scorer: str) -> dict[str, str]:
    return {"family": family, "question": question, "answer": answer, "scorer": scorer}


def _arith(rng: random.Random) -> list[dict[str, str]]:
    out = []
    for a in range(2, 10):
        for b in range(2, 10):
            out.append(_item("mul", f"Calculate {a} * {b}.", str(a * b), "num"))
            out.append(_item("mul", f"What is {a} times {b}?", str(a * b), "num"))
            if a != b:  # a * b / b = a; a == b would make the answer the divisor
                out.append(_item("div", f"Calculate {a * b} / {b}.", str(a), "num"))
    subs = [(a, b) for a in range(11, 100) for b in range(2, 10) if a - b != b]
    for a, b in rng.sample(subs, 200):
        out.append(_item("sub", f"Calculate {a} - {b}.", str(a - b), "num"))
    return out


def _units() -> list[dict[str, str]]:
    out = []
    for small, large, factor in UNITS:
        for q in range(2, 13):
            question = f"How many {small} are in {q} {large}?"
            out.append(_item("units", question, str(q * factor), "num"))
    return out


def _facts() -> list[dict[str, str]]:
    out = []
    for country, city in CAPITALS.items():
        question = f"What is the capital of {country}? Answer in one word."
        out.append(_item("capital", question, city.lower(), "word"))
    for i, day in enumerate(DAYS):
        nxt, prev = DAYS[(i + 1) % 7], DAYS[i - 1]
        out.append(_item("calendar", f"What day comes after {day}?", nxt.lower(), "word"))
        out.append(_item("calendar", f"What day comes before {day}?", prev.lower(), "word"))
    for i, month in enumerate(MONTHS):
        nxt, prev = MONTHS[(i + 1) % 12], MONTHS[i - 1]
        out.append(_item("calendar", f"What month comes after {month}?", nxt.lower(), "word"))
        out.append(_item("calendar", f"What month comes before {month}?", prev.lower(), "word"))
    for word, opposite in OPPOSITES.items():
        question = f"What is the opposite of {word}? Answer in one word."
        out.append(_item("words", question, opposite, "word"))
    for word, plural in PLURALS.items():
        question = f"What is the plural of {word}? Answer in one word."
        out.append(_item("words", question, plural, "word"))
    for noun in dict.fromkeys(NOUNS + NOUNS_MORE):
        regular = not noun.endswith(("s", "x", "y", "ch", "sh", "o", "f", "fe", "us", "z"))
        if regular and noun not in NO_REGULAR_PLURAL and noun not in PLURALS:
            question = f"What is the plural of {noun}? Answer in one word."
            out.append(_item("words", question, noun + "s", "word"))
    for n, word in NUMBER_WORDS.items():
        out.append(_item("numword", f"Write the number {n} in words.", word, "word"))
        out.append(_item("numword", f'What number is "{word}"? Reply with digits.', str(n), "num"))
    return out


def _letters() -> list[dict[str, str]]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for i, letter in enumerate(alphabet):
        after = alphabet[i + 1] if i + 1 < len(alphabet) else None
        before = alphabet[i - 1] if i > 0 else None
        if after and after not in "AI":
            q = f"Which letter comes right after {letter} in the English alphabet?"
            out.append(_item("letter", q, after, "letter"))
        if before and before not in "AI":
            q = f"Which letter comes right before {letter} in the English alphabet?"
            out.append(_item("letter", q, before, "letter"))
    for noun in dict.fromkeys(NOUNS + NOUNS_MORE):
        if noun[0] not in "ai":
            q = f'What is the first letter of the word "{noun}"?'
            out.append(_item("letter", q, noun[0].upper(), "letter"))
    return out


def _caps() -> list[dict[str, str]]:
    out = []
    for word in CAPS_WORDS:
        q = f'Reply with only the word "{word}" written in capital letters.'
        out.append(_item("caps", q, word.upper(), "word_case"))
    return out


def generate_pool() -> list[dict[str, str]]:
    """Every candidate item, deduplicated by question, in a fixed order."""
    rng = random.Random(SEED)
    items = _arith(rng) + _units() + _facts() + _letters() + _caps()
    seen, out = set(), []
    for item in items:
        if item["question"] not in seen:
            seen.add(item["question"])
            out.append(item)
    _check_not_degenerate(out)
    return out


def _check_not_degenerate(items: list[dict[str, str]]) -> None:
    """No answer may be read off its question: not a number of it, not one of its words."""
    import re

    for item in items:
        q = item["question"]
        if item["scorer"] == "num" and item["answer"] in re.findall(r"\d+", q):
            raise ValueError(f"degenerate item (answer is an operand): {item}")
        if item["scorer"] in ("word", "letter"):
            if item["answer"].lower() in re.findall(r"[a-z0-9]+", q.lower()):
                raise ValueError(f"degenerate item (answer is a word of the question): {item}")


# Families whose answers are names, never function words: a strict reply must not give
# another of them too ("Paris, Rome or Madrid" is a list of guesses, not an answer).
EXCLUSIVE = ("capital", "calendar", "letter")


def family_others(items: list[dict]) -> list[dict]:
    """Each item with ``others``: for ``EXCLUSIVE`` families, the family's answers that its
    question does not name, which a strict reply must not also give; else empty."""
    import re

    vocab: dict[str, set[str]] = {}
    for item in items:
        vocab.setdefault(item["family"], set()).add(item["answer"].lower())
    out = []
    for item in items:
        named = set(re.findall(r"[a-z0-9]+", item["question"].lower()))
        if item["family"] not in EXCLUSIVE:
            others = set()
        elif item["scorer"] == "letter":
            named = {w.upper() for w in named if len(w) == 1}
            others = {a.upper() for a in vocab[item["family"]]} - named - {item["answer"]}
        else:
            others = vocab[item["family"]] - named - {item["answer"]}
        out.append({**item, "others": frozenset(others)})
    return out


def write_pool(path: str = POOL_PATH) -> str:
    items = generate_pool()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item, sort_keys=True) + "\n")
    return path


def load_pool(path: str = POOL_PATH) -> list[dict]:
    """The committed pool; refuses one that the generator would no longer produce."""
    with open(path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    if items != generate_pool():
        raise ValueError(f"{path} differs from probe.generate_pool(): rerun probe.py")
    return items


def pool_hash(items: list[dict]) -> str:
    blob = json.dumps(items, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


if __name__ == "__main__":
    from collections import Counter

    pool = generate_pool()
    print(write_pool(), len(pool), dict(Counter(x["family"] for x in pool)))

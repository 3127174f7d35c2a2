"""Reply scorers for scale 2: credit an answer only where the reply states it as the answer.

The earlier scorer took "the last integer of the first line" and, leniently, "any integer
of the reply". A reply cut mid-sentence ("To calculate 7 * 0, we need") was credited
because its last integer happened to be the operand 0, and leniently every reply that
repeated an operand equal to the answer. Here a number counts only when the reply states
it: after "=", "is", "are", "equals", "makes" or ":", or as the whole line; and not when
an arithmetic operator follows it ("= 56 + 3" states no 56). Items whose answer is an
operand (x * 1, x - 0, ...) are dropped where they are generated, so no scorer has to
tell the two apart.

strict: the first line of the reply states the answer (the last number it states is the
answer; for words, the answer is a word of the first line and no other answer of the
same family that the question does not name is). lenient: some line of the reply states
it (numbers), the answer is a word of the reply (words), so a reply that changed format
but kept the knowledge is told apart from one that lost it.
"""

from __future__ import annotations

import re

_NUM = r"-?\d+(?:\.\d+)?"
# A number stated as an answer: after a cue word or sign, or alone on its line, and not
# the left operand of a further operation.
_CUE = r"(?:=|\bis\b|\bare\b|\bequals\b|\bmakes\b|\bequal to\b|:)"
_STATED = re.compile(rf"{_CUE}\s*\$?\s*({_NUM})(?![\d.]*\s*[-+*/×x^%]\s*\d)(?!\.\d)")
_ALONE = re.compile(rf"^\W*({_NUM})\W*$")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CASED_WORD = re.compile(r"[A-Za-z0-9]+")
# A letter standing alone ("G", "'g'"), not the tail of a contraction ("it's").
_LETTER = re.compile(r"(?<![A-Za-z0-9])(?<![A-Za-z]')([A-Za-z])(?![A-Za-z0-9])(?!'[A-Za-z])")

SCORERS = ("num", "final", "word", "word_case", "letter")


def _lines(reply: str) -> list[str]:
    """Non-empty lines, markdown emphasis and thousands separators removed."""
    text = reply.replace("**", "").replace("`", "")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return [line.strip() for line in text.split("\n") if line.strip()]


def stated_numbers(line: str) -> list[str]:
    """The numbers ``line`` states as an answer, in order."""
    alone = _ALONE.match(line)
    if alone:
        return [alone.group(1)]
    return _STATED.findall(line)


def _same_number(found: str, answer: str) -> bool:
    try:
        return float(found) == float(answer)
    except ValueError:
        return False


def num_ok(reply: str, answer: str, lenient: bool = False) -> bool:
    """strict: the last number the first line states is ``answer``; lenient: some line
    states ``answer``."""
    lines = _lines(reply)
    if not lines:
        return False
    if lenient:
        return any(_same_number(x, answer) for line in lines for x in stated_numbers(line))
    stated = stated_numbers(lines[0])
    return bool(stated) and _same_number(stated[-1], answer)


def final_ok(reply: str, answer: str, lenient: bool = False) -> bool:
    """A worked solution's final answer. strict: the last number the reply states (over
    all its lines: the answer a solution ends with) is ``answer``; lenient: some line
    states ``answer`` (as ``num_ok``, intermediate results included)."""
    lines = _lines(reply)
    if lenient:
        return num_ok(reply, answer, lenient=True)
    stated = [x for line in lines for x in stated_numbers(line)]
    return bool(stated) and _same_number(stated[-1], answer)


def word_ok(
    reply: str, answer: str, lenient: bool = False, others: frozenset[str] = frozenset()
) -> bool:
    """``answer`` (lower case, one word) is a word of the first line and none of ``others``
    is (strict), or ``answer`` is a word of the reply (lenient)."""
    lines = _lines(reply.lower())
    if not lines:
        return False
    if lenient:
        return answer in _WORD.findall(" ".join(lines))
    words = set(_WORD.findall(lines[0]))
    return answer in words and not (words & others)


def word_case_ok(reply: str, answer: str, lenient: bool = False) -> bool:
    """Case-sensitive ``answer`` as a word of the first line (strict) or of the reply."""
    lines = _lines(reply)
    if not lines:
        return False
    text = " ".join(lines) if lenient else lines[0]
    return answer in _CASED_WORD.findall(text)


def letter_ok(
    reply: str, answer: str, lenient: bool = False, others: frozenset[str] = frozenset()
) -> bool:
    """The single letter ``answer`` (any case) stands alone in the first line and no other
    letter of ``others`` does (strict), or stands alone somewhere in the reply (lenient).
    Items never ask for "A" or "I", which stand alone as words."""
    lines = _lines(reply)
    if not lines:
        return False
    text = " ".join(lines) if lenient else lines[0]
    letters = {x.upper() for x in _LETTER.findall(text) if x not in ("a", "I")}
    if lenient:
        return answer.upper() in letters
    return answer.upper() in letters and not (letters & others)


def ok(reply: str, item: dict, lenient: bool = False) -> bool:
    """Score ``reply`` against a probe or task item (``answer``, ``scorer``, ``others``)."""
    kind = item["scorer"]
    others = item.get("others", frozenset())
    if kind == "num":
        return num_ok(reply, item["answer"], lenient)
    if kind == "final":
        return final_ok(reply, item["answer"], lenient)
    if kind == "word":
        return word_ok(reply, item["answer"], lenient, others)
    if kind == "word_case":
        return word_case_ok(reply, item["answer"], lenient)
    if kind == "letter":
        return letter_ok(reply, item["answer"], lenient, others)
    raise ValueError(f"unknown scorer {kind!r}; expected one of {SCORERS}")

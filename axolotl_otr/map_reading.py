"""Read the measured map of "when does OTR help?" from the user's side (pure Python).

The map (``otr_map.json``, shipped in the package; its source is
``experiments/otr_vs_sft/results/otr_map.json``, derived by
``experiments/otr_vs_sft/otr_map.py`` from the committed results) holds measured
levels: each a base model on its fine-tuning data, indexed by the mean probability it
gives the target tokens (``p_target``) and the share of targets that are its argmax, with
each method's in-domain difference to SFT. A run
measures the same two numbers on its own first optimizer step, so it can be placed on
that axis before any update.

The rule (stated in README, "Reading the metrics"): the user's ``p_target`` is placed
between, below or above the measured levels; at the nearest level (or the two that
bracket it) each method the map names is read from its 95% interval of method - SFT:
above 0 "OTR helped there", below 0 "SFT was better there", containing 0 "no measured
difference", no interval "not tested". A level recommends OTR (the methods that helped)
if one helped, SFT if every tested method was worse, and otherwise says that OTR gave no
measured gain there; two bracketing levels that disagree give no single recommendation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

MAP_FILE = "otr_map.json"  # inside the package
SOURCE = "experiments/otr_vs_sft/results/otr_map.json"  # where the shipped copy comes from


def load_map() -> dict[str, Any]:
    """The map shipped with the package (a copy of ``SOURCE``)."""
    text = resources.files(__package__).joinpath(MAP_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class _Advice:
    """What one level says: ``kind`` otr / sft / level / none, and the sentence."""

    kind: str
    methods: tuple[str, ...]
    text: str


def _p(value: float) -> str:
    """A probability: two decimals, or two significant digits below 0.01 (not "0.00")."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.2g}"


def _share(value: float) -> str:
    return f"{value:.0%}" if value >= 0.01 or value == 0 else f"{value:.2%}"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"OTR map: {what} must be a finite number, got {value!r}")
    return float(value)


def _levels(otr_map: dict[str, Any]) -> list[dict[str, Any]]:
    """The map's levels sorted by p_target, checked enough to read them safely."""
    if not isinstance(otr_map, dict) or not isinstance(otr_map.get("levels"), list):
        raise ValueError("OTR map: expected a JSON object with a 'levels' list")
    if not isinstance(otr_map.get("methods"), dict):
        raise ValueError("OTR map: expected 'methods', a {method: label} object")
    levels = []
    for i, level in enumerate(otr_map["levels"]):
        if not isinstance(level, dict) or not isinstance(level.get("differences"), dict):
            raise ValueError(f"OTR map: level {i} needs a 'differences' object")
        for key in ("p_target", "argmax_share"):
            value = _number(level.get(key), f"level {i} {key}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"OTR map: level {i} {key} {value} is outside [0, 1]")
        levels.append(level)
    return sorted(levels, key=lambda lv: lv["p_target"])


def verdict(difference: dict[str, Any]) -> str:
    """``helped`` / ``worse`` / ``no difference`` from a 95% interval; ``not tested``
    without one."""
    lo, hi = difference.get("lo"), difference.get("hi")
    if lo is None or hi is None:
        return "not tested"
    lo, hi = _number(lo, "an interval bound"), _number(hi, "an interval bound")
    if lo > 0:
        return "helped"
    if hi < 0:
        return "worse"
    return "no difference"


def _difference_text(label: str, difference: dict[str, Any]) -> str:
    mean = _number(difference.get("mean"), f"{label}: mean")
    lo, hi = difference.get("lo"), difference.get("hi")
    if lo is None or hi is None:
        spread = difference.get("std")
        extra = f" ± {spread:.3f} std" if isinstance(spread, int | float) else ""
        return f"{label} - SFT {mean:+.3f}{extra} (no interval)"
    return f"{label} - SFT {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _advice(level: dict[str, Any], labels: dict[str, str]) -> _Advice:
    found = {m: level["differences"][m] for m in labels if m in level["differences"]}
    by = {"helped": [], "worse": [], "no difference": [], "not tested": []}
    for method, difference in found.items():
        by[verdict(difference)].append(method)
    names = {k: " and ".join(labels[m] for m in v) for k, v in by.items()}
    tested = by["helped"] + by["worse"] + by["no difference"]
    if by["helped"]:
        return _Advice(
            "otr",
            tuple(by["helped"]),
            f"OTR helped there ({names['helped']}): the map recommends {names['helped']}",
        )
    if tested and len(by["worse"]) == len(tested):
        return _Advice("sft", (), "SFT was better there: the map recommends SFT (otr off)")
    if tested:
        worse = f"; SFT was better than {names['worse']}" if by["worse"] else ""
        return _Advice(
            "level",
            tuple(by["no difference"]),
            f"no measured difference between SFT and {names['no difference']} there{worse}: "
            "the map shows no gain from OTR to recommend it over SFT",
        )
    return _Advice("none", (), "no interval measured there: the map makes no recommendation")


def _level_text(level: dict[str, Any], labels: dict[str, str]) -> str:
    parts = [
        _difference_text(labels[m], level["differences"][m])
        for m in labels
        if m in level["differences"]
    ]
    name = level.get("name", "a measured level")
    head = f"{name} (p {_p(level['p_target'])}, argmax {_share(level['argmax_share'])}"
    return head + ("; " + ", ".join(parts) if parts else "") + ")"


def read_map(
    p_target: float, argmax_share: float, otr_map: dict[str, Any], tokens: int | None = None
) -> str:
    """One line: where (``p_target``, ``argmax_share``) sits on ``otr_map`` and what the
    map recommends there (the rule in this module's docstring)."""
    source = otr_map.get("source", SOURCE) if isinstance(otr_map, dict) else SOURCE
    if not (isinstance(p_target, int | float) and math.isfinite(p_target)):
        return "OTR map: no target token in the first optimizer step; nothing to place on the map"
    counted = f", {tokens} target tokens of the first optimizer step" if tokens else ""
    you = (
        f"OTR map: your base model gives the targets mean p {_p(p_target)} "
        f"(argmax {_share(argmax_share)}{counted})"
    )
    levels = _levels(otr_map)
    if not levels:
        skipped = len(otr_map.get("skipped", []))
        why = f"{skipped} measured levels have no token measures yet; " if skipped else ""
        return f"{you}: no measured level to compare with ({why}source: {source})"
    labels = {str(m): str(label) for m, label in otr_map["methods"].items()}
    below = [lv for lv in levels if lv["p_target"] <= p_target]
    above = [lv for lv in levels if lv["p_target"] > p_target]
    if below and below[-1]["p_target"] == p_target:
        near, where = [below[-1]], "at the measured level "
    elif not below:
        near, where = [above[0]], "below the lowest measured level "
    elif not above:
        near, where = [below[-1]], "above the highest measured level "
    else:
        near, where = [below[-1], above[0]], "between the measured levels "
    place = where + " and ".join(_level_text(lv, labels) for lv in near)
    advice = [_advice(lv, labels) for lv in near]
    if len(advice) == 2 and (advice[0].kind, advice[0].methods) != (
        advice[1].kind,
        advice[1].methods,
    ):
        says = (
            f"the two levels disagree (below: {advice[0].text}; above: {advice[1].text}), "
            "so the map makes no single recommendation"
        )
    else:
        says = advice[0].text
    scope = otr_map.get("scope")
    tail = f"map: {scope}; source: {source}" if scope else f"source: {source}"
    return f"{you}: {place}; {says} ({tail})"


# The two settings a user would choose between, by their config spelling, and where the
# evidence behind each verdict is written up.
LINE_METHODS = {"otr_sampled": "pure OTR", "otr_mix0.3": "otr_sft_mix 0.3"}
LINE_VERDICTS = {
    "helped": "helped",
    "worse": "worse than SFT",
    "no difference": "no gain over SFT",
    "not tested": "not measured",
}
READ_MORE = "see README 'When does OTR help?'"
MAX_LINE = 200
FAR = 0.1  # a nearest level further than this in p(target) is named with its distance


def nearest_level(p_target: float, argmax_share: float, levels: list[dict[str, Any]]) -> dict:
    """The level nearest by p_target; the argmax share breaks a tie."""
    return min(
        levels,
        key=lambda lv: (abs(lv["p_target"] - p_target), abs(lv["argmax_share"] - argmax_share)),
    )


def map_line(p_target: float, argmax_share: float, otr_map: dict[str, Any]) -> str:
    """The one line (at most ``MAX_LINE`` characters) the trainer prints at the first
    step: the nearest measured level and its verdict for pure OTR and for
    ``otr_sft_mix: 0.3``. ``read_map`` gives the full reasoning (the debug log)."""
    if not (isinstance(p_target, int | float) and math.isfinite(p_target)):
        return "OTR map: no target token in the first optimizer step; nothing to place"
    finite = isinstance(argmax_share, int | float) and math.isfinite(argmax_share)
    share = float(argmax_share) if finite else 0.5  # no tie-break without a share
    you = f"OTR map: your p(target) {_p(p_target)}" + (
        f", argmax {_share(share)}" if finite else ""
    )
    levels = _levels(otr_map)
    if not levels:
        return f"{you}; the map has no measured level yet"
    level = nearest_level(p_target, share, levels)
    if p_target < levels[0]["p_target"]:
        where = "below the map; nearest level"
    elif p_target > levels[-1]["p_target"]:
        where = "above the map; nearest level"
    else:
        where = "nearest level"
    verdicts = ", ".join(
        f"{label} {LINE_VERDICTS[verdict(level['differences'].get(method, {}))]}"
        for method, label in LINE_METHODS.items()
    )
    gap = abs(level["p_target"] - p_target)
    away = f" ({gap:.2f} away)" if gap > FAR else ""
    line = f"{you}; {where} p {_p(level['p_target'])}{away}: {verdicts} ({READ_MORE})"
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"

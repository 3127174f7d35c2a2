"""Print the OTR metrics of an `axolotl train` run from its captured console output.

Usage: ``python examples/tiny/summarize_run.py LOGFILE``. Reads the log dicts the
Trainer prints (``{'loss': ..., 'otr/ce': ...}``) and shows the first and last steps,
so a user sees at a glance that the run learns even though OTR loss values are small.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

LOG_DICT = re.compile(r"\{'(?:loss|eval_loss)':[^{}]*\}")
COLUMNS = ("loss", "otr/ce", "otr/p_target", "otr/hit_rate", "otr/entropy")


def parse_logs(output: str) -> list[dict[str, float]]:
    """The log dicts printed by the Trainer, with numeric values as floats."""
    logs = []
    for match in LOG_DICT.finditer(output):
        raw = ast.literal_eval(match.group(0))
        logs.append({key: float(value) for key, value in raw.items() if _is_number(value)})
    return logs


def _is_number(value: object) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _mean(logs: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(log[key] for log in logs) / len(logs) for key in logs[0]}


def summarize(logs: list[dict[str, float]], edge: int = 3) -> str:
    steps = [log for log in logs if "loss" in log]
    if not steps:
        return "no training steps were logged"
    shown = steps if len(steps) <= 2 * edge else steps[:edge] + steps[-edge:]
    lines = ["step  " + "  ".join(f"{c:>13}" for c in COLUMNS)]
    for log in shown:
        number = steps.index(log) + 1
        values = "  ".join(f"{log.get(c, float('nan')):>13.5g}" for c in COLUMNS)
        lines.append(f"{number:>4}  {values}")
    if "otr/ce" in steps[0]:
        # Single steps are noisy (few target tokens each): compare the first and last
        # tenth of the run (at least one step each).
        span = max(1, len(steps) // 10)
        first, last = _mean(steps[:span]), _mean(steps[-span:])
        lines.append(
            f"mean of the first vs last {span} step(s): "
            f"cross-entropy on the targets {first['otr/ce']:.4f} -> {last['otr/ce']:.4f}, "
            f"p(target) {first['otr/p_target']:.4f} -> {last['otr/p_target']:.4f}, "
            f"hit rate {first['otr/hit_rate']:.4f} -> {last['otr/hit_rate']:.4f}"
        )
    else:
        lines.append("no otr/* metrics in this run: OTR was off (plain cross-entropy)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        print(f"no such log file: {path}", file=sys.stderr)
        return 2
    print(summarize(parse_logs(path.read_text(errors="replace"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Print the OTR metrics of an `axolotl train` run from its captured console output.

Usage: ``python -m examples.tiny.summarize_run LOGFILE [--plot PNG]``. Reads the log
dicts the Trainer prints (``{'loss': ..., 'otr/ce': ...}``) and shows the first and last
steps, so a user sees at a glance that the run learns even though OTR loss values are
small. With ``--plot`` it also draws the OTR metrics over the steps (needs matplotlib).
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


def _mean(logs: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """The mean of each key over the logs that carry it (NaN where none does).

    Logs differ in their keys: the first training log alone carries the first-window
    measures (``otr/first_window_*``), so no log's keys stand for the others'."""
    means = {}
    for key in keys:
        values = [log[key] for log in logs if key in log]
        means[key] = sum(values) / len(values) if values else float("nan")
    return means


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
    if any("otr/ce" in log for log in steps):
        # Single steps are noisy (few target tokens each): compare the first and last
        # tenth of the run (at least one step each).
        span = max(1, len(steps) // 10)
        first, last = _mean(steps[:span], COLUMNS), _mean(steps[-span:], COLUMNS)
        lines.append(
            f"mean of the first vs last {span} step(s): "
            f"cross-entropy on the targets {first['otr/ce']:.4f} -> {last['otr/ce']:.4f}, "
            f"p(target) {first['otr/p_target']:.4f} -> {last['otr/p_target']:.4f}, "
            f"hit rate {first['otr/hit_rate']:.4f} -> {last['otr/hit_rate']:.4f}"
        )
    else:
        lines.append("no otr/* metrics in this run: OTR was off (plain cross-entropy)")
    return "\n".join(lines)


PLOTTED = (
    ("loss", "OTR loss (not a cross-entropy)"),
    ("otr/ce", "cross-entropy on the targets"),
    ("otr/p_target", "mean p(target)"),
    ("otr/hit_rate", "hit rate of the K samples"),
    ("otr/entropy", "entropy of the policy (nats)"),
)


def plot(logs: list[dict[str, float]], path: Path) -> Path:
    """Write a PNG of the OTR metrics over the training steps; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [log for log in logs if "loss" in log]
    if not steps:
        raise ValueError("no training steps were logged: nothing to plot")
    x = list(range(1, len(steps) + 1))
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(3.2 * len(PLOTTED), 2.8))
    window = max(1, len(steps) // 10)
    for ax, (key, title) in zip(axes, PLOTTED, strict=True):
        values = [log.get(key, float("nan")) for log in steps]
        ax.plot(x, values, lw=0.8, alpha=0.35, color="tab:blue", label="per step")
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1])
            / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(x, smooth, lw=1.6, color="tab:blue", label=f"mean of {window} steps")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("OTR fine-tune: metrics per optimizer step", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    png = None
    if "--plot" in args:
        at = args.index("--plot")
        if at + 1 >= len(args):
            print("--plot needs a PNG path", file=sys.stderr)
            return 2
        png = Path(args[at + 1])
        args = args[:at] + args[at + 2 :]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        print(f"no such log file: {path}", file=sys.stderr)
        return 2
    logs = parse_logs(path.read_text(errors="replace"))
    print(summarize(logs))
    if png is not None:
        print(f"metrics plot: {plot(logs, png).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bench/results/generalization.png from the two result files (learning curves + bars)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

MAIN = ["sft", "dft", "otr_sampled", "otr_exact"]
COLORS = {
    "sft": "tab:blue",
    "dft": "tab:orange",
    "otr_sampled": "tab:green",
    "otr_exact": "tab:red",
}
METRICS = ["in_domain", "ood", "retention"]


def _curves(runs, method, metric):
    items = [r for r in runs if r["setting"] == "best_lr" and r["method"] == method]
    if not items:
        return None
    steps = [p["step"] for p in items[0]["curve"]]
    vals = np.array([[p[metric] for p in r["curve"]] for r in items])
    return np.array(steps), vals.mean(0), vals.std(0, ddof=1) if len(items) > 1 else 0 * vals[0]


def _bars(ax, runs, setting, title):
    width = 0.2
    x = np.arange(len(METRICS))
    for i, m in enumerate(MAIN):
        items = [r for r in runs if r["setting"] == setting and r["method"] == m]
        if not items:
            continue
        vals = np.array([[r[k] for k in METRICS] for r in items])
        err = vals.std(0, ddof=1) if len(items) > 1 else np.zeros(len(METRICS))
        ax.bar(
            x + (i - 1.5) * width,
            vals.mean(0),
            width,
            yerr=err,
            capsize=2,
            color=COLORS[m],
            label=m,
        )
    ax.set_xticks(x, METRICS)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)


def plot(out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    s1 = os.path.join(out_dir, "generalization.json")
    s2 = os.path.join(out_dir, "real_model.json")
    if os.path.exists(s1):
        d = json.load(open(s1))
        runs = d["runs"]
        n = len({r["seed"] for r in runs if r["setting"] == "best_lr"})
        for ax, metric in zip(axes[0, :3], METRICS, strict=True):
            for m in MAIN:
                c = _curves(runs, m, metric)
                if c is None:
                    continue
                steps, mean, std = c
                ax.plot(steps, mean, color=COLORS[m], label=m)
                ax.fill_between(steps, mean - std, mean + std, color=COLORS[m], alpha=0.15)
            ax.set_title(
                f"scale 1: {metric} vs step (own best LR, mean ± std, {n} seeds)", fontsize=9
            )
            ax.set_xlabel("fine-tuning step")
            ax.set_ylim(0, 1.05)
        axes[0, 0].legend(fontsize=8)
        ax = axes[1, 0]
        for m in MAIN:
            items = [r for r in runs if r["setting"] == "best_lr" and r["method"] == m]
            if not items or not items[0].get("train_logs"):
                continue
            steps = [e.get("step", i) for i, e in enumerate(items[0]["train_logs"])]
            ce = np.array([[e.get("otr/ce", np.nan) for e in r["train_logs"]] for r in items])
            ax.plot(steps[: ce.shape[1]], ce.mean(0), color=COLORS[m], marker="o", label=m)
        ax.set_yscale("log")
        ax.set_title("scale 1: training cross-entropy (nats/token, mean over seeds)", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        _bars(axes[1, 1], runs, "best_lr", "scale 1: final, each at own best LR")
        _bars(axes[1, 2], runs, "equal_time", "scale 1: at SFT's wall time")
        _bars(axes[2, 0], runs, "sft_lr", "scale 1: final, all at SFT's best LR")
    if os.path.exists(s2):
        d = json.load(open(s2))
        runs = d["runs"]
        n = len({r["seed"] for r in runs if r["setting"] == "best_lr"})
        base = d["base_model"]
        for ax, setting, title in (
            (axes[2, 1], "best_lr", f"scale 2 (SmolLM2-135M LoRA): own best LR, {n} seed(s)"),
            (axes[2, 2], "sft_lr", "scale 2: all at SFT's best LR"),
        ):
            _bars(ax, runs, setting, title)
            ax.scatter(
                np.arange(3),
                [base[k] for k in METRICS],
                marker="_",
                s=400,
                color="k",
                label="before FT",
                zorder=5,
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "generalization.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(
        plot(
            sys.argv[1]
            if len(sys.argv) > 1
            else os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results"
            )
        )
    )

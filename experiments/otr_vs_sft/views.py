"""The two scale-2 views of issue 16, deliverable 4, as PNGs next to their JSON.

- Forgetting curves (``real_model_<task>_forgetting.json``): in-domain, OOD and retention
  against training steps (0 = the base model, then every reading point), mean and sample
  std over seeds per method.
- Trade-off (``real_model_<task>.json`` with ``--tradeoff``): every swept (method, LR),
  trained on the sweep's seed and fully evaluated, placed by in-domain accuracy (x) and
  retention (y), so "at equal in-domain accuracy, which objective keeps more?" is read
  from the plot; the base model is a star.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from experiments.otr_vs_sft.paths import RESULTS

COLORS = {
    "sft": "tab:blue",
    "dft": "tab:orange",
    "otr_sampled": "tab:green",
    "otr_exact": "tab:red",
    "otr_mix0.1": "tab:purple",
    "otr_mix0.3": "tab:brown",
}
CURVE_METRICS = ("in_domain", "ood", "retention")


def forgetting_curves(payload: dict) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """{method: {metric: [(step, mean, std over seeds)]}}, step 0 the base model."""
    base = payload["base_model"]
    out: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for method in payload["methods"]:
        out[method] = {}
        for metric in CURVE_METRICS:
            points = [(0, float(base[metric]), 0.0)]
            steps = sorted(
                {
                    r["steps"]
                    for r in payload["runs"]
                    if r["setting"].startswith("forgetting_") and r["method"] == method
                }
            )
            for step in steps:
                vals = [
                    r[metric]
                    for r in payload["runs"]
                    if r["setting"] == f"forgetting_{step}" and r["method"] == method
                ]
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                points.append((step, float(np.mean(vals)), std))
            out[method][metric] = points
    return out


def tradeoff_points(payload: dict) -> dict[str, list[tuple[float, float, float]]]:
    """{method: [(LR, in-domain, retention)]} of the "tradeoff" records, by LR."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in payload["runs"]:
        if r.get("setting") == "tradeoff":
            out.setdefault(r["method"], []).append((r["lr"], r["in_domain"], r["retention"]))
    return {m: sorted(p) for m, p in out.items()}


TRADEOFF_COLUMNS = ("in_domain", "ood", "retention", "retention_family_mean")


def tradeoff_table(payload: dict) -> str | None:
    """The trade-off records as a markdown table, a row per (method, LR), by method then
    LR: the plot's numbers, with OOD and the family-weighted retention next to them."""
    rows = sorted(
        (r for r in payload["runs"] if r.get("setting") == "tradeoff"),
        key=lambda r: (r["method"], r["lr"]),
    )
    if not rows:
        return None
    cols = [c for c in TRADEOFF_COLUMNS if all(c in r for r in rows)]
    out = ["| method | LR | seed | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        cells = " | ".join(f"{r[c]:.3f}" for c in cols)
        out.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {cells} |")
    return "\n".join(out)


def _figure(width: float, panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, panels, figsize=(width, 4.2))


def _save(plt, fig, png: str) -> str:
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_forgetting(path: str) -> str:
    """Write ``<json stem>.png`` with the forgetting curves; return its path."""
    with open(path) as f:
        payload = json.load(f)
    plt, fig, axes = _figure(14, len(CURVE_METRICS))
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for method, curves in forgetting_curves(payload).items():
            steps, means, stds = zip(*curves[metric], strict=True)
            color = COLORS.get(method)
            ax.errorbar(steps, means, yerr=stds, marker="o", capsize=3, color=color, label=method)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("training steps (0: the base model)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Forgetting under pressure: {payload['scale']}", fontsize=9)
    return _save(plt, fig, os.path.splitext(path)[0] + ".png")


def plot_tradeoff(path: str) -> str | None:
    """Write ``<json stem>_tradeoff.png``; None when the JSON has no trade-off records."""
    with open(path) as f:
        payload = json.load(f)
    points = tradeoff_points(payload)
    if not points:
        return None
    plt, fig, ax = _figure(6.5, 1)
    base = payload["base_model"]
    ax.plot(base["in_domain"], base["retention"], "k*", ms=12, label="base model")
    for method, pts in points.items():
        _, xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color=COLORS.get(method), label=method)
        for lr, x, y in pts:
            ax.annotate(f"{lr:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("in-domain accuracy (test)")
    ax.set_ylabel("retention (probe, strict)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Every swept LR, seed 0: {payload['task']['name']}", fontsize=10)
    return _save(plt, fig, os.path.splitext(path)[0] + "_tradeoff.png")


def scale2_results(out: str) -> list[str]:
    """The stems of the scale-2 result payloads in ``out`` (``real_model*.json``; not the
    progress reports of ``scale2_progress.py``, which hold no runs)."""
    names = sorted(n for n in os.listdir(out) if n.startswith("real_model") and n.endswith(".json"))
    return [n[: -len(".json")] for n in names if not n.endswith("_progress.json")]


def plot_all(out: str) -> list[str]:
    """Every view whose JSON is in ``out``."""
    written = []
    for stem in scale2_results(out):
        path = os.path.join(out, f"{stem}.json")
        if stem.endswith("_forgetting"):
            written.append(plot_forgetting(path))
        elif stem.startswith("real_model_"):
            png = plot_tradeoff(path)
            if png:
                written.append(png)
    return written


if __name__ == "__main__":
    print(plot_all(sys.argv[1] if len(sys.argv) > 1 else RESULTS))

"""results/continuum.png: each method minus SFT against the base model's prior.

x: the base model's in-domain accuracy before fine-tuning (one point per prior level of
scale 1; scale 2, the real model, as hollow markers, one per task). y: method minus SFT on the same
seed (paired), mean over seeds with the sample standard deviation as error bar, for
in-domain, OOD and retention, each at the method's own best LR and equal steps.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from experiments.otr_vs_sft.common import METRICS, paired_differences
from experiments.otr_vs_sft.paths import RESULTS

COLORS = {
    "dft": "tab:orange",
    "otr_sampled": "tab:green",
    "otr_exact": "tab:red",
    "otr_mix0.1": "tab:purple",
    "otr_mix0.3": "tab:brown",
}


def base_accuracy(payload: dict) -> dict:
    """{level: base in-domain accuracy}; the real model is level "real"."""
    if "levels" in payload:
        return {lv["level"]: lv["base"]["in_domain"] for lv in payload["levels"]}
    return {"real": payload["base_model"]["in_domain"]}


def plot(out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = []
    # scale 2: issue 11's add2d results until the add2d re-read replaces them, and add1d
    add2d = (
        "real_model_add2d"
        if os.path.exists(os.path.join(out, "real_model_add2d.json"))
        else "real_model"
    )
    for name, hollow in (("continuum", False), (add2d, True), ("real_model_add1d", True)):
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
            sources.append((payload, hollow))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.axhline(0, color="tab:blue", lw=1, label="sft (reference)")
        for method, color in COLORS.items():
            for payload, hollow in sources:
                diffs = paired_differences(payload["runs"])
                xs, ys, es = [], [], []
                for level, x in sorted(base_accuracy(payload).items(), key=lambda kv: kv[1]):
                    d = diffs.get((level, method, metric))
                    if not d:
                        continue
                    xs.append(x)
                    ys.append(float(np.mean(d)))
                    es.append(float(np.std(d, ddof=1)) if len(d) > 1 else 0.0)
                if not xs:
                    continue
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    color=color,
                    marker="o",
                    mfc="white" if hollow else color,
                    ls=":" if hollow else "-",
                    capsize=3,
                    label=None if hollow else method,
                )
        ax.set_title(f"{metric}: method - SFT (paired by seed)", fontsize=10)
        ax.set_xlabel("base model in-domain accuracy before fine-tuning")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("difference in accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "When does OTR help? Filled: tiny model, prior levels (scale 1); "
        "hollow: SmolLM2-135M + LoRA (scale 2). Mean ± std over seeds, own best LR.",
        fontsize=10,
    )
    fig.tight_layout()
    path = os.path.join(out, "continuum.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(plot(sys.argv[1] if len(sys.argv) > 1 else RESULTS))

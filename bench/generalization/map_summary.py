"""The whole map in a few tables, for README "When does OTR help?" (issue 16, step 8).

Every measured level and task (the levels of ``otr_map.py``, both scales), sorted by the
base model's in-domain accuracy, with each method minus SFT at its selected LR and its
95% paired-bootstrap interval over seeds and items (``stats.py``): in-domain, OOD,
retention pooled over the probe's items and, where the probe has families (scale 2),
with every family weighted alike. Then the forgetting runs
(``real_model_<task>_forgetting.json``) read at every step. Nothing is trained; every
figure is read from ``bench/results``. A **bold** cell is a win or a loss (interval
excluding 0).

    python bench/generalization/map_summary.py   # -> bench/results/otr_map_summary.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import otr_map  # noqa: E402
import stats  # noqa: E402

METHODS = {
    "dft": "DFT",
    "otr_sampled": "OTR sampled",
    "otr_exact": "OTR exact",
    "otr_mix0.3": "OTR + 0.3 CE",
}
METRICS = {
    "in_domain": "in-domain",
    "ood": "OOD",
    "retention": "retention, pooled over the probe's items",
    "retention_family_mean": "retention, mean over families (scale 2's probe)",
}
OUT_NAME = "otr_map_summary.md"


def cell(runs: list[dict], setting: str, method: str, metric: str, strata) -> str:
    """``+0.012 [-0.020, +0.040]``, bold when the interval excludes 0; ``-`` when the
    method did not run there or the runs carry no per-item result for the metric."""
    if metric in stats.STRATIFIED and strata is None:
        return "-"
    groups = strata if metric in stats.STRATIFIED else None
    r = stats.versus_sft(runs, setting, method, metric, strata=groups)
    if r is None:
        return "-"
    text = f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
    return f"**{text}**" if r["verdict"] != "no difference" else text


def sft_mean(runs: list[dict], setting: str, metric: str) -> str:
    values = [r.get(metric) for r in runs if r.get("setting") == setting and r["method"] == "sft"]
    values = [v for v in values if v is not None]  # a record without the metric: not counted
    return f"{statistics.fmean(values):.3f}" if values else "-"


def _row_label(name: str, base: dict, measures: dict) -> str:
    """``scale 1 level 2: 0.340 (0.927)`` or ``scale 2 add2d: ...`` from the map's name."""
    level = name.split(" (")[0].replace("real_model_", "")
    return f"{level}: {base.get('in_domain', float('nan')):.3f} ({measures['p_target']:.3f})"


GLANCE = {"otr_sampled": "pure OTR", "otr_mix0.3": "OTR + 0.3 CE"}  # what a user would set


def short_lr(lr: float) -> str:
    """3e-4 or 2.5e-4, not 0.0003 or 3e-04."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def selected_lr(runs: list[dict], method: str) -> str:
    lrs = sorted({r["lr"] for r in runs if r.get("setting") == "best_lr" and r["method"] == method})
    return "/".join(short_lr(lr) for lr in lrs) or "-"


def glance(rows: list[tuple]) -> list[str]:
    """One table for the README: the two OTR settings a user would pick (pure OTR, what
    ``otr: true`` trains, and the mix), in-domain and pooled retention, with the LRs."""
    heads = [f"{name} {what}" for what in ("in-domain", "retention") for name in GLANCE.values()]
    lines = [
        "### At a glance: the two OTR settings a user would set",
        "",
        "| level: base in-domain (mean p(target)) | LR: SFT, pure OTR, OTR + 0.3 CE | SFT "
        "in-domain | "
        + " | ".join(heads[:2])
        + " | SFT retention | "
        + " | ".join(heads[2:])
        + " |",
        "|" + "---|" * 8,
    ]
    for _, label, runs, strata in rows:
        lrs = ", ".join(selected_lr(runs, m) for m in ("sft", *GLANCE))
        cells = [f"{sft_mean(runs, 'best_lr', 'in_domain')}"]
        cells += [cell(runs, "best_lr", m, "in_domain", strata) for m in GLANCE]
        cells += [f"{sft_mean(runs, 'best_lr', 'retention')}"]
        cells += [cell(runs, "best_lr", m, "retention", strata) for m in GLANCE]
        lines.append(f"| {label} | {lrs} | " + " | ".join(cells) + " |")
    return lines + [""]


def levels_tables(results: str) -> list[str]:
    rows = []
    for name, _, base, measures, runs, payload in otr_map.level_sources(results):
        if measures is None:
            continue  # not on the map: no token measures (otr_map.json lists it as skipped)
        strata = payload.get("retention_item_families")
        rows.append((base.get("in_domain", 0.0), _row_label(name, base, measures), runs, strata))
    rows.sort(key=lambda row: row[0])
    out = glance(rows)
    for metric, title in METRICS.items():
        head = "| level: base in-domain (mean p(target)) | SFT | " + " | ".join(METHODS.values())
        lines = [f"### {title}", "", head + " |", "|" + "---|" * (2 + len(METHODS))]
        for _, label, runs, strata in rows:
            if metric in stats.STRATIFIED and strata is None:
                continue
            cells = [cell(runs, "best_lr", m, metric, strata) for m in METHODS]
            lines.append(
                f"| {label} | {sft_mean(runs, 'best_lr', metric)} | " + " | ".join(cells) + " |"
            )
        out += lines + [""]
    return out


def forgetting_tables(path: str) -> list[str]:
    payload = json.load(open(path))
    runs, strata = payload["runs"], payload.get("retention_item_families")
    steps = sorted(
        {
            int(r["setting"].split("_")[1])
            for r in runs
            if r.get("setting", "").startswith("forgetting_")
        }
    )
    methods = [m for m in payload["methods"] if m != "sft"]
    lrs = payload["best_lr"]
    seeds = sorted({r["seed"] for r in runs})
    stem = os.path.splitext(os.path.basename(path))[0]
    base = payload["base_model"]
    at_zero = ", ".join(
        f"{k} {base[k]:.3f}" for k in ("in_domain", "ood", "retention") if k in base
    )
    out = [
        f"## Forgetting under pressure: `{stem}`",
        "",
        f"{payload['scale']}; trained {max(steps)} steps, read at {steps}, seeds {seeds}; "
        "LR per method: " + ", ".join(f"{m} {lrs[m]:g}" for m in payload["methods"]) + ".",
        f"The base model (step 0): {at_zero}.",
        "",
    ]
    for metric, title in METRICS.items():
        if metric in stats.STRATIFIED and strata is None:
            continue
        head = "| step | SFT | " + " | ".join(METHODS.get(m, m) for m in methods) + " |"
        lines = [f"### {title}", "", head, "|" + "---|" * (2 + len(methods))]
        for step in steps:
            setting = f"forgetting_{step}"
            cells = [cell(runs, setting, m, metric, strata) for m in methods]
            lines.append(
                f"| {step} | {sft_mean(runs, setting, metric)} | " + " | ".join(cells) + " |"
            )
        out += lines + [""]
    return out


def summary(results: str = otr_map.RESULTS) -> str:
    text = [
        "# The OTR-vs-SFT map, every level and task",
        "",
        "Generated by `bench/generalization/map_summary.py` from `bench/results`; do not "
        "edit. Each cell is method - SFT at its selected LR, paired by seed, with its 95% "
        "paired-bootstrap interval over seeds and items; **bold**: the interval excludes "
        "0 (a win or a loss). SFT's column is its mean over seeds. `-`: not run there.",
        "",
        "## Every level, sorted by the base model's in-domain accuracy",
        "",
    ]
    text += levels_tables(results)
    for path in sorted(glob.glob(os.path.join(results, "real_model_*_forgetting.json"))):
        text += forgetting_tables(path)
    return "\n".join(text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=otr_map.RESULTS)
    args = ap.parse_args(argv)
    target = os.path.join(args.results, OUT_NAME)
    with open(target, "w") as f:
        f.write(summary(args.results))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

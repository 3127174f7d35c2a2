"""The whole map in a few tables, for README "When does OTR help?" (issue 16, step 8).

Every measured level and task (the levels of ``otr_map.py``, both scales), sorted by the
base model's in-domain accuracy, with each method minus SFT at its selected LR and its
95% paired-bootstrap interval over seeds and items (``stats.py``): in-domain, OOD,
retention pooled over the probe's items and, where the probe has families (scale 2),
with every family weighted alike. Then the forgetting runs
(``real_model_<task>_forgetting.json``) read at every step. Nothing is trained; every
figure is read from ``results/``. A **bold** cell is a win or a loss (interval excluding 0).

The first table, "at a glance", is also the README's (section "When does OTR help?"):
this module writes that copy too, so it is never edited by hand, and ``--check`` (run by
a test in ``make test``) fails when either file differs from what the results give.

    python -m experiments.otr_vs_sft.map_summary          # -> results/otr_map_summary.md, README.md
    python -m experiments.otr_vs_sft.map_summary --check  # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

from experiments.otr_vs_sft import otr_map, stats
from experiments.otr_vs_sft.paths import PACKAGE, RESULTS_REL, ROOT

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
README = os.path.join(ROOT, "README.md")


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


def glance_table(rows: list[tuple]) -> list[str]:
    """The README's table: the two OTR settings a user would pick (pure OTR, what
    ``otr: true`` trains, and the mix), in-domain and pooled retention, with the LRs."""
    heads = [f"{name} {what}" for what in ("in-domain", "retention") for name in GLANCE.values()]
    lines = [
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
    return lines


def level_rows(results: str) -> list[tuple]:
    """Every level on the map as ``(base in-domain, label, runs, strata)``, sorted by the
    base model's in-domain accuracy."""
    rows = []
    for name, _, base, measures, runs, payload in otr_map.level_sources(results):
        if measures is None:
            continue  # not on the map: no token measures (otr_map.json lists it as skipped)
        strata = payload.get("retention_item_families")
        rows.append((base.get("in_domain", 0.0), _row_label(name, base, measures), runs, strata))
    return sorted(rows, key=lambda row: row[0])


def levels_tables(rows: list[tuple]) -> list[str]:
    out = ["### At a glance: the two OTR settings a user would set", ""]
    out += glance_table(rows) + [""]
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


def summary(results: str = otr_map.RESULTS, rows: list[tuple] | None = None) -> str:
    """The whole file; ``rows``: ``level_rows(results)`` when already computed."""
    text = [
        "# The OTR-vs-SFT map, every level and task",
        "",
        f"Generated by `python -m {PACKAGE}.map_summary` from `{RESULTS_REL}`; "
        "do not edit. Each cell is method - SFT at its selected LR, paired by seed, with its 95% "
        "paired-bootstrap interval over seeds and items; **bold**: the interval excludes "
        "0 (a win or a loss). SFT's column is its mean over seeds. `-`: not run there.",
        "",
        "## Every level, sorted by the base model's in-domain accuracy",
        "",
    ]
    text += levels_tables(level_rows(results) if rows is None else rows)
    for path in sorted(glob.glob(os.path.join(results, "real_model_*_forgetting.json"))):
        text += forgetting_tables(path)
    return "\n".join(text).rstrip() + "\n"


def glance_copies(text: str) -> list[tuple[int, int]]:
    """The line spans ``[start, end)`` of every copy of the at-a-glance table in a
    markdown text: its header line and the table lines that follow it."""
    lines = text.splitlines()
    header = glance_table([])[0]
    spans = []
    for start, line in enumerate(lines):
        if line == header:
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            spans.append((start, end))
    return spans


def with_glance(text: str, table: list[str]) -> str:
    """``text`` (the README) with its one copy of the at-a-glance table set to ``table``."""
    spans = glance_copies(text)
    if len(spans) != 1:
        raise ValueError(f"expected one at-a-glance table, found {len(spans)}")
    (start, end), lines = spans[0], text.splitlines()
    return "\n".join(lines[:start] + table + lines[end:]) + "\n"


def outputs(results: str, readme: str) -> dict[str, str]:
    """{path: the text it should hold}: the summary file and the README with its table."""
    rows = level_rows(results)
    with open(readme) as f:
        readme_text = with_glance(f.read(), glance_table(rows))
    return {os.path.join(results, OUT_NAME): summary(results, rows), readme: readme_text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=otr_map.RESULTS)
    ap.add_argument("--readme", default=README, help="the file holding the table's copy")
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    wanted = outputs(args.results, args.readme)
    if args.check:
        stale = [p for p, text in wanted.items() if not _holds(p, text)]
        for path in stale:
            print(f"{path} is stale: run python -m {PACKAGE}.map_summary")
        return 1 if stale else 0
    for path, text in wanted.items():
        with open(path, "w") as f:
            f.write(text)
    print(f"wrote {', '.join(wanted)}")
    return 0


def _holds(path: str, text: str) -> bool:
    return os.path.exists(path) and open(path).read() == text


if __name__ == "__main__":
    sys.exit(main())

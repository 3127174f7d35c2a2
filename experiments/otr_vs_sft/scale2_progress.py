"""A scale-2 task while its runs are still coming: what the run cache holds so far.

``run.py --scale 2 --task T`` writes ``real_model_T.json`` only once every method has its
best-LR runs on every seed, which takes more than one session on this CPU. This reads the
task's run cache (``results/runs/real_model_T`` beside this file) and reports, without
training anything: the base model, the sweep (validation accuracy and cross-entropy per
method and LR), each method's best-LR runs on the seeds done so far (in-domain, OOD, retention
strict and lenient, the family mean), and each method minus SFT with its paired-bootstrap
95% interval on the seeds both have (``stats.py``). A method's LR is the one its full
evaluations were run at (the runner chose it from the complete sweep).

``--forgetting`` reads the task's forgetting runs instead (``run.py --scale 2
--forgetting``, cached in ``results/runs/real_model_T_forgetting``: trained to 3x
the usual steps, read at every multiple of them): per method and read step, the seeds
done and their figures, and method minus SFT. Each report keeps to runs of its own
length, whichever folder holds them.

    python -m experiments.otr_vs_sft.scale2_progress --task add1d
    # -> experiments/otr_vs_sft/results/real_model_add1d_progress.json and .md
    python -m experiments.otr_vs_sft.scale2_progress --task add2d --forgetting
    # -> experiments/otr_vs_sft/results/real_model_add2d_forgetting_progress.json and .md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from experiments.otr_vs_sft import stats
from experiments.otr_vs_sft.paths import RESULTS

METRICS = ("in_domain", "ood", "retention", "retention_lenient", "retention_family_mean")
COMPARED = ("in_domain", "ood", "retention", "retention_lenient")
SEEDS = 3  # the protocol's seeds (scale2.FULL)
STEPS = 100  # the usual training steps (scale2.FULL)
FORGETTING_STEPS = 3 * STEPS  # scale2.FORGETTING_FACTOR x the usual steps


def cached(folder: str) -> list[dict]:
    """Every record of the folder as {kind, method, lr, seed, **result}; kind is "base",
    "measures" (its token measures), "sweep" (validation only), "full" (a best-LR or
    trade-off run) or "at_step" (a snapshot of a run read fully); steps: the run's
    training steps (None where the config does not say)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            rec = json.load(f)
        config, result = rec["config"], rec["result"]
        if config.get("base"):
            kind = "base"
        elif "token_measures" in config:  # the base model on the training targets
            kind = "measures"
        elif "at_step" in config:
            kind = "at_step"
        else:
            kind = "full" if config.get("eval") == "full" else "sweep"
        method = config.get("method", {}).get("name")
        steps = (config.get("train") or {}).get("steps")
        out.append({**result, "kind": kind, "method": method, "lr": config.get("lr"),
                    "seed": config.get("seed"), "steps": steps,
                    "at_step": config.get("at_step")})  # fmt: skip
    return out


def report(records: list[dict]) -> dict:
    """The progress summary of one task's records."""
    base = next((r for r in records if r["kind"] == "base"), None)
    sweep = sorted(
        ({"method": r["method"], "lr": r["lr"], "val_in_domain": r["val_in_domain"],
          "val_ce": r["val_ce"]} for r in records if r["kind"] == "sweep"),
        key=lambda r: (r["method"], r["lr"]),
    )  # fmt: skip
    full = [r for r in records if r["kind"] == "full" and r["steps"] in (None, STEPS)]
    methods = list(dict.fromkeys(r["method"] for r in sweep + full))
    best = {}
    for m in methods:
        lrs = {r["lr"] for r in full if r["method"] == m}
        if len(lrs) == 1:  # (several: trade-off records too; the later seeds name the best)
            best[m] = lrs.pop()
        elif lrs:
            later = {r["lr"] for r in full if r["method"] == m and r["seed"] != 0}
            best[m] = later.pop() if len(later) == 1 else None
    runs = [
        {**r, "setting": "best_lr"}
        for r in full
        if best.get(r["method"]) is not None and r["lr"] == best[r["method"]]
    ]
    per_method = {}
    for m in methods:
        mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        if mine:
            families = sorted(
                k[len("retention_") :]
                for k in mine[0]
                if k.startswith("retention_") and not k.endswith("_lenient")
                and k not in ("retention_family_mean", "retention_old")
            )  # fmt: skip
            per_method[m] = {
                "lr": best[m],
                "seeds": [r["seed"] for r in mine],
                **{k: [round(r[k], 4) for r in mine] for k in METRICS if k in mine[0]},
                "families": {
                    f: round(sum(r[f"retention_{f}"] for r in mine) / len(mine), 4)
                    for f in families
                },  # fmt: skip
            }
    versus = {}
    for m in per_method:
        if m != "sft":
            versus[m] = {k: stats.versus_sft(runs, "best_lr", m, k) for k in COMPARED}
    drop = ("items", "kind", "method", "lr", "seed", "steps", "at_step")
    base_summary = {k: v for k, v in (base or {}).items() if k not in drop}
    measures = next((r for r in records if r["kind"] == "measures"), None)
    if measures:
        base_summary["token_measures"] = {k: v for k, v in measures.items() if k not in drop}
    return {"base": base_summary, "sweep": sweep, "best_lr_runs": per_method, "versus_sft": versus}


def forgetting_report(records: list[dict]) -> dict:
    """The forgetting runs of one task's records: per method, its LR and, per read step
    (every multiple of ``STEPS`` up to ``FORGETTING_STEPS``), the seeds read and their
    figures; and method minus SFT per read step on the seeds both have."""
    steps = list(range(STEPS, FORGETTING_STEPS + 1, STEPS))
    runs = []
    for r in records:
        if r["steps"] != FORGETTING_STEPS:
            continue
        read = FORGETTING_STEPS if r["kind"] == "full" else r["at_step"]
        if r["kind"] in ("full", "at_step") and read in steps:
            runs.append({**r, "read_step": read, "setting": f"forgetting_{read}"})
    methods = list(dict.fromkeys(r["method"] for r in sorted(runs, key=lambda r: r["seed"])))
    per_method = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        per_method[m] = {"lr": sorted({r["lr"] for r in mine}), "reads": {}}
        for step in steps:
            at = sorted((r for r in mine if r["read_step"] == step), key=lambda r: r["seed"])
            if at:
                per_method[m]["reads"][step] = {
                    "seeds": [r["seed"] for r in at],
                    **{k: [round(r[k], 4) for r in at] for k in METRICS if k in at[0]},
                }
    versus = {
        m: {step: {k: stats.versus_sft(runs, f"forgetting_{step}", m, k) for k in COMPARED}
            for step in steps}
        for m in per_method if m != "sft"
    }  # fmt: skip
    return {"steps": steps, "runs": per_method, "versus_sft": versus}


def _interval(c: dict | None) -> str:
    if c is None:
        return "-"
    seeds = c["verdict"] if c["n_seeds"] >= SEEDS else f"({c['n_seeds']} of {SEEDS} seeds)"
    return f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] {seeds}"


def forgetting_markdown(task: str, rep: dict) -> str:
    lines = [f"# Scale 2, task {task}: forgetting runs in the cache so far", "",
             f"Each run trained {FORGETTING_STEPS} steps, read fully at {rep['steps']}. "
             "The runner caches a run's last read when its training is done, then reads "
             "its earlier snapshots.", "",
             "## Runs done (one value per seed)", "",
             "| method | LR | step | seeds | " + " | ".join(METRICS) + " |",
             "|---" * (4 + len(METRICS)) + "|"]  # fmt: skip
    for m, r in rep["runs"].items():
        lrs = ", ".join(f"{lr:g}" for lr in r["lr"])
        for step, at in r["reads"].items():
            cells = [", ".join(f"{v:.3f}" for v in at.get(k, [])) for k in METRICS]
            lines.append(f"| {m} | {lrs} | {step} | {at['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "## Method - SFT per read step, 95% paired bootstrap on the seeds both have",
              "", f"A verdict only with all {SEEDS} seeds.", "",
              "| method | step | " + " | ".join(COMPARED) + " |",
              "|---" * (2 + len(COMPARED)) + "|"]  # fmt: skip
    for m, by_step in rep["versus_sft"].items():
        for step, cmp in by_step.items():
            cells = [_interval(cmp[k]) for k in COMPARED]
            lines.append(f"| {m} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(task: str, rep: dict) -> str:
    base = rep["base"]
    lines = [f"# Scale 2, task {task}: runs in the cache so far", ""]
    if base:
        keys = ("in_domain", "ood", "retention", "val_in_domain", "token_measures")
        lines += ["base model: " + ", ".join(f"{k} {base[k]}" for k in keys if k in base), ""]
    lines += ["## Sweep (seed 0, validation)", "", "| method | LR | val accuracy | val CE |",
              "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {r['lr']:g} | {r['val_in_domain']:.3f} | {r['val_ce']:.5f} |"
              for r in rep["sweep"]]  # fmt: skip
    lines += ["", "## Best-LR runs done (one value per seed)", ""]
    lines += [
        "| method | LR | seeds | " + " | ".join(METRICS) + " |",
        "|---" * (3 + len(METRICS)) + "|",
    ]
    for m, r in rep["best_lr_runs"].items():
        cells = [", ".join(f"{v:.3f}" for v in r.get(k, [])) for k in METRICS]
        lines.append(f"| {m} | {r['lr']:g} | {r['seeds']} | " + " | ".join(cells) + " |")
    fams = sorted({f for r in rep["best_lr_runs"].values() for f in r["families"]})
    lines += ["", "## Retention per family (strict, mean over the seeds done)", ""]
    lines += ["| method | " + " | ".join(fams) + " |", "|---" * (1 + len(fams)) + "|"]
    for m, r in rep["best_lr_runs"].items():
        cells = [f"{r['families'][f]:.3f}" if f in r["families"] else "-" for f in fams]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Method - SFT, 95% paired bootstrap on the seeds both have", ""]
    lines += [f"A verdict only with all {SEEDS} seeds: on fewer, the interval resamples the "
              "items and too few seeds to show the seed-to-seed spread.", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(COMPARED) + " |", "|---" * (1 + len(COMPARED)) + "|"]
    for m, cmp in rep["versus_sft"].items():
        cells = [_interval(cmp[k]) for k in COMPARED]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="add1d")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--forgetting", action="store_true", help="the forgetting runs instead")
    args = ap.parse_args(argv)
    name = f"real_model_{args.task}" + ("_forgetting" if args.forgetting else "")
    folder = os.path.join(args.results, "runs", name)
    if not os.path.isdir(folder):
        raise SystemExit(f"no run cache for task {args.task} at {folder}")
    stem = os.path.join(args.results, f"{name}_progress")
    if args.forgetting:
        rep = forgetting_report(cached(folder))
        text = forgetting_markdown(args.task, rep)
    else:
        rep = report(cached(folder))
        text = markdown(args.task, rep)
    with open(stem + ".json", "w") as f:
        json.dump(rep, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

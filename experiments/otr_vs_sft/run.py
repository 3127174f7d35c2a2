"""One command for the whole generalization benchmark (see README.md beside this file).

From the repository root:

python -m experiments.otr_vs_sft.run            # scale 1 + scale 2, full (~4.5 h on 1 CPU
                                                # thread: scale 1 80 min, scale 2 ~190 min)
python -m experiments.otr_vs_sft.run --quick    # CI smoke test: scale 1 pipeline, < 60 s
python -m experiments.otr_vs_sft.run --scale 1  # one scale only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

# Before anything imports transformers: every model and data set is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experiments.otr_vs_sft import common, stats  # noqa: E402
from experiments.otr_vs_sft.paths import RESULTS, RESULTS_REL  # noqa: E402

BOOTSTRAP_METRICS = (
    "in_domain",
    "ood",
    "retention",
    "retention_lenient",
    "retention_old",
    "retention_old_lenient",
)


# Outside the work tree, so a later session on the same machine finds the base models and
# converted checkpoints again (the run cache itself is committed).
WORKDIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    "axolotl-otr",
    "generalization",
)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def check(payload: dict) -> None:
    """Every run has finite accuracies in [0, 1] (what --quick asserts)."""
    assert payload["runs"], "no runs"
    for r in payload["runs"]:
        if r.get("setting") == "sweep" and "in_domain" not in r:
            continue  # scale 2 sweeps are scored on the validation split only
        for key in ("in_domain", "ood", "retention"):
            v = r[key]
            assert isinstance(v, float | int) and math.isfinite(v) and 0.0 <= v <= 1.0, (key, r)
    families = payload.get("retention_item_families")
    for r in payload["runs"] if families else ():  # the groups line up with the item records
        bits = r.get("items", {}).get("retention")
        if bits is None or "retention_family_mean" not in r:
            continue
        assert len(bits) == len(families), ("retention items", len(bits), len(families))
        mean = stats.group_mean([b == "1" for b in bits], families)
        stored = r["retention_family_mean"]
        assert abs(mean - stored) < 1e-3, (mean, stored)  # the stored value is rounded


def _tables(out: str, name: str, payload: dict) -> None:
    """Markdown tables of the summary (mean ± sample std over seeds), next to the JSON."""
    text = [f"# {payload['scale']}", "", f"runtime {payload['runtime_s']} s", ""]
    for level in payload.get("levels", [payload]):
        title = f"level {level['level']}" if "level" in level else "all runs"
        base = level.get("base", payload.get("base_model", {}))
        text += [
            f"{title}: best LR per method (validation, seed 0): {level.get('best_lr')}",
            "",
            "base model before fine-tuning: " + ", ".join(f"{k}={v}" for k, v in base.items()),
            "",
        ]
    settings = [s for s in dict.fromkeys(r.get("setting") for r in payload["runs"]) if s]
    compared = [s for s in settings if s not in ("sweep", "tradeoff")]  # one LR per method
    for setting in compared:
        for metric in common.METRICS:
            text += [
                f"## {metric}, method - SFT (paired by seed), setting {setting}",
                "",
                common.difference_table(payload, metric, setting),
                "",
            ]
    metrics = [
        m for m in BOOTSTRAP_METRICS if any(m in r.get("items", {}) for r in payload["runs"])
    ]
    # the mean over the probe's families, stratified by family (stats.STRATIFIED)
    strata = {m: payload.get(key) for m, (_, key) in stats.STRATIFIED.items()}
    metrics += [m for m, groups in strata.items() if groups and m not in metrics]
    for setting in compared if metrics else ():
        text += [
            f"## method - SFT, 95% paired bootstrap over seeds and items, setting {setting}",
            "",
            "A win or a loss only where the interval excludes 0 (experiments/otr_vs_sft/stats.py).",
            "",
            stats.bootstrap_table(
                payload["runs"], metrics, setting, strata=strata.get("retention_family_mean")
            ),
            "",
        ]
    from experiments.otr_vs_sft import views

    tradeoff = views.tradeoff_table(payload)
    if tradeoff is not None:
        text += ["## Trade-off: every swept (method, LR), seed 0, full test sets", "", tradeoff, ""]
    text += ["## All runs (mean ± sample std over seeds)", "", common.table(payload["summary"]), ""]
    with open(os.path.join(out, f"{name}_tables.md"), "w") as f:
        f.write("\n".join(text))


def _save(out: str, name: str, payload: dict) -> str:
    """Add the summary to ``payload``, check it, write ``{name}.json`` and its tables."""
    payload["summary"] = common.summarize(payload["runs"])
    check(payload)
    path = os.path.join(out, f"{name}.json")
    common.write_json(path, payload)
    _tables(out, name, payload)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; asserts only")
    ap.add_argument(
        "--scale", choices=["1", "2", "all"], default=None, help="default: all (full) / 1 (quick)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help=f"results folder (default {RESULTS_REL}; --quick: a temporary folder)",
    )
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="recompute summaries, tables and the plot from the JSON in --out",
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="scale 2 only: a comma-separated subset of its methods, run as one shard of a "
        "parallel run (fills the run cache, writes no results; a last call without "
        "--methods assembles them)",
    )
    ap.add_argument(
        "--task", default="add2d", help="scale 2 only: the task (experiments/otr_vs_sft/tasks.py)"
    )
    ap.add_argument(
        "--preset-lr",
        action="store_true",
        help="scale 2 only: no LR sweep, the task's earlier selected LRs (scale2.EARLIER_LR)",
    )
    ap.add_argument(
        "--forgetting",
        action="store_true",
        help="scale 2 only: the forgetting runs (scale2.FORGETTING_METHODS at the task's "
        "earlier selected LRs, 3x the steps, read at 100, 200 and 300)",
    )
    ap.add_argument(
        "--tradeoff",
        action="store_true",
        help="scale 2 only: also fully evaluate every swept (method, LR) on seed 0",
    )
    args = ap.parse_args(argv)
    scale = args.scale or ("1" if args.quick else "all")
    only = args.methods.split(",") if args.methods else None
    scale2_only = (
        only is not None
        or args.task != "add2d"
        or args.preset_lr
        or args.forgetting
        or args.tradeoff
    )
    if scale2_only:  # checked before any work: a typo must not cost a scale-1 run
        from experiments.otr_vs_sft import scale2

        if scale != "2":
            ap.error(
                "--methods, --task, --preset-lr, --forgetting and --tradeoff are for scale 2 "
                "only: add --scale 2"
            )
        if args.task not in scale2.TASK_METHODS:
            ap.error(f"--task: unknown {args.task!r}; choose from {sorted(scale2.TASK_METHODS)}")
        choices = scale2.TASK_METHODS[args.task]
        unknown = set(only or ()) - set(choices)
        if unknown:
            ap.error(f"--methods: unknown {sorted(unknown)}; choose from {choices}")
        for flag, given in (("--preset-lr", args.preset_lr), ("--forgetting", args.forgetting)):
            if given and args.task not in scale2.EARLIER_LR:
                ap.error(f"{flag}: task {args.task} has no earlier selected LRs")
        if args.tradeoff and (args.forgetting or args.preset_lr):
            ap.error("--tradeoff reads the LR sweep, which --forgetting and --preset-lr skip")
    common.set_threads()
    out = args.out or (tempfile.mkdtemp(prefix="otr_gen_") if args.quick else RESULTS)
    workdir = args.workdir + ("_quick" if args.quick else "")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    written = []
    if args.report_only:
        import json

        from experiments.otr_vs_sft import plot, views

        for name in ("continuum", *views.scale2_results(out)):
            path = os.path.join(out, f"{name}.json")
            if os.path.exists(path):
                payload = json.load(open(path))
                _save(out, name, payload)
                log(f"{name}:\n" + common.table(payload["summary"]))
        log(f"wrote {plot.plot(out)} {views.plot_all(out)}")
        return 0
    cache_dir = os.path.join(out, "runs")
    if scale in ("1", "all"):
        from experiments.otr_vs_sft import continuum

        payload = continuum.run(args.quick, workdir, log, os.path.join(cache_dir, "continuum"))
        written.append(_save(out, "continuum", payload))
        log("scale 1 summary (mean ± std over seeds):\n" + common.table(payload["summary"]))
    if scale in ("2", "all"):
        from experiments.otr_vs_sft import scale2

        mode = "forgetting" if args.forgetting else "main"
        name = scale2.results_name(args.task, mode)
        preset = scale2.EARLIER_LR[args.task] if args.preset_lr or args.forgetting else None
        payload = scale2.run(
            args.quick,
            workdir,
            log,
            os.path.join(cache_dir, name),
            only=only,
            task=args.task,
            preset_lr=preset,
            mode=mode,
            tradeoff=args.tradeoff,
        )
        if only is not None:
            log(f"scale 2 shard {only} done in {payload['runtime_s']} s (results in the cache)")
            return 0
        written.append(_save(out, name, payload))
        log("scale 2 summary:\n" + common.table(payload["summary"]))
        from experiments.otr_vs_sft import views

        written += views.plot_all(out)
    if not args.no_plot and not args.quick:
        from experiments.otr_vs_sft import plot

        written.append(plot.plot(out))
    log(f"done in {time.perf_counter() - t0:.1f} s; wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale 1 while it is still running: the levels whose runs are all in the cache.

The full scale-1 run (``run.py --scale 1``) writes ``continuum.json`` only once every
level is done, which takes more than one session. This reads the run cache
(``results/runs/continuum`` beside this file) and the level models (the work folder's
cached prior levels), and reports each level whose six methods have their best-LR runs on
every seed: the base model's accuracies and token measures, the selected LRs, and each method minus
SFT with its paired-bootstrap 95% interval over seeds and test items (``stats.py``).
Nothing is trained; runs of another base model (another ``weights_sha1``) are ignored.

    python -m experiments.otr_vs_sft.continuum_progress
    # -> experiments/otr_vs_sft/results/continuum_progress.json and .md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from experiments.otr_vs_sft.paths import RESULTS

METRICS = ("in_domain", "ood", "retention")


def level_models(workdir: str) -> list[tuple[int, dict]]:
    """[(prior steps, state dict)] of the cached prior levels (the newest cache file)."""
    files = sorted(glob.glob(os.path.join(workdir, "prior_levels_*.pt")), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no cached prior levels under {workdir}: run run.py --scale 1 first")
    return [(steps, state) for steps, state, _val in torch.load(files[-1])]


def cached_runs(cache_dir: str, sha: str) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(cache_dir, "*.json")):
        with open(path) as f:
            rec = json.load(f)
        if rec["config"].get("weights_sha1") == sha:
            out.append({**rec["result"], "lr": rec["config"]["lr"], "seed": rec["config"]["seed"]})
    return out


def complete_level(runs: list[dict], methods: list[str], seeds: list[int]) -> list[dict] | None:
    """The best-LR runs (the LR a method was run at on the later seeds) of every method on
    every seed, marked ``setting: best_lr``; None while any is missing."""
    chosen = []
    for m in methods:
        later = {r["lr"] for r in runs if r["method"] == m and r["seed"] != seeds[0]}
        if len(later) != 1:
            return None
        (lr,) = later
        picked = [r for r in runs if r["method"] == m and r["lr"] == lr and r["seed"] in seeds]
        if sorted(r["seed"] for r in picked) != sorted(seeds):
            return None
        if any("items" not in r for r in picked):
            return None
        chosen += [dict(r, setting="best_lr") for r in picked]
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    from experiments.otr_vs_sft.run import WORKDIR

    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--cache", default=os.path.join(RESULTS, "runs", "continuum"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from experiments.otr_vs_sft import continuum, stats
    from experiments.otr_vs_sft.common import METHODS
    from experiments.otr_vs_sft.scale1 import example, gen_chain, make_model, unique_set

    cfg = continuum.FULL
    sets = continuum.eval_sets(cfg)
    held = {p for p, _ in sets["val"] + sets["test"]}
    items = unique_set(gen_chain, cfg["steps"] * cfg["batch"], 10_000, held)  # seed 0's data
    first = [example(p, a) for p, a in items[: cfg["measure_n"]]]
    methods = [m.name for m in METHODS]
    cache_dir = args.cache
    levels, runs_out = [], []
    for index, (prior_steps, state) in enumerate(level_models(args.workdir)):
        sha = continuum.fingerprint(state)
        runs = cached_runs(cache_dir, sha)
        chosen = complete_level(runs, methods, cfg["seeds"])
        level = {"level": index, "prior_steps": prior_steps, "weights_sha1": sha}
        level["cached_runs"] = len(runs)
        if chosen is None:
            level["complete"] = False
            levels.append(level)
            continue
        model = make_model(0)
        model.load_state_dict(state)
        model.eval()
        level.update(
            complete=True,
            base={"in_domain": chosen[0]["base_in_domain"]},
            base_in_domain=chosen[0]["base_in_domain"],
            token_measures=continuum.token_measures(model, first),
            best_lr={m: next(r["lr"] for r in chosen if r["method"] == m) for m in methods},
            sft={k: stats.np.mean([r[k] for r in chosen if r["method"] == "sft"]) for k in METRICS},
            versus_sft={
                m: {k: stats.versus_sft(chosen, "best_lr", m, k) for k in METRICS}
                for m in methods
                if m != "sft"
            },
        )
        levels.append(level)
        drop = ("curve", "train_logs")
        runs_out += [{k: v for k, v in r.items() if k not in drop} for r in chosen]
    payload = {"note": __doc__.split("\n\n")[0], "levels": levels, "runs": runs_out}
    with open(os.path.join(args.out, "continuum_progress.json"), "w") as f:
        json.dump(payload, f, indent=1, default=float)
    lines = ["# Scale 1 progress (levels complete in the run cache)", ""]
    for lv in levels:
        if not lv["complete"]:
            lines.append(f"- level {lv['level']} (prior steps {lv['prior_steps']}): incomplete, "
                         f"{lv['cached_runs']} runs cached")  # fmt: skip
            continue
        tm = lv["token_measures"]
        lines += [
            "",
            f"## level {lv['level']}: base in-domain {lv['base_in_domain']:.3f}, prior steps "
            f"{lv['prior_steps']}, base p(target) {tm['p_target']:.3f}, argmax share "
            f"{tm['argmax_share']:.3f}",
            "",
            "best LR: " + ", ".join(f"{m} {lr:g}" for m, lr in lv["best_lr"].items()),
            "",
            "SFT: " + ", ".join(f"{k} {v:.3f}" for k, v in lv["sft"].items()),
            "",
            "| method | " + " | ".join(f"{k} - sft [95% CI]" for k in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for m, by_metric in lv["versus_sft"].items():
            cells = [
                f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {r['verdict']}"
                for r in by_metric.values()
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "continuum_progress.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

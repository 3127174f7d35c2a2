"""Derive the map the plugin reads at run time (``results/otr_map.json`` beside this file)
from the committed results, and ship a copy inside the package (``axolotl_otr/otr_map.json``).

python -m experiments.otr_vs_sft.otr_map          # write both files
python -m experiments.otr_vs_sft.otr_map --check  # exit 1 if either differs from the results

A level of the map is a base model on its fine-tuning data that the benchmark measured:
scale 1's prior levels (``continuum.json``, ``levels[i].token_measures``) and scale 2's
tasks (``real_model*.json``, a top-level ``token_measures`` or ``base_model.token_measures``),
each ``{"p_target", "argmax_share", "tokens"}`` of the base model, teacher-forced. A level
without token measures cannot be placed on the axis the plugin measures, so it is
skipped and listed under ``skipped`` with the reason. For each level the map keeps every
method's in-domain difference to SFT at its selected LR (``best_lr``), paired by seed
(mean, sample std, seeds) and, where the runs carry per-item results and
``stats.py`` (the paired bootstrap over seeds and test items) is present, its 95%
interval; the plugin calls a win or a loss only from an interval
(``axolotl_otr/map_reading.py`` states the rule).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from collections.abc import Iterator
from typing import Any

from experiments.otr_vs_sft.paths import PACKAGE, RESULTS, RESULTS_REL, ROOT

try:  # the paired bootstrap (issue 16, step 6): the one source of intervals
    from experiments.otr_vs_sft.stats import versus_sft
except ImportError:
    versus_sft = None

# real_model*.json files that are no level of the map: a task's partial progress report
# (scale2_progress.py) and its forgetting runs (no best-LR comparison at the usual steps)
NOT_LEVELS = ("_progress", "_forgetting")
MAP_NAME = "otr_map.json"
PACKAGED = os.path.join(ROOT, "axolotl_otr", MAP_NAME)
METRIC = "in_domain"
NAN = float("nan")
SETTING = "best_lr"
# The methods whose verdicts the plugin's line reads, with the words it uses for them:
# pure OTR (what `otr: true` trains) and the mix the README recommends for OTR users.
READ_METHODS = {"otr_sampled": "pure OTR", "otr_mix0.3": "OTR + 0.3 CE (otr_sft_mix: 0.3)"}
SCOPE = {
    "continuum": "a 0.86M-parameter Llama trained from scratch on digit skills (scale 1)",
    "real_model": "SmolLM2-135M-Instruct + LoRA on arithmetic (scale 2)",
}


def _measures(found: Any) -> dict[str, float] | None:
    """The token measures if complete and in range, else None."""
    if not isinstance(found, dict):
        return None
    try:
        p, share = float(found["p_target"]), float(found["argmax_share"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (0.0 <= p <= 1.0 and 0.0 <= share <= 1.0):
        return None
    return {"p_target": p, "argmax_share": share, "tokens": found.get("tokens")}


def _paired(runs: list[dict]) -> dict[str, list[float]]:
    """{method: [method - SFT on each seed]} of ``METRIC`` over the ``SETTING`` runs.

    The same pairing as ``common.paired_differences``, written out here because importing
    ``common`` loads torch, transformers and peft (about 20 s) for ten lines of arithmetic.
    """
    by_seed = {(r["method"], r["seed"]): r for r in runs if r.get("setting") == SETTING}
    out: dict[str, list[float]] = {}
    for (method, seed), run in sorted(by_seed.items()):
        sft = by_seed.get(("sft", seed))
        if method == "sft" or sft is None:
            continue
        if run.get(METRIC) is not None and sft.get(METRIC) is not None:
            out.setdefault(method, []).append(run[METRIC] - sft[METRIC])
    return out


def _differences(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Each method's in-domain difference to SFT over ``runs`` (one level's)."""
    out = {}
    for method, diffs in _paired(runs).items():
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        entry: dict[str, Any] = {"mean": round(statistics.fmean(diffs), 4), "std": round(std, 4)}
        entry["n_seeds"] = len(diffs)
        boot = versus_sft(runs, SETTING, method, METRIC) if versus_sft is not None else None
        if boot is not None:
            entry.update(
                mean=round(boot["mean"], 4),
                lo=round(boot["lo"], 4),
                hi=round(boot["hi"], 4),
                n_seeds=boot["n_seeds"],
                n_items=boot["n_items"],
            )
        out[method] = entry
    return out


def _sft_mean(runs: list[dict]) -> float | None:
    values = [r[METRIC] for r in runs if r.get("setting") == SETTING and r["method"] == "sft"]
    return round(statistics.fmean(values), 4) if values else None


def _level(name: str, source: str, measures: dict, base: dict, runs: list[dict]) -> dict:
    return {
        "name": name,
        "source": source,
        "p_target": round(measures["p_target"], 4),
        "argmax_share": round(measures["argmax_share"], 4),
        "tokens": measures["tokens"],
        "base_in_domain": base.get(METRIC),
        "sft_in_domain": _sft_mean(runs),
        "differences": _differences(runs),
    }


def level_sources(
    results: str = RESULTS,
) -> Iterator[tuple[str, str, dict, dict | None, list[dict], dict]]:
    """Every measured level in ``results``, in file order, as ``(name, source, base,
    measures, runs, payload)``: ``measures`` None for a level without token measures.
    ``runs`` are the level's own (a scale-1 level's out of ``continuum.json``)."""
    seen: set[str] = set()  # level models already on the map (weights_sha1)
    # continuum_progress.json: the levels of a scale-1 run still going (complete ones only)
    for stem in ("continuum", "continuum_progress"):
        path = os.path.join(results, f"{stem}.json")
        if not os.path.exists(path):
            continue
        payload = json.load(open(path))
        source = f"{RESULTS_REL}/{stem}.json"
        for lv in payload.get("levels", []):
            sha = lv.get("weights_sha1")
            if lv.get("complete") is False or (sha is not None and sha in seen):
                continue
            base = lv.get("base", {})
            name = f"scale 1 level {lv['level']} (base in-domain {base.get(METRIC, NAN):.2f})"
            measures = _measures(lv.get("token_measures"))
            runs = [r for r in payload["runs"] if r.get("level") == lv["level"]]
            yield name, source, base, measures, runs, payload
            if measures is not None and sha is not None:
                seen.add(sha)
    for path in sorted(glob.glob(os.path.join(results, "real_model*.json"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith(NOT_LEVELS):
            continue
        payload = json.load(open(path))
        source = f"{RESULTS_REL}/{stem}.json"
        base = payload.get("base_model", {})
        name = f"scale 2 {stem} (base in-domain {base.get(METRIC, NAN):.2f})"
        measures = _measures(payload.get("token_measures", base.get("token_measures")))
        yield name, source, base, measures, payload["runs"], payload


def derive(results: str = RESULTS) -> dict[str, Any]:
    """The map from the result files under ``results`` (deterministic: no time stamps)."""
    levels, skipped, scopes = [], [], []
    for name, source, base, measures, runs, _ in level_sources(results):
        if measures is None:
            skipped.append({"name": name, "source": source, "reason": "no token_measures"})
            continue
        levels.append(_level(name, source, measures, base, runs))
        scopes.append("continuum" if "continuum" in source else "real_model")
    interval = (
        "95% paired bootstrap over seeds and test items (experiments/otr_vs_sft/stats.py), "
        "where the runs carry per-item results"
        if versus_sft is not None
        else "none (experiments/otr_vs_sft/stats.py is not present)"
    )
    out: dict[str, Any] = {
        "about": "Measured levels of the OTR-vs-SFT map, indexed by the base model's token "
        "measures on its fine-tuning data. Generated; do not edit.",
        "generated_by": "experiments/otr_vs_sft/otr_map.py",
        "source": f"{RESULTS_REL}/{MAP_NAME}",
        "metric": f"{METRIC} accuracy, method - SFT, each at its selected LR ({SETTING})",
        "interval": interval,
        "methods": READ_METHODS,
        "levels": sorted(levels, key=lambda lv: lv["p_target"]),
        "skipped": skipped,
    }
    if scopes:
        out["scope"] = "; ".join(SCOPE[s] for s in dict.fromkeys(scopes))
    return out


def dumps(otr_map: dict[str, Any]) -> str:
    return json.dumps(otr_map, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    text = dumps(derive(args.results))
    targets = [os.path.join(args.results, MAP_NAME), PACKAGED]
    if args.check:
        stale = [t for t in targets if not os.path.exists(t) or open(t).read() != text]
        for t in stale:
            print(f"{t} differs from what {args.results} gives: run python -m {PACKAGE}.otr_map")
        return 1 if stale else 0
    for t in targets:
        with open(t, "w") as f:
            f.write(text)
    otr_map = json.loads(text)
    print(
        f"{len(otr_map['levels'])} level(s) on the map, {len(otr_map['skipped'])} skipped "
        f"({', '.join(s['name'] + ': ' + s['reason'] for s in otr_map['skipped']) or 'none'}); "
        f"wrote {', '.join(targets)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paired bootstrap of a method's difference to SFT over seeds and test items (issue 16).

A difference in accuracy has two sources of noise: which items are in the test set and
which seed trained the model. Both are resampled: each replicate draws the seeds with
replacement and, independently, the items with replacement (the same items for every
drawn seed and for both methods, since all runs answer the same test set), and takes the
mean of method - SFT over the drawn (seed, item) cells. The 95% interval is the 2.5 and
97.5 percentiles of those means. A difference is a win or a loss only when its interval
excludes 0.

A mean over groups of items (the retention probe's ``retention_family_mean``: every
family weighted alike, however many items it has) is bootstrapped stratified: the items
are drawn with replacement within each family, so each replicate keeps every family and
its size, and the replicate's value is the mean over families of method - SFT.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# metric -> (the per-item record it is computed from, the payload key of each item's group)
STRATIFIED = {"retention_family_mean": ("retention", "retention_item_families")}


def group_mean(values: Sequence[float], strata: Sequence[str]) -> float:
    """The mean over groups of each group's mean of ``values`` (one label per value)."""
    x, labels = np.asarray(values, dtype=np.float64), np.asarray(list(strata))
    if labels.shape != x.shape:
        raise ValueError(f"strata: need one label per item ({x.size}), got {labels.shape}")
    return float(np.mean([x[labels == g].mean() for g in dict.fromkeys(labels.tolist())]))


def paired_bootstrap(
    method: np.ndarray,
    sft: np.ndarray,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    strata: Sequence[str] | None = None,
) -> dict[str, float | str]:
    """Mean of ``method - sft`` (arrays [seeds, items] of 0/1 correctness, row s of both
    from seed s) and its paired-bootstrap interval, with the verdict. With ``strata`` (a
    group label per item) the statistic is the mean over groups of each group's mean,
    and items are resampled within their group."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(sft, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"need two equal [seeds, items] arrays, got {a.shape} and {b.shape}")
    d = a - b
    n_seeds, n_items = d.shape
    rng = np.random.default_rng(seed)
    w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot)
    if strata is None:
        w_item = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_boot)
        # replicate r: sum over seeds s and items i of w_seed[r, s] * w_item[r, i] * d[s, i]
        means = np.einsum("rs,si,ri->r", w_seed, d, w_item) / (n_seeds * n_items)
        point = float(d.mean())
    else:
        labels = np.asarray(list(strata))
        if labels.shape != (n_items,):
            raise ValueError(f"strata: need one label per item ({n_items}), got {labels.shape}")
        groups = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
        means = np.zeros(n_boot)
        for idx in groups:  # the same seed draw for every group: the seeds stay paired
            n = idx.size
            w_item = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)
            means += np.einsum("rs,si,ri->r", w_seed, d[:, idx], w_item) / (n_seeds * n)
        means /= len(groups)
        point = group_mean(d.mean(axis=0), labels)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    verdict = "win" if lo > 0 else "loss" if hi < 0 else "no difference"
    return {"mean": point, "lo": float(lo), "hi": float(hi), "verdict": verdict}


def per_item(runs: list[dict], setting: str, method: str, metric: str) -> dict[int, np.ndarray]:
    """{seed: 0/1 array} of ``metric``'s per-item correctness for ``method``'s runs."""
    out = {}
    for r in runs:
        if r.get("setting") == setting and r["method"] == method and metric in r.get("items", {}):
            out[r["seed"]] = np.array([c == "1" for c in r["items"][metric]], dtype=np.float64)
    return out


def versus_sft(
    runs: list[dict],
    setting: str,
    method: str,
    metric: str,
    strata: Sequence[str] | None = None,
) -> dict | None:
    """``paired_bootstrap`` of ``method`` against SFT on the seeds both have, or None. A
    metric of ``STRATIFIED`` is read from its per-item record with ``strata`` (required)."""
    if metric in STRATIFIED:
        if strata is None:
            raise ValueError(f"{metric}: needs the group of every item ({STRATIFIED[metric][1]})")
        metric = STRATIFIED[metric][0]
    mine, sft = per_item(runs, setting, method, metric), per_item(runs, setting, "sft", metric)
    seeds = sorted(set(mine) & set(sft))
    if not seeds:
        return None
    result = paired_bootstrap(
        np.stack([mine[s] for s in seeds]), np.stack([sft[s] for s in seeds]), strata=strata
    )
    return {**result, "n_seeds": len(seeds), "n_items": int(mine[seeds[0]].size)}


def bootstrap_table(
    runs: list[dict],
    metrics: list[str],
    setting: str = "best_lr",
    strata: Sequence[str] | None = None,
) -> str:
    """Markdown: method - SFT per metric, mean [95% interval] and the verdict (``strata``:
    the item groups that the metrics of ``STRATIFIED`` need)."""
    methods = [m for m in dict.fromkeys(r["method"] for r in runs) if m != "sft"]
    head = "| method | " + " | ".join(f"{m} - sft" for m in metrics) + " |"
    out = [head, "|" + "---|" * (1 + len(metrics))]
    for method in methods:
        cells = []
        for metric in metrics:
            groups = strata if metric in STRATIFIED else None
            r = versus_sft(runs, setting, method, metric, strata=groups)
            cells.append(
                "-"
                if r is None
                else f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] {r['verdict']} "
                f"({r['n_seeds']} x {r['n_items']})"
            )
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)

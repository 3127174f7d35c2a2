"""Measure scale-2 candidate tasks and the retention probe on the base model, before any
fine-tuning (issue 16).

python -m experiments.otr_vs_sft.screen_tasks   # ~10 min on one thread

Writes results/scale2_task_screen.json: for every ``tasks.CANDIDATES`` entry its
number of distinct problems and the base model's strict and lenient accuracy on up to
200 of them (greedy, the trained reply format's prompt), with sample replies; and the
retention probe screen (results/retention_screen.json, via ``scale2``), with the
earlier retention set re-read by the fixed scorer.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from experiments.otr_vs_sft import common, scale2, tasks  # noqa: E402

N = 200


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common.set_threads()
    path = scale2.ensure_model(log)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    target = os.path.join(scale2.RESULTS, "scale2_task_screen.json")
    out = {"model": os.path.basename(path), "max_new": scale2.MAX_NEW, "candidates": {}}
    if os.path.exists(target):  # candidates already screened under the same settings
        with open(target) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in ("model", "max_new")} == {
            k: out[k] for k in out if k != "candidates"
        }:
            out["candidates"] = saved["candidates"]
            if "earlier_set" in saved:
                out["earlier_set"] = saved["earlier_set"]
    for name, terms in tasks.CANDIDATES.items():
        done = out["candidates"].get(name)
        if done and done["terms"] == json.loads(json.dumps(terms.describe())):
            continue
        t0 = time.perf_counter()
        total = len(terms.problems())
        items = scale2.task_items(tasks.items(terms, min(N, total), 501))
        max_new = scale2.reply_tokens(terms)
        strict, lenient, replies = scale2.score(base, tok, items, max_new)
        out["candidates"][name] = {
            "terms": terms.describe(),
            "distinct_problems": total,
            "n": len(items),
            "strict": round(scale2._mean(strict), 4),
            "lenient": round(scale2._mean(lenient), 4),
            **({"max_new": max_new} if max_new != scale2.MAX_NEW["task"] else {}),
            "samples": [[x["question"], r] for x, r in zip(items[:4], replies[:4], strict=True)],
        }
        common.write_json(target, out)
        log(f"{name}: {out['candidates'][name]} ({time.perf_counter() - t0:.0f} s)")
    keep, key = scale2.retention_set(base, tok, False, log)
    out["probe"] = {
        "key": key,
        "kept": len(keep),
        "kept_by_family": dict(Counter(x["family"] for x in keep)),
    }
    log(f"probe: {out['probe']}")
    if "earlier_set" in out:  # measured already under the same model and reply lengths
        common.write_json(target, out)
        return
    old, dropped = scale2.old_retention_items()
    strict, lenient, replies = scale2.score(base, tok, old, scale2.MAX_NEW["probe"])
    short = scale2.generate(base, tok, [x["question"] for x in old], max_new=16)
    earlier = [  # the earlier rule: last integer / word of the first line, 16 or 12 tokens
        _earlier_ok(r, x) for r, x in zip(short, old, strict=True)
    ]
    out["earlier_set"] = {
        "dropped": dropped,
        "items": len(old),
        "kept_fixed_scorer": Counter(x["family"] for x, s in zip(old, strict, strict=True) if s),
        "kept_earlier_rule_16_tokens": Counter(
            x["family"] for x, s in zip(old, earlier, strict=True) if s
        ),
        "replies": [[x["question"], r, s] for x, r, s in zip(old, replies, strict, strict=True)],
    }
    log(f"earlier set: { ({k: v for k, v in out['earlier_set'].items() if k != 'replies'}) }")
    common.write_json(target, out)


def _earlier_ok(reply: str, item: dict) -> bool:
    """The issue-11 strict rule, to count what it kept on the same pool (minus the
    dropped items): the last integer / any word of the first line."""
    import re

    line = reply.strip().split("\n")[0]
    if item["scorer"] == "num":
        found = re.findall(r"-?\d+", line.replace(",", ""))
        return bool(found) and found[-1] == item["answer"]
    return item["answer"] in re.findall(r"[a-z0-9]+", line.lower())


if __name__ == "__main__":
    main()

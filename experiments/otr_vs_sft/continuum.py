"""Scale 1 as a continuum: how much the base model already knows vs which objective wins.

The tiny from-scratch Llama of ``scale1.py`` (base skills add / rev / copy, target skill a
three-term sum with its working written out) is given a controlled prior on the target
skill: after the shared base pre-training, plain cross-entropy training continues on the
base skills with the target skill mixed in at ``prior_fraction`` of each batch, and
snapshots of that one continued run are taken. The prior levels are the base model itself
and the first snapshots whose *validation* in-domain accuracy reaches each threshold of
``prior_thresholds``: base models that know 0%, ~20%, ~40% and ~60%+ of the target skill,
all with the base skills intact. (The levels are chosen on the validation split before any
method is fine-tuned; the test split is never looked at to choose them.)

At every level each method is fine-tuned on the target skill at its own best LR (a sweep on
seed 0 whose grid grows until its best point is inside, ``common.next_lr_grid``), then on
two more seeds at that LR. Every run is cached on disk by its configuration
(``common.RunCache``), so the experiment resumes where it stopped.

Metrics (greedy decoding): ``in_domain`` (final number of 200 held-out three-term sums of
1-99), ``ood`` (four terms of 1-99: one step more, the variant a base with a partial prior
can score on), ``ood_digits`` (three terms of 100-333), ``retention`` (mean exact match on
the base skills), and ``val_ce`` (teacher-forced cross-entropy per answer token on the
validation split: the tie-breaker of the LR selection when accuracies are equal).
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import time
from typing import Any

import torch

from experiments.otr_vs_sft.common import METHODS, FineTunes, RunCache
from experiments.otr_vs_sft.common import token_measures as common_token_measures
from experiments.otr_vs_sft.scale1 import (
    BASE_TASKS,
    accuracy,
    collate,
    correct,
    example,
    gen_chain,
    gen_chain4,
    gen_chain_ood,
    make_model,
    pretrain_base,
    unique_set,
)

FULL = dict(
    base_steps=1000,
    base_batch=128,
    base_lr=3e-3,
    prior_fraction=0.5,
    prior_lr=1e-3,
    prior_batch=64,
    prior_max_steps=6000,
    prior_every=10,
    # 0.8 and 0.94 (issue 16): the model-strong end, aimed at test in-domain >= 0.75 and
    # >= 0.9 (the test split has read ~0.03 below validation at the first three levels)
    prior_thresholds=[0.15, 0.35, 0.6, 0.8, 0.94],
    n_val=150,
    n_test=200,
    n_ood=200,
    n_ret=100,
    steps=150,
    batch=32,
    warmup=8,
    eval_every=50,
    measure_n=256,
    lr_grid=[3e-4, 1e-3, 3e-3],
    lr_ladder=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    seeds=[0, 1, 2],
)
QUICK = dict(
    base_steps=30,
    base_batch=32,
    base_lr=3e-3,
    prior_fraction=0.5,
    prior_lr=1e-3,
    prior_batch=16,
    prior_max_steps=4,
    prior_every=2,
    prior_thresholds=[0.0],
    n_val=8,
    n_test=8,
    n_ood=8,
    n_ret=4,
    steps=3,
    batch=4,
    warmup=1,
    eval_every=3,
    measure_n=8,
    lr_grid=[1e-3],
    lr_ladder=[1e-3],
    seeds=[0],
)


def eval_sets(cfg: dict) -> dict[str, list]:
    sets = {"val": unique_set(gen_chain, cfg["n_val"], 101)}
    sets["test"] = unique_set(gen_chain, cfg["n_test"], 102, {p for p, _ in sets["val"]})
    sets["ood"] = unique_set(gen_chain4, cfg["n_ood"], 104)
    sets["ood_digits"] = unique_set(gen_chain_ood, cfg["n_ood"], 103)
    for i, name in enumerate(BASE_TASKS):
        sets[name] = unique_set(BASE_TASKS[name], cfg["n_ret"], 200 + i)
    return sets


@torch.no_grad()
def answer_ce(model, items: list[tuple[str, str]]) -> float:
    """Teacher-forced cross-entropy per answer token (EOS included) of ``items``."""
    batch = collate([example(p, a) for p, a in items])
    return float(model(**batch).loss)


def _bits(ok: list[bool]) -> str:
    return "".join("1" if x else "0" for x in ok)


def evaluator(sets: dict[str, list]):
    """Accuracies, plus per-item correctness (``items``: one "0"/"1" string per metric, in
    the fixed order of its set) for the paired bootstrap over items and seeds."""

    def evaluate(model) -> dict:
        ok = {
            "in_domain": correct(model, sets["test"], True),
            "ood": correct(model, sets["ood"], True),
            "ood_digits": correct(model, sets["ood_digits"], True),
        }
        out = {
            "val_in_domain": accuracy(model, sets["val"], True),
            "val_ce": answer_ce(model, sets["val"]),
            **{k: sum(v) / len(v) for k, v in ok.items()},
        }
        retained = []
        for name in BASE_TASKS:
            r = correct(model, sets[name], False)
            out[f"retention_{name}"] = sum(r) / len(r)
            retained += r  # equal-size sets: the mean of all items is the mean of the means
        out["retention"] = sum(out[f"retention_{n}"] for n in BASE_TASKS) / len(BASE_TASKS)
        out = {k: round(v, 4) for k, v in out.items()}
        out["items"] = {**{k: _bits(v) for k, v in ok.items()}, "retention": _bits(retained)}
        return out

    return evaluate


def token_measures(model, examples: list[dict]) -> dict[str, float]:
    """``common.token_measures`` of ``examples`` in one batch."""
    return common_token_measures(model, [collate(examples)])


def base_model(cfg: dict, workdir: str, quick: bool, log) -> tuple[Any, dict]:
    """The shared base model (base skills only), cached under ``workdir``."""
    tag = "_".join(str(cfg[k]) for k in ("base_steps", "base_batch", "base_lr"))
    cache = os.path.join(workdir, f"base_{tag}.pt")
    model = make_model(0)
    if os.path.exists(cache) and not quick:
        saved = torch.load(cache)
        model.load_state_dict(saved["state"])
        log(f"  reusing cached base model {cache}")
        return model.eval(), {**saved["info"], "cached": True}
    model, info = pretrain_base(cfg, log)
    if not quick:
        torch.save({"state": model.state_dict(), "info": info}, cache)
    return model.eval(), info


def prior_levels(base, cfg: dict, sets: dict, held: set[str], workdir: str, quick: bool, log):
    """[(steps of prior training, state dict, validation in-domain accuracy)] per level.

    One continued CE run on base skills + ``prior_fraction`` target examples (drawn from a
    pool disjoint from the validation and test problems); a snapshot is kept as a level when
    its validation accuracy first reaches the next threshold.
    """
    tag = "_".join(
        str(cfg[k])
        for k in ("base_steps", "prior_fraction", "prior_lr", "prior_batch", "prior_every")
    )
    tag += "_" + "-".join(str(t) for t in cfg["prior_thresholds"])
    cache = os.path.join(workdir, f"prior_levels_{tag}.pt")
    if os.path.exists(cache) and not quick:
        log(f"  reusing cached prior levels {cache}")
        return torch.load(cache)
    levels = [(0, copy.deepcopy(base.state_dict()), accuracy(base, sets["val"], True))]
    model = copy.deepcopy(base).train()
    rng = random.Random(777)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["prior_lr"], weight_decay=0.0)
    gens = list(BASE_TASKS.values())
    thresholds = list(cfg["prior_thresholds"])
    t0 = time.perf_counter()
    for step in range(1, cfg["prior_max_steps"] + 1):
        items = []
        for _ in range(cfg["prior_batch"]):
            if rng.random() < cfg["prior_fraction"]:
                p, a = gen_chain(rng)
                while p in held:
                    p, a = gen_chain(rng)
            else:
                p, a = rng.choice(gens)(rng)
            items.append(example(p, a))
        loss = model(**collate(items)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg["prior_every"]:
            continue
        model.eval()
        val = accuracy(model, sets["val"], True)
        model.train()
        if val >= thresholds[0]:
            log(f"  prior level at step {step}: val in-domain {val:.3f}")
            levels.append((step, copy.deepcopy(model.state_dict()), val))
            thresholds.pop(0)
            if not thresholds:
                break
    if thresholds:
        log(f"  prior thresholds {thresholds} not reached in {cfg['prior_max_steps']} steps")
    log(f"  prior training {time.perf_counter() - t0:.1f} s")
    if not quick:
        torch.save(levels, cache)
    return levels


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A hash of a level's weights, part of every run's cache key: the base pre-training is
    seeded but not bit-reproducible across machines (a fresh machine's base model gave
    other prior levels), so a run may be reused only on the very same level model."""
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(quick: bool, workdir: str, log, cache_dir: str | None = None) -> dict:
    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    sets = eval_sets(cfg)
    held = {p for p, _ in sets["val"] + sets["test"]}
    evaluate = evaluator(sets)
    log("continuum: base model")
    base, base_info = base_model(cfg, workdir, quick, log)
    levels = prior_levels(base, cfg, sets, held, workdir, quick, log)
    cache = RunCache(None if quick else cache_dir)

    data_cache: dict[int, list[dict]] = {}

    def train_data(seed: int) -> list[dict]:
        if seed not in data_cache:
            items = unique_set(gen_chain, cfg["steps"] * cfg["batch"], 10_000 + seed, held)
            data_cache[seed] = [example(p, a) for p, a in items]
        return data_cache[seed]

    runs, level_info = [], []
    # strongest level first: the model-strong end (issue 16) is the new part of the map
    for index, (prior_steps, state, _val) in reversed(list(enumerate(levels))):
        model = make_model(0)
        model.load_state_dict(state)
        model.eval()
        base_eval = evaluate(model)
        log(f"level {index} (prior steps {prior_steps}): base {base_eval}")
        level_sha = fingerprint(state)
        level = {
            "level": index,
            "prior_steps": prior_steps,
            "weights_sha1": level_sha,
            "base": {k: v for k, v in base_eval.items() if k != "items"},
            "token_measures": token_measures(model, train_data(0)[: cfg["measure_n"]]),
        }
        level_info.append(level)

        def from_level(seed: int, state=state):
            m = make_model(0)
            m.load_state_dict(state)
            return m

        fine_tunes = FineTunes(
            cfg,
            build_model=from_level,
            train_data=train_data,
            collate=collate,
            evaluate=evaluate,
            initial=base_eval,
            output_dir=os.path.join(workdir, "trainer"),
            log=log,
            name_width=12,
            cache=cache,
            needs=("items",),
            identity={
                "experiment": "continuum-v1",
                "base": {k: cfg[k] for k in ("base_steps", "base_batch", "base_lr")},
                "prior": {k: cfg[k] for k in ("prior_fraction", "prior_lr", "prior_batch")},
                "prior_steps": prior_steps,
                "weights_sha1": level_sha,
                "data": {k: cfg[k] for k in ("n_val", "n_test", "n_ood", "n_ret")},
            },
            extra={
                "level": index,
                "prior_steps": prior_steps,
                "base_in_domain": base_eval["in_domain"],
            },
        )
        seeds = cfg["seeds"]
        best_lr = fine_tunes.sweep_best_lr(
            cfg["lr_grid"], seeds[0], METHODS, ladder=cfg["lr_ladder"]
        )
        level["best_lr"] = best_lr
        fine_tunes.run_methods(METHODS, best_lr, seeds, "best_lr")
        fine_tunes.equal_time(
            seeds, METHODS, note="best-LR run read at the last eval point within SFT's time"
        )
        runs.extend(fine_tunes.runs)
    level_info.sort(key=lambda lv: lv["level"])
    return {
        "scale": "1: tiny Llama from scratch, prior continuum, CPU",
        "config": dict(cfg),
        "base_model": {**base_info},
        "levels": level_info,
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "runs": runs,
    }

